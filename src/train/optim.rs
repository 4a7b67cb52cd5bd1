//! AdamW with decoupled weight decay on matrices only, global-norm gradient clipping, gradient
//! accumulation and the warmup + cosine learning-rate schedule. candle-nn's AdamW has no per-tensor
//! decay, no clipping and no access to its moments for checkpoints, hence this file.

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Storage,
    Tensor, Var,
};
use rayon::prelude::*;
use std::collections::HashMap;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
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
}

pub struct AdamW {
    pub params: Vec<Param>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    pub config: AdamWConfig,
}

impl AdamW {
    /// Takes the named variables of a VarMap, in name order so state files line up.
    pub fn new(varmap: &candle_nn::VarMap, config: AdamWConfig) -> Result<Self> {
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
            });
        }
        Ok(AdamW {
            params,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// One update with the given (already accumulated and clipped) gradients, one per parameter.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, p) in self.params.iter().enumerate() {
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

/// Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total` steps.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| lr_at(s, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-9);
        assert!((lr(9) - 1.0).abs() < 1e-9);
        assert!(lr(50) < lr(20) && lr(20) < lr(10));
        assert!((lr(100) - 0.1).abs() < 1e-9);
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
        let mut opt = AdamW::new(&vm, AdamWConfig::default()).unwrap();
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
        let opt = AdamW::new(&vm, AdamWConfig::default()).unwrap();
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
