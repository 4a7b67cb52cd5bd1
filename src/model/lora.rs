//! LoRA adapters (Hu et al. 2021): a frozen projection `W` plus a trained low-rank update
//! `(alpha/r)·B·A`, so fine-tuning a real model keeps only the small `A` and `B` (and their AdamW
//! moments) per target projection. Adapters are saved in PEFT's layout
//! (`adapter_config.json`, `adapter_model.safetensors`) and can be merged into the weights.

use super::llama::{Llama, Proj};
use super::LlamaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The projections of a Llama block an adapter can target, in Hugging Face's names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Prefix PEFT puts before the model's own tensor names in `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model";

/// Rank, scale and targets of the adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Also write the merged weights as `model.safetensors` when training finishes.
    #[serde(default = "merge_by_default")]
    pub merge: bool,
}

fn merge_by_default() -> bool {
    true
}

impl LoraConfig {
    /// Checks the settings and expands `all-linear` (PEFT's name for every projection).
    /// The scale numerator PEFT's examples use.
    pub const DEFAULT_ALPHA: f64 = 16.0;

    pub fn new(rank: usize, alpha: f64, targets: &[String]) -> Result<LoraConfig> {
        if rank == 0 {
            bail!("--lora-rank must be positive");
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            bail!("--lora-alpha must be a positive number, got {alpha}");
        }
        let mut out = Vec::new();
        for t in targets {
            if t == "all-linear" {
                out.extend(TARGETS.iter().map(|s| s.to_string()));
            } else if TARGETS.contains(&t.as_str()) {
                out.push(t.clone());
            } else {
                bail!(
                    "--lora-targets: unknown module {t:?} (choose from {}, or all-linear)",
                    TARGETS.join(", ")
                );
            }
        }
        out.sort_by_key(|t| TARGETS.iter().position(|s| s == t));
        out.dedup();
        if out.is_empty() {
            bail!("--lora-targets names no module");
        }
        Ok(LoraConfig {
            rank,
            alpha,
            targets: out,
            merge: true,
        })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// PEFT's `adapter_config.json` for these adapters on `base`.
    pub fn peft_json(&self, base: &Path) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.display().to_string(),
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
        })
    }

    /// Reads PEFT's `adapter_config.json`, returning the settings and the base model it names.
    pub fn read_peft(path: &Path) -> Result<(LoraConfig, String)> {
        let v: serde_json::Value = crate::util::read_json(path)?;
        let field = |k: &str| {
            v.get(k)
                .with_context(|| format!("{}: field \"{k}\" is missing", path.display()))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            bail!(
                "{}: only LoRA adapters (peft_type \"LORA\") are supported",
                path.display()
            );
        }
        let rank = field("r")?.as_u64().context("\"r\" is not a number")? as usize;
        let alpha = field("lora_alpha")?
            .as_f64()
            .context("\"lora_alpha\" is not a number")?;
        let targets: Vec<String> = match field("target_modules")? {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            _ => bail!("{}: \"target_modules\" is not a list", path.display()),
        };
        let base = field("base_model_name_or_path")?
            .as_str()
            .context("\"base_model_name_or_path\" is not a string")?
            .to_string();
        let cfg =
            LoraConfig::new(rank, alpha, &targets).with_context(|| path.display().to_string())?;
        Ok((cfg, base))
    }
}

/// Input width of a target projection, from its tensor name.
fn in_features(config: &LlamaConfig, name: &str) -> usize {
    if name.contains("down_proj") {
        config.intermediate_size
    } else if name.contains("o_proj") {
        config.num_attention_heads * config.head_size()
    } else {
        config.hidden_size
    }
}

/// How adapter tensors start: `A` random with PEFT's scale, `B` zero, so training starts from
/// exactly the base model.
pub fn initial_value(config: &LlamaConfig, name: &str) -> Option<Init> {
    if name.contains(".lora_A.") {
        Some(Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (in_features(config, name) as f64).sqrt(),
        })
    } else if name.contains(".lora_B.") {
        Some(Init::Const(0.0))
    } else {
        None
    }
}

/// `base(x) + scale·B(A(x))`.
pub(super) fn forward(
    base: &Proj,
    a: &Linear,
    b: &Linear,
    scale: f64,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = super::kernels::linear(x, a.weight())?;
    let b_scaled = (b.weight() * scale)?;
    match base {
        Proj::Dense(l) if x.device().is_cpu() && x.dtype() == DType::F32 => {
            let op = FrozenPlusLowRank {
                weight: l.weight().clone(),
                bias: l.bias().cloned(),
            };
            x.contiguous()?.apply_op3(&h.contiguous()?, &b_scaled, op)
        }
        _ => base.forward(x)? + h.broadcast_matmul(&b_scaled.t()?)?,
    }
}

/// `y = x·Wᵀ + bias + h·B'ᵀ` with `W` and `bias` frozen, as one autograd node. Composed from
/// separate ops, the low-rank term and the sum would each keep an output-sized tensor alive for
/// the backward pass, which made LoRA use more memory than full fine-tuning; this node keeps
/// none beyond its output.
struct FrozenPlusLowRank {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A tensor holding a copy of a contiguous f32 CPU operand.
fn operand(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora_linear: operand must be contiguous".into()))?;
    Tensor::from_slice(&s.as_slice::<f32>()?[start..end], l.shape(), &Device::Cpu)
}

impl CustomOp3 for FrozenPlusLowRank {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::Module;
        let (x, h, b) = (operand(xs, xl)?, operand(hs, hl)?, operand(bs, bl)?);
        let base = Linear::new(self.weight.clone(), self.bias.clone()).forward(&x)?;
        let y = (base + h.broadcast_matmul(&b.t()?)?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.broadcast_matmul(&self.weight)?;
        let dh = dy.broadcast_matmul(b)?;
        let (out, r) = (dy.dim(D::Minus1)?, h.dim(D::Minus1)?);
        let db = dy.reshape(((), out))?.t()?.matmul(&h.reshape(((), r))?)?;
        Ok((Some(dx), Some(dh), Some(db)))
    }
}

impl Llama {
    /// Wraps the target projections of every block in adapters whose tensors come from `vb`
    /// (a VarMap to train them, or a saved adapter file). The wrapped weights stay as they are.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, vb: VarBuilder) -> Result<()> {
        let c = self.config.clone();
        let scale = cfg.scale();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let l = vb.pp("model").pp(format!("layers.{i}"));
            for ((group, name), proj) in layer.projections_mut() {
                if !cfg.targets.iter().any(|t| t == name) {
                    continue;
                }
                if !matches!(proj, Proj::Dense(_)) {
                    bail!("LoRA needs dense (unquantized) weights; convert a GGUF model with `chatforge export --format hf` first");
                }
                let (out, inp) = proj.dense_weight()?.0.dims2()?;
                let p = l.pp(group).pp(name);
                let tensor = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
                    let full = format!("{}.{which}.weight", p.prefix());
                    let init = initial_value(&c, &full).expect("a LoRA tensor name");
                    p.pp(which)
                        .get_with_hints(shape, "weight", init)
                        .with_context(|| format!("adapter tensor {full}"))
                };
                let a = tensor("lora_A", (cfg.rank, inp))?;
                let b = tensor("lora_B", (out, cfg.rank))?;
                let base = std::mem::replace(proj, Proj::Dense(Linear::new(a.clone(), None)));
                *proj = Proj::Lora {
                    base: Box::new(base),
                    a: Linear::new(a, None),
                    b: Linear::new(b, None),
                    scale,
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The fused node gives the composed formula's value and gradients.
    #[test]
    fn frozen_plus_low_rank_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (12, 16), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 12, &dev).unwrap();
        let x = Var::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let a = Var::randn(0f32, 0.3, (4, 16), &dev).unwrap();
        let b = Var::randn(0f32, 0.3, (12, 4), &dev).unwrap();
        let base = Proj::Dense(Linear::new(w.clone(), Some(bias.clone())));
        let (la, lb) = (
            Linear::new(a.as_tensor().clone(), None),
            Linear::new(b.as_tensor().clone(), None),
        );
        let fused = forward(&base, &la, &lb, 2.0, x.as_tensor()).unwrap();
        let composed = (x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + (x.broadcast_matmul(&a.t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap();
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let close = |p: Vec<f32>, q: Vec<f32>, what: &str| {
            assert_eq!(p.len(), q.len());
            for (u, v) in p.iter().zip(&q) {
                assert!(
                    (u - v).abs() <= 1e-4 * v.abs().max(1.0),
                    "{what}: {u} vs {v}"
                );
            }
        };
        close(values(&fused), values(&composed), "value");
        let gf = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, what) in [(&x, "dx"), (&a, "dA"), (&b, "dB")] {
            close(values(gf.get(v).unwrap()), values(gc.get(v).unwrap()), what);
        }
    }

    #[test]
    fn targets_expand_and_bad_ones_are_named() {
        let all = LoraConfig::new(8, 16.0, &["all-linear".into()]).unwrap();
        assert_eq!(all.targets.len(), 7);
        assert_eq!(all.scale(), 2.0);
        let some =
            LoraConfig::new(4, 8.0, &["v_proj".into(), "q_proj".into(), "q_proj".into()]).unwrap();
        assert_eq!(some.targets, vec!["q_proj", "v_proj"]);
        let e = LoraConfig::new(4, 8.0, &["qkv".into()]).unwrap_err();
        assert!(e.to_string().contains("\"qkv\""), "{e}");
        assert!(LoraConfig::new(0, 8.0, &["q_proj".into()]).is_err());
    }
}
