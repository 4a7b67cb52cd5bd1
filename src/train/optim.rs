//! AdamW with decoupled weight decay on matrices only, Muon for the blocks' weight matrices when
//! asked, global-norm gradient clipping, gradient accumulation and the warmup + cosine
//! learning-rate schedule. candle-nn's AdamW has no per-tensor decay, no clipping and no access to
//! its moments for checkpoints, hence this file.
//!
//! Muon (Keller Jordan's, as nanochat and modded-nanogpt train with it) replaces a matrix's
//! update by its momentum made orthogonal: every direction of the update moves the weights by
//! the same amount, where Adam's per-element steps let a few directions dominate. It applies to
//! the hidden matrices only; embeddings, the head and gains keep AdamW, as in those speedruns.

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Storage,
    Tensor, Var,
};
use rayon::prelude::*;
use std::collections::HashMap;

/// The update the transformer blocks' weight matrices get.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MatrixOptimizer {
    /// AdamW, as every other weight.
    #[default]
    Adamw,
    /// Muon: momentum made orthogonal by Newton–Schulz iterations; embeddings, the head, gains
    /// and biases keep AdamW.
    Muon,
}

impl MatrixOptimizer {
    /// The value `--optimizer` takes for it.
    pub fn flag(self) -> &'static str {
        match self {
            MatrixOptimizer::Adamw => "adamw",
            MatrixOptimizer::Muon => "muon",
        }
    }
}

/// Muon's momentum (Nesterov), as nanochat and modded-nanogpt use it.
const MUON_MOMENTUM: f64 = 0.95;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

pub struct Param {
    pub name: String,
    pub var: Var,
    /// Matrices decay; norms and biases (vectors) do not.
    pub decay: bool,
    /// Multiplies the schedule's learning rate (new heads learn faster than a tuned trunk).
    pub lr_scale: f64,
    /// Updated by Muon (its moment `m` is then the momentum; `v` stays unused).
    pub muon: bool,
}

/// AdamW for every weight, or Muon for the blocks' matrices and AdamW for the rest.
pub struct Optimizer {
    pub params: Vec<Param>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    pub config: OptimizerConfig,
}

impl Optimizer {
    /// Takes the named variables of a VarMap, in name order so state files line up.
    pub fn new(varmap: &candle_nn::VarMap, config: OptimizerConfig) -> Result<Self> {
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut params = Vec::new();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, var) in named {
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
            let decay = var.rank() >= 2;
            params.push(Param {
                name,
                var,
                decay,
                lr_scale: 1.0,
                muon: false,
            });
        }
        Ok(Optimizer {
            params,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// Hands the transformer blocks' weight matrices (not LoRA adapters) to Muon, whose peak
    /// learning rate is `lr_ratio` times the schedule's: Muon's steps have a fixed size per
    /// direction, so its rate is on another scale than AdamW's.
    pub fn use_muon(&mut self, lr_ratio: f64) {
        for p in self.params.iter_mut() {
            let block_matrix = p.name.contains(".layers.") && !p.name.contains(".lora_");
            if block_matrix && p.var.rank() == 2 {
                p.muon = true;
                p.lr_scale *= lr_ratio;
            }
        }
    }

    /// One update with the given (already accumulated and clipped) gradients, one per parameter.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, p) in self.params.iter().enumerate() {
            if p.muon {
                if p.lr_scale > 0.0 {
                    let decay = if p.decay { c.weight_decay } else { 0.0 };
                    let (m, theta) = muon_step(
                        p.var.as_tensor(),
                        &grads[i],
                        &self.m[i],
                        lr * p.lr_scale,
                        decay,
                    )?;
                    p.var.set(&theta)?;
                    self.m[i] = m;
                }
                continue;
            }
            let step = AdamStep {
                lr: lr * p.lr_scale,
                beta1: c.beta1,
                beta2: c.beta2,
                bc1,
                bc2,
                eps: c.eps,
                decay: if p.decay { c.weight_decay } else { 0.0 },
            };
            let (theta, g) = (p.var.as_tensor(), &grads[i]);
            if [theta, g, &self.m[i], &self.v[i]]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
            {
                step.fused(theta, g, &self.m[i], &self.v[i])?;
            } else {
                let (m, v, theta) = step.composed(theta, g, &self.m[i], &self.v[i])?;
                p.var.set(&theta)?;
                self.m[i] = m;
                self.v[i] = v;
            }
        }
        Ok(())
    }

    /// Moments keyed `m.NAME` / `v.NAME` for saving.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, p) in self.params.iter().enumerate() {
            out.insert(format!("m.{}", p.name), self.m[i].clone());
            out.insert(format!("v.{}", p.name), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{}", p.name);
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.shape() != slot.shape() {
                    candle_core::bail!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.shape(),
                        slot.shape()
                    );
                }
                // A copy: the update writes the moments in place.
                *slot = t.to_dtype(slot.dtype())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Muon's update of a weight matrix θ `[out, in]` with gradient g and momentum m: new (m, θ).
/// The Nesterov momentum is made orthogonal and scaled by √max(1, out/in), so that a tall
/// matrix's steps match a square one's per element; decay is decoupled, as AdamW's.
fn muon_step(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    lr: f64,
    decay: f64,
) -> Result<(Tensor, Tensor)> {
    let m = ((m * MUON_MOMENTUM)? + g)?;
    let nesterov = (g + (&m * MUON_MOMENTUM)?)?;
    let (rows, cols) = theta.dims2()?;
    let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
    let update = newton_schulz(&nesterov)?;
    let theta = ((theta * (1.0 - lr * decay))? - (update * (lr * scale))?)?;
    Ok((m, theta))
}

/// The orthogonal factor of `g` (U·Vᵀ of its SVD), roughly: five Newton–Schulz iterations with
/// the quintic coefficients of Muon, which push every singular value into about [0.7, 1.2]
/// fast rather than exactly to 1. Runs on the wide orientation, so the Gram matrix is the
/// smaller one, and on the thread's matmul kernel: in bf16 under mixed precision, as
/// modded-nanogpt runs it (the iteration tolerates the rounding; in f32 it cost a third of a
/// small model's step).
pub fn newton_schulz(g: &Tensor) -> Result<Tensor> {
    use crate::model::kernels::matmul_f32;
    const STEPS: usize = 5;
    let (a, b, c) = (3.4445f32, -4.7750f32, 2.0315f32);
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    let (r, n) = if tall { (cols, rows) } else { (rows, cols) };
    let wide = if tall { g.t()? } else { g.clone() };
    let mut x: Vec<f32> = wide.contiguous()?.flatten_all()?.to_vec1()?;
    let norm = x
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let inv = (1.0 / (norm + 1e-7)) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
    for _ in 0..STEPS {
        // gram = X·Xᵀ (r×r); poly = b·gram + c·gram²; X ← a·X + poly·X.
        let gram = matmul_f32((r, r, n), &x, (n, 1), &x, (1, n));
        let square = matmul_f32((r, r, r), &gram, (r, 1), &gram, (r, 1));
        let poly: Vec<f32> = gram
            .iter()
            .zip(&square)
            .map(|(&g, &s)| b * g + c * s)
            .collect();
        let px = matmul_f32((r, n, r), &poly, (r, 1), &x, (n, 1));
        x.iter_mut().zip(&px).for_each(|(v, &p)| *v = a * *v + p);
    }
    let x = Tensor::from_vec(x, (r, n), g.device())?;
    if tall {
        x.t()?.contiguous()
    } else {
        Ok(x)
    }
}

/// One AdamW update of one tensor, with its hyperparameters resolved.
struct AdamStep {
    lr: f64,
    beta1: f64,
    beta2: f64,
    /// Bias corrections 1 − β^t.
    bc1: f64,
    bc2: f64,
    eps: f64,
    /// Decoupled weight decay (0 for vectors).
    decay: f64,
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 14;

impl AdamStep {
    /// The update from candle ops, for any device and dtype: new (m, v, θ).
    fn composed(
        &self,
        theta: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let update = ((&m / self.bc1)? / ((&v / self.bc2)?.sqrt()? + self.eps)?)?;
        let theta = (theta * (1.0 - self.lr * self.decay))?;
        let theta = (theta - (update * self.lr)?)?;
        Ok((m, v, theta))
    }

    /// The same update in place on contiguous f32 CPU tensors: the moments in one pass, then the
    /// weights in another. Composed, it is a dozen passes that each allocate a weight-sized tensor.
    fn fused(&self, theta: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        m.inplace_op2(
            g,
            &Moment {
                beta: self.beta1,
                squared: false,
            },
        )?;
        v.inplace_op2(
            g,
            &Moment {
                beta: self.beta2,
                squared: true,
            },
        )?;
        theta.inplace_op3(m, v, self)
    }
}

/// A contiguous f32 CPU operand as a slice.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("adamw: operand must be contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("adamw: operand must be contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: fused update needs f32"),
    }
}

/// A moment's exponential average in place: `m ← β·m + (1 − β)·g` (or `g²`).
struct Moment {
    beta: f64,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw_moment"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (m, g) = (f32s_mut(dst, dst_l)?, f32s(gs, gl)?);
        let (beta, rest) = (self.beta as f32, (1.0 - self.beta) as f32);
        let squared = self.squared;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    *m = beta * *m + rest * if squared { g * g } else { g };
                }
            });
        Ok(())
    }
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adamw_step"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let theta = f32s_mut(dst, dst_l)?;
        let (m, v) = (f32s(ms, ml)?, f32s(vs, vl)?);
        let keep = (1.0 - self.lr * self.decay) as f32;
        let (step1, inv_bc2) = ((self.lr / self.bc1) as f32, (1.0 / self.bc2) as f32);
        let eps = self.eps as f32;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    *t = keep * *t - step1 * m / ((v * inv_bc2).sqrt() + eps);
                }
            });
        Ok(())
    }
}

/// Σ g² in f64: one pass over a contiguous f32 CPU gradient, candle ops otherwise.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(all)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(all[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum());
        }
    }
    g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Sums gradients over micro-batches; parameters a micro-batch did not reach count as zero.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        GradAccumulator {
            sums: vec![None; n],
        }
    }

    pub fn add(&mut self, params: &[Param], grads: &GradStore) -> Result<()> {
        for (i, p) in params.iter().enumerate() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                self.sums[i] = Some(match self.sums[i].take() {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, one per parameter (zeros where none flowed).
    pub fn into_grads(self, params: &[Param]) -> Result<Vec<Tensor>> {
        self.sums
            .into_iter()
            .zip(params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => p.var.zeros_like(),
            })
            .collect()
    }

    /// The summed gradients, clipped (see [`clip`]).
    pub fn finish(self, params: &[Param], max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
        clip(self.into_grads(params)?, max_norm)
    }
}

/// `grads` clipped to `max_norm` (if positive) by global norm, with the norm before clipping.
pub fn clip(grads: Vec<Tensor>, max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
    let mut sq = 0.0f64;
    for g in &grads {
        sq += sum_of_squares(g)?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        let grads = grads.iter().map(|g| g * scale).collect::<Result<_>>()?;
        return Ok((grads, norm));
    }
    Ok((grads, norm))
}

/// How the learning rate falls after warmup.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine from the peak to the floor over all steps after warmup.
    #[default]
    Cosine,
    /// The peak held, then a straight line to the floor over the last `WARMDOWN_FRACTION` of
    /// the steps (the trapezoid modded-nanogpt and nanochat train with).
    Warmdown,
}

/// The share of all steps a warmdown schedule spends falling to the floor.
pub const WARMDOWN_FRACTION: f64 = 0.4;

/// Linear warmup to `peak`, then `schedule`'s fall to `peak * min_ratio` at `total` steps.
pub fn lr_at(
    step: usize,
    total: usize,
    warmup: usize,
    (peak, min_ratio): (f64, f64),
    schedule: Schedule,
) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = match schedule {
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1);
            let t = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
            0.5 * (1.0 - (std::f64::consts::PI * t).cos())
        }
        Schedule::Warmdown => {
            let fall = (total as f64 * WARMDOWN_FRACTION).max(1.0);
            ((step as f64 - (total as f64 - fall)) / fall).clamp(0.0, 1.0)
        }
    };
    peak * (1.0 - (1.0 - min_ratio) * progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| lr_at(s, 100, 10, (1.0, 0.1), Schedule::Cosine);
        assert!((lr(0) - 0.1).abs() < 1e-9);
        assert!((lr(9) - 1.0).abs() < 1e-9);
        assert!((lr(10) - 1.0).abs() < 1e-9);
        assert!(lr(50) < lr(20) && lr(20) < lr(10));
        // Halfway through the fall, halfway between peak and floor.
        assert!((lr(55) - 0.55).abs() < 1e-9);
        assert!((lr(100) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn warmdown_holds_the_peak_then_falls_in_a_straight_line() {
        let lr = |s| lr_at(s, 100, 10, (1.0, 0.1), Schedule::Warmdown);
        assert!((lr(0) - 0.1).abs() < 1e-9);
        for held in [10, 30, 60] {
            assert!((lr(held) - 1.0).abs() < 1e-9, "step {held}: {}", lr(held));
        }
        assert!((lr(80) - 0.55).abs() < 1e-9, "{}", lr(80));
        assert!(((lr(70) - lr(80)) - (lr(80) - lr(90))).abs() < 1e-9);
        assert!((lr(100) - 0.1).abs() < 1e-9);
    }

    /// The smallest and largest eigenvalues of a symmetric positive semi-definite matrix, by
    /// power iteration (on `m`, then on `λmax·I − m`).
    fn eigen_range(m: &Tensor) -> (f64, f64) {
        let n = m.dim(0).unwrap();
        let rows: Vec<Vec<f64>> = m.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        let largest = |shift: f64, sign: f64| {
            let mut x = vec![1.0 / (n as f64).sqrt(); n];
            let mut lambda = 0.0;
            for _ in 0..2000 {
                let y: Vec<f64> = (0..n)
                    .map(|i| {
                        let mx: f64 = rows[i].iter().zip(&x).map(|(a, b)| a * b).sum();
                        shift * x[i] + sign * mx
                    })
                    .collect();
                lambda = y.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>();
                let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
                x = y.into_iter().map(|v| v / norm).collect();
            }
            lambda
        };
        let max = largest(0.0, 1.0);
        (max - largest(max, -1.0), max)
    }

    /// A 16 × 48 matrix whose singular values spread over about two decades comes out with every
    /// singular value near 1 (Muon's coefficients aim at [0.7, 1.2], not exactly 1); a tall
    /// matrix gives the transpose of its wide twin's result.
    #[test]
    fn newton_schulz_evens_out_singular_values() {
        use crate::model::bf16::{best_available, Kernel};
        use crate::model::kernels::set_matmul_kernel;
        let dev = Device::Cpu;
        let gauss = Tensor::randn(0f32, 1.0, (16, 48), &dev).unwrap();
        let spread: Vec<f32> = (0..16).map(|i| 10f32.powf(i as f32 / 8.0)).collect();
        let g = gauss
            .broadcast_mul(&Tensor::from_vec(spread, (16, 1), &dev).unwrap())
            .unwrap();
        let (lo, hi) = eigen_range(&g.matmul(&g.t().unwrap()).unwrap());
        assert!(hi / lo > 100.0, "the input's σ² spread {}", hi / lo);
        // f32, and the bf16 kernel mixed precision runs it on where this CPU has one.
        for kernel in [Kernel::F32, best_available()] {
            let (_, before) = set_matmul_kernel(kernel);
            let y = newton_schulz(&g).unwrap();
            let tall = newton_schulz(&g.t().unwrap()).unwrap();
            set_matmul_kernel(before);
            let (lo, hi) = eigen_range(&y.matmul(&y.t().unwrap()).unwrap());
            let (lo, hi) = (lo.sqrt(), hi.sqrt());
            let name = kernel.name();
            assert!(
                lo > 0.55 && hi < 1.25,
                "{name}: singular values in [{lo}, {hi}]"
            );
            let diff: f32 = (tall - y.t().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    /// Muon takes the blocks' matrices only, drives a matrix to its target, and keeps its
    /// momentum in `m` (saved with checkpoints); the embedding and a gain stay with AdamW.
    #[test]
    fn muon_takes_block_matrices_and_minimises_a_quadratic() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let zero = candle_nn::Init::Const(0.0);
        let w = vb
            .get_with_hints((8, 24), "model.layers.0.mlp.up_proj.weight", zero)
            .unwrap();
        let embed = vb
            .get_with_hints((8, 24), "model.embed_tokens.weight", zero)
            .unwrap();
        let gain = vb
            .get_with_hints(24, "model.layers.0.input_layernorm.weight", zero)
            .unwrap();
        let mut opt = Optimizer::new(&vm, OptimizerConfig::default()).unwrap();
        opt.use_muon(10.0);
        let muon: Vec<&str> = opt
            .params
            .iter()
            .filter(|p| p.muon)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(muon, ["model.layers.0.mlp.up_proj.weight"]);
        let target = Tensor::randn(0f32, 0.1, (8, 24), &Device::Cpu).unwrap();
        let gap = |x: &Tensor| -> f32 {
            (x - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let start = gap(&w);
        for step in 0..200 {
            let loss = (((&w - &target).unwrap().sqr().unwrap().sum_all().unwrap()
                + (&embed - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap()
                + gain.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let mut acc = GradAccumulator::new(opt.params.len());
            acc.add(&opt.params, &grads).unwrap();
            let (g, _) = acc.finish(&opt.params, 0.0).unwrap();
            // The rate decays as a schedule would, so Muon's fixed-size steps can settle.
            opt.apply(&g, 2e-3 * (1.0 - step as f64 / 200.0)).unwrap();
        }
        assert!(gap(&w) < 0.05 * start, "{} of {start}", gap(&w));
        assert!(gap(&embed) < 0.5 * start, "AdamW moved the embedding too");
        let state = opt.state();
        let norm = |k: &str| sum_of_squares(&state[k]).unwrap();
        assert!(norm("m.model.layers.0.mlp.up_proj.weight") > 0.0);
        assert_eq!(norm("v.model.layers.0.mlp.up_proj.weight"), 0.0);
        assert!(norm("v.model.embed_tokens.weight") > 0.0);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_decays_only_matrices() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((2, 2), "w", candle_nn::Init::Const(3.0))
            .unwrap();
        let b = vb
            .get_with_hints(2, "b", candle_nn::Init::Const(3.0))
            .unwrap();
        let mut opt = Optimizer::new(&vm, OptimizerConfig::default()).unwrap();
        assert!(opt.params.iter().any(|p| p.name == "w" && p.decay));
        assert!(opt.params.iter().any(|p| p.name == "b" && !p.decay));
        for _ in 0..300 {
            let loss = (w.sqr().unwrap().sum_all().unwrap() + b.sqr().unwrap().sum_all().unwrap())
                .unwrap();
            let grads = loss.backward().unwrap();
            let mut acc = GradAccumulator::new(opt.params.len());
            acc.add(&opt.params, &grads).unwrap();
            let (g, norm) = acc.finish(&opt.params, 1.0).unwrap();
            assert!(norm.is_finite());
            opt.apply(&g, 0.05).unwrap();
        }
        let final_w: f32 = w.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(final_w < 0.1, "{final_w}");
    }

    #[test]
    fn fused_update_matches_the_composed_one() {
        let dev = Device::Cpu;
        let r = |seed: u64, n: usize| {
            let mut rng = crate::util::Rng::new(seed);
            let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            Tensor::from_vec(v, n, &dev).unwrap()
        };
        let n = 3 * CHUNK + 17;
        let (theta, g, m) = (r(1, n), r(2, n), r(3, n));
        let v = r(4, n).abs().unwrap();
        for decay in [0.0, 0.1] {
            let step = AdamStep {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.95,
                bc1: 0.3,
                bc2: 0.2,
                eps: 1e-8,
                decay,
            };
            let (m1, v1, t1) = step.composed(&theta, &g, &m, &v).unwrap();
            let (t2, m2, v2) = (theta.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
            step.fused(&t2, &g, &m2, &v2).unwrap();
            let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
                (a - b)
                    .and_then(|d| d.abs()?.max_all()?.to_scalar())
                    .unwrap()
            };
            for (a, b) in [(&m1, &m2), (&v1, &v2), (&t1, &t2)] {
                let diff = max_diff(a, b);
                assert!(diff < 1e-5, "fused and composed differ by {diff}");
            }
            // The inputs really moved (the fused update wrote in place).
            assert!(max_diff(&t2, &theta) > 1e-3);
        }
        let exact: f64 = g
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum();
        assert!((sum_of_squares(&g).unwrap() - exact).abs() < 1e-9 * exact);
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(4, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let opt = Optimizer::new(&vm, OptimizerConfig::default()).unwrap();
        let grads = (w.sum_all().unwrap() * 10.0).unwrap().backward().unwrap();
        let mut acc = GradAccumulator::new(1);
        acc.add(&opt.params, &grads).unwrap();
        let (g, norm) = acc.finish(&opt.params, 1.0).unwrap();
        assert!((norm - 20.0).abs() < 1e-4);
        let after: f32 = g[0]
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((after - 1.0).abs() < 1e-3, "{after}");
    }
}
