//! Model configuration with Hugging Face's Llama field names, so `config.json` files interchange.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping) as in Hugging Face.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2 has them).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// What Gemma 3 and Mistral add to Llama; empty for Llama itself.
    #[serde(flatten)]
    pub family: FamilyFields,
}

/// The fields other families add to a Llama config, under Hugging Face's names. Mistral attends
/// over a sliding window in every layer. Gemma 3 (`model_type` "gemma3_text") is Llama with switches: norms on each sublayer's output as well as its input, norm
/// weights stored as offsets from one, a scaled embedding, GELU, query/key norms, and layers of
/// local attention over a sliding window with their own rotary base between global ones.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyFields {
    /// Tokens a local layer attends over (the query's own included); Mistral's every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// "sliding_attention" or "full_attention" per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Older files give the pattern instead: every n-th layer is global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// The rotary base of the local layers (the global ones use `rope_theta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Attention scores are scaled by its inverse square root instead of the head size's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Logits become `cap * tanh(logits / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma's name for `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
}

impl LlamaConfig {
    /// A small model for a given vocabulary and context: the default for `chatforge pretrain`.
    pub fn small(vocab_size: usize, context: usize) -> Self {
        LlamaConfig {
            architectures: default_architectures(),
            model_type: default_model_type(),
            vocab_size,
            hidden_size: 192,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 6,
            num_key_value_heads: Some(2),
            head_dim: None,
            max_position_embeddings: context,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: default_act(),
            bos_token_id: None,
            eos_token_id: None,
            torch_dtype: Some("float32".into()),
            family: FamilyFields::default(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Number of weights of the model this config describes.
    pub fn parameter_count(&self) -> usize {
        let (h, hd, ff) = (self.hidden_size, self.head_size(), self.intermediate_size);
        let q = self.num_attention_heads * hd;
        let kv = self.kv_heads() * hd;
        let attn = h * (q + 2 * kv) + q * h;
        let attn_bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * ff + if self.mlp_bias { 2 * ff + h } else { 0 };
        let qk_norm = if self.qk_norm() { 2 * hd } else { 0 };
        let block = attn + attn_bias + mlp + 2 * h + qk_norm;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * block + h + head
    }

    /// Whether each query and key head is RMS-normalised before the rotation (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3" || self.is_gemma3()
    }

    pub fn is_gemma3(&self) -> bool {
        self.model_type == "gemma3_text"
    }

    /// The window of layer `layer` when it attends locally; `None` for a global layer.
    pub fn sliding_window_of(&self, layer: usize) -> Option<usize> {
        let g = &self.family;
        let window = g.sliding_window?;
        let local = match (&g.layer_types, g.sliding_window_pattern) {
            _ if self.model_type == "mistral" => true,
            (Some(types), _) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
            (None, Some(n)) => n > 0 && !(layer + 1).is_multiple_of(n),
            (None, None) => false,
        };
        local.then_some(window)
    }

    /// The multiplier of attention scores.
    pub fn attention_scale(&self) -> f64 {
        let d = self
            .family
            .query_pre_attn_scalar
            .unwrap_or(self.head_size() as f64);
        1.0 / d.sqrt()
    }

    /// The multiplier of looked-up embeddings (Gemma scales them by the square root of the width).
    pub fn embedding_scale(&self) -> Option<f64> {
        self.is_gemma3().then(|| (self.hidden_size as f64).sqrt())
    }

    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the shape rules; `source` names the file in the message.
    pub fn validate(&self, source: &str) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{source}: {name} must be positive");
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "{source}: num_attention_heads ({}) does not divide hidden_size ({}); pick a head count that divides the width",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "{source}: num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.kv_heads(),
                self.num_attention_heads
            );
        }
        if !self.head_size().is_multiple_of(2) {
            bail!(
                "{source}: the head size ({}) must be even for rotary embeddings",
                self.head_size()
            );
        }
        let act_ok = match self.is_gemma3() {
            true => self.hidden_act == "gelu_pytorch_tanh",
            false => matches!(self.hidden_act.as_str(), "silu" | "relu2"),
        };
        if !act_ok {
            bail!(
                "{source}: hidden_act \"{}\" is not supported (\"silu\" or \"relu2\" for Llama, \"gelu_pytorch_tanh\" for Gemma 3)",
                self.hidden_act
            );
        }
        if self.family.attn_logit_softcapping.is_some() {
            bail!("{source}: attn_logit_softcapping is not supported (Gemma 2's attention soft-capping; Gemma 3 has none)");
        }
        if self.family.sliding_window == Some(0) {
            bail!("{source}: sliding_window must be positive");
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            bail!("{source}: rms_norm_eps and rope_theta must be positive");
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = crate::util::read_json(path)?;
        let source = path.display().to_string();
        // Other families are refused by name before their fields confuse the Llama reader.
        if let Some(kind) = raw.get("model_type").and_then(|t| t.as_str()) {
            if !matches!(
                kind,
                "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma3_text"
            ) {
                let arch = raw
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(|a| a.as_str())
                    .unwrap_or(kind);
                bail!("{source}: architecture {arch} (model_type \"{kind}\") is not supported; chatforge loads the Llama family (llama, mistral, qwen2, qwen3, phi3, gemma3_text)");
            }
        }
        let sliding = raw.get("use_sliding_window") == Some(&serde_json::Value::Bool(true))
            || raw
                .get("layer_types")
                .and_then(|t| t.as_array())
                .is_some_and(|t| t.iter().any(|l| l == "sliding_attention"));
        let kind = raw.get("model_type").and_then(|t| t.as_str());
        if sliding && kind != Some("gemma3_text") {
            bail!("{source}: sliding-window attention layers are not supported yet; chatforge attends over the whole context");
        }
        let mut cfg: LlamaConfig = serde_json::from_value(raw.clone())
            .map_err(|e| anyhow::anyhow!("{source}: not a Llama config ({e})"))?;
        // transformers 5 writes the rotary settings under `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling`.
        let mut rope = raw
            .get("rope_parameters")
            .or_else(|| raw.get("rope_scaling"));
        // Gemma 3 in transformers 5: one set per kind of layer.
        if let Some(local) = rope.and_then(|r| r.get("sliding_attention")) {
            cfg.family.rope_local_base_freq = local.get("rope_theta").and_then(|t| t.as_f64());
            let kind = local.get("rope_type").and_then(|t| t.as_str());
            if kind.is_some_and(|k| k != "default") {
                bail!("{source}: rotary scaling \"{}\" on the sliding-window layers is not supported yet", kind.unwrap_or_default());
            }
            rope = rope.and_then(|r| r.get("full_attention"));
        }
        if let Some(r) = rope.filter(|r| r.is_object()) {
            if raw.get("rope_theta").is_none() {
                if let Some(t) = r.get("rope_theta").and_then(|t| t.as_f64()) {
                    cfg.rope_theta = t;
                }
            }
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                bail!("{source}: rotary scaling \"{kind}\" is not supported yet (only the default rotary embedding)");
            }
            let partial = r.get("partial_rotary_factor").and_then(|f| f.as_f64());
            if partial.is_some_and(|f| f != 1.0) {
                bail!("{source}: a partial rotary embedding (partial_rotary_factor {}) is not supported yet", partial.unwrap_or(1.0));
            }
        }
        if !matches!(cfg.model_type.as_str(), "gemma3_text" | "mistral") {
            // Other families' files carry window fields they do not use. Soft-capping stays:
            // it is the `--logit-softcap` switch of models chatforge trained.
            cfg.family = FamilyFields {
                final_logit_softcapping: cfg.family.final_logit_softcapping,
                ..Default::default()
            };
        }
        if cfg.is_gemma3() {
            if let Some(act) = cfg.family.hidden_activation.clone() {
                cfg.hidden_act = act;
            } else if raw.get("hidden_act").is_none() {
                cfg.hidden_act = "gelu_pytorch_tanh".into();
            }
            // transformers' defaults for Gemma 3, for files that leave them out.
            cfg.family.rope_local_base_freq.get_or_insert(10_000.0);
            if raw.get("tie_word_embeddings").is_none() {
                cfg.tie_word_embeddings = true;
            }
            if raw.get("use_bidirectional_attention") == Some(&serde_json::Value::Bool(true)) {
                bail!("{source}: use_bidirectional_attention is not supported (chatforge's models are causal)");
            }
        }
        if cfg.model_type == "phi3" {
            // Phi-3 is Llama with fused q/k/v and gate/up projections, which the loader splits
            // (`model::split_fused`): from here on it is a Llama, and exports as one.
            cfg.model_type = "llama".into();
            cfg.architectures = vec!["LlamaForCausalLM".into()];
            // Attention over a window of `sliding_window` tokens equals full attention over a
            // context no longer than that.
            if let Some(w) = raw.get("sliding_window").and_then(|w| w.as_u64()) {
                cfg.max_position_embeddings = cfg.max_position_embeddings.min(w as usize);
            }
        }
        cfg.validate(&source)?;
        Ok(cfg)
    }

    /// Field-by-field differences, for telling a user why a checkpoint does not fit.
    pub fn differences(&self, other: &LlamaConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                if *va != vb
                    && !matches!(k.as_str(), "torch_dtype" | "bos_token_id" | "eos_token_id")
                {
                    out.push(format!("{k}: {va} vs {vb}"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_must_divide_width() {
        let mut c = LlamaConfig::small(300, 64);
        c.num_attention_heads = 5;
        let err = c.validate("model.json").unwrap_err().to_string();
        assert!(
            err.contains("model.json") && err.contains("does not divide"),
            "{err}"
        );
        let mut c = LlamaConfig::small(300, 64);
        c.num_key_value_heads = Some(4);
        assert!(c.validate("m").is_err());
        assert!(LlamaConfig::small(300, 64).validate("m").is_ok());
    }

    #[test]
    fn reads_rope_parameters_and_refuses_unknown_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let base = r#""hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":64,"max_position_embeddings":64"#;
        std::fs::write(
            &p,
            format!(
                r#"{{{base},"rope_parameters":{{"rope_theta":500000.0,"rope_type":"default"}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(LlamaConfig::load(&p).unwrap().rope_theta, 500000.0);
        std::fs::write(
            &p,
            format!(r#"{{{base},"rope_scaling":{{"rope_type":"llama3","factor":8.0}}}}"#),
        )
        .unwrap();
        let err = LlamaConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("llama3") && err.contains("config.json"),
            "{err}"
        );
    }

    #[test]
    fn reads_hugging_face_llama_config() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
            "max_position_embeddings":8192,"rms_norm_eps":1e-05,"rope_theta":100000,"tie_word_embeddings":true,
            "model_type":"llama","hidden_act":"silu","eos_token_id":2,"some_unknown_field":1}"#;
        let c: LlamaConfig = serde_json::from_str(text).unwrap();
        c.validate("x").unwrap();
        assert_eq!(c.head_size(), 64);
        assert_eq!(c.kv_heads(), 3);
    }
}
