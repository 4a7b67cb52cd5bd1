//! The architecture switches the nanochat and modded-nanogpt speedruns validated, for models
//! chatforge trains from scratch. Each one is a field that Hugging Face's readers already know, so
//! a switched model stays a plain config.json: squared ReLU is `hidden_act` "relu2", query/key
//! norms make the model a Qwen3 (Llama plus exactly those norms), the untied head is
//! `tie_word_embeddings` false and soft-capping is Gemma's `final_logit_softcapping`. Only the
//! zero start has no field: it changes a fresh model's first weights, not its shape.

use super::LlamaConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The MLP's gate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateActivation {
    /// silu(gate) · up, Llama's.
    Swiglu,
    /// relu(gate)² · up.
    Relu2,
}

/// Switches over a model config; an unset switch keeps what the config says.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct ArchSwitches {
    /// The MLP's gate function [default: the config's, swiglu for a new model].
    #[arg(long, value_enum)]
    pub activation: Option<GateActivation>,
    /// RMS-normalise each query and key head before the rotation (the model becomes a Qwen3).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub qk_norm: Option<bool>,
    /// An output head of its own instead of the embedding's transpose.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub untied_head: Option<bool>,
    /// Soft-cap the logits: cap · tanh(logits / cap); 0 turns it off.
    #[arg(long)]
    pub logit_softcap: Option<f64>,
    /// Start each block's output projections (and an untied head) at zero, so every block begins
    /// as the identity.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub zero_init: Option<bool>,
}

impl ArchSwitches {
    /// `self` with `over`'s set switches replacing its own.
    pub fn merged(&self, over: &ArchSwitches) -> ArchSwitches {
        ArchSwitches {
            activation: over.activation.or(self.activation),
            qk_norm: over.qk_norm.or(self.qk_norm),
            untied_head: over.untied_head.or(self.untied_head),
            logit_softcap: over.logit_softcap.or(self.logit_softcap),
            zero_init: over.zero_init.or(self.zero_init),
        }
    }

    /// Whether a fresh model starts with zero output projections.
    pub fn zero_start(&self) -> bool {
        self.zero_init == Some(true)
    }

    /// Sets the switched fields of `config`; `source` names the config in errors.
    pub fn apply(&self, config: &mut LlamaConfig, source: &str) -> Result<()> {
        if let Some(act) = self.activation {
            if config.is_gemma3() {
                bail!(
                    "{source}: --activation does not apply to a Gemma 3 model (its MLP is GeGLU)"
                );
            }
            config.hidden_act = match act {
                GateActivation::Swiglu => "silu",
                GateActivation::Relu2 => "relu2",
            }
            .into();
        }
        match (self.qk_norm, config.model_type.as_str()) {
            (None, _) | (Some(true), "qwen3") | (Some(false), "llama") => {}
            (Some(true), "llama") => {
                config.model_type = "qwen3".into();
                config.architectures = vec!["Qwen3ForCausalLM".into()];
                // Qwen3's reader assumes 128 when the field is absent.
                config.head_dim = Some(config.head_size());
            }
            (Some(false), "qwen3") => {
                config.model_type = "llama".into();
                config.architectures = vec!["LlamaForCausalLM".into()];
            }
            (Some(on), kind) => {
                bail!("{source}: --qk-norm {on} applies to llama and qwen3 models, not {kind}")
            }
        }
        if let Some(untied) = self.untied_head {
            config.tie_word_embeddings = !untied;
        }
        if let Some(cap) = self.logit_softcap {
            crate::util::check_range("--logit-softcap", cap, 0.0..=1e4)?;
            config.family.final_logit_softcapping = (cap > 0.0).then_some(cap);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_set_hugging_face_fields_and_unset_ones_keep_the_config() {
        let base = LlamaConfig::small(64, 32);
        let mut c = base.clone();
        ArchSwitches::default().apply(&mut c, "m").unwrap();
        assert_eq!(c, base, "no switch changes nothing");
        let all = ArchSwitches {
            activation: Some(GateActivation::Relu2),
            qk_norm: Some(true),
            untied_head: Some(true),
            logit_softcap: Some(15.0),
            zero_init: Some(true),
        };
        all.apply(&mut c, "m").unwrap();
        c.validate("m").unwrap();
        assert_eq!(c.hidden_act, "relu2");
        assert!(c.qk_norm() && c.model_type == "qwen3");
        assert_eq!(c.head_dim, Some(base.head_size()));
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.family.final_logit_softcapping, Some(15.0));
        // Switching back off returns a plain Llama.
        let off = ArchSwitches {
            activation: Some(GateActivation::Swiglu),
            qk_norm: Some(false),
            untied_head: Some(false),
            logit_softcap: Some(0.0),
            zero_init: None,
        };
        off.apply(&mut c, "m").unwrap();
        assert!(!c.qk_norm() && c.model_type == "llama" && c.tie_word_embeddings);
        assert_eq!(
            (c.hidden_act.as_str(), c.family.final_logit_softcapping),
            ("silu", None)
        );
        // A later layer of switches wins where it sets something.
        let merged = all.merged(&ArchSwitches {
            qk_norm: Some(false),
            ..Default::default()
        });
        assert_eq!(merged.qk_norm, Some(false));
        assert_eq!(merged.activation, Some(GateActivation::Relu2));
    }

    #[test]
    fn the_zero_start_zeroes_only_the_output_projections() {
        use candle_core::{DType, Device};
        let mut config = LlamaConfig::small(64, 32);
        config.tie_word_embeddings = false;
        let start = |zero: bool| {
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            crate::model::Llama::new(&config, vb).unwrap();
            let mut rng = crate::util::Rng::new(3);
            crate::model::llama::seeded_init(&config, &varmap, &mut rng, zero).unwrap();
            let data = varmap.data().lock().unwrap();
            data.iter()
                .map(|(k, v)| {
                    let values = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (k.clone(), values)
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (plain, zero) = (start(false), start(true));
        let outputs = ["o_proj.weight", "down_proj.weight", "lm_head.weight"];
        let mut zeroed = 0;
        for (name, values) in &zero {
            if outputs.iter().any(|o| name.ends_with(o)) {
                assert!(values.iter().all(|&x| x == 0.0), "{name} is not zero");
                assert!(plain[name].iter().any(|&x| x != 0.0), "{name} plain");
                zeroed += 1;
            } else {
                assert_eq!(values, &plain[name], "{name} differs from the plain start");
            }
        }
        assert_eq!(zeroed, 2 * config.num_hidden_layers + 1);
    }

    #[test]
    fn switches_refuse_what_does_not_apply() {
        let mut mistral = LlamaConfig::small(64, 32);
        mistral.model_type = "mistral".into();
        let qk = ArchSwitches {
            qk_norm: Some(true),
            ..Default::default()
        };
        let err = qk.apply(&mut mistral, "cfg.json").unwrap_err().to_string();
        assert!(err.contains("cfg.json") && err.contains("mistral"), "{err}");
        let cap = ArchSwitches {
            logit_softcap: Some(-1.0),
            ..Default::default()
        };
        let err = cap
            .apply(&mut LlamaConfig::small(64, 32), "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--logit-softcap"), "{err}");
    }
}
