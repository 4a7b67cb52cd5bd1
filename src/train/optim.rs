//! AdamW with decoupled weight decay on matrices only, global-norm gradient clipping, gradient
//! accumulation and the warmup + cosine learning-rate schedule. candle-nn's AdamW has no per-tensor
//! decay, no clipping and no access to its moments for checkpoints, hence this file.

use candle_core::{backprop::GradStore, Result, Tensor, Var};
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
            let lr = lr * p.lr_scale;
            let g = &grads[i];
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let theta = p.var.as_tensor();
            let theta = if p.decay {
                (theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            p.var.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
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
                *slot = t.to_dtype(slot.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
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

    /// The summed gradients, clipped to `max_norm` (if positive) by global norm; returns them with
    /// the norm before clipping.
    pub fn finish(self, params: &[Param], max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
        let grads: Vec<Tensor> = self
            .sums
            .into_iter()
            .zip(params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => p.var.zeros_like(),
            })
            .collect::<Result<_>>()?;
        let mut sq = 0.0f64;
        for g in &grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            let grads = grads.iter().map(|g| g * scale).collect::<Result<_>>()?;
            return Ok((grads, norm));
        }
        Ok((grads, norm))
    }
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
