//! Instruction tuning (InstructGPT step 1): next-token loss on assistant tokens only.

use super::padding::length_groups;
use super::trainer::{train, LoopOptions, RunSpec, Stage, Start};
use crate::data::chat::{read_chat_file, ChatFormat};
use crate::data::shards::ShardSet;
use crate::dist::Part;
use crate::model::lora::LoraConfig;
use crate::model::Llama;
use crate::tokenizer::chat::{render, ChatTemplate, RenderedChat};
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use crate::data::OnError;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SftOptions {
    pub base: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub format: ChatFormat,
    /// Chat template name; default: the one the tokenizer's special tokens call for.
    pub template: Option<String>,
    pub batch_size: usize,
    /// Longest conversation in tokens; default: the model's context.
    pub max_len: Option<usize>,
    pub val_fraction: f64,
    /// Held-out conversations; default: `val_fraction` of `data`.
    pub val_data: Vec<PathBuf>,
    pub on_error: OnError,
    /// Pretraining shards mixed into every batch to limit forgetting.
    pub mix_pretrain: Option<PathBuf>,
    /// Fraction of each batch's rows taken from `mix_pretrain`.
    pub mix_fraction: f64,
    /// Train LoRA adapters instead of every weight.
    pub lora: Option<LoraConfig>,
    #[serde(skip)]
    pub train: LoopOptions,
}

impl Default for SftOptions {
    fn default() -> Self {
        SftOptions {
            base: PathBuf::new(),
            data: Vec::new(),
            out: PathBuf::new(),
            format: ChatFormat::Auto,
            template: None,
            batch_size: 8,
            max_len: None,
            val_fraction: 0.05,
            val_data: Vec::new(),
            on_error: OnError::Skip,
            mix_pretrain: None,
            mix_fraction: 0.1,
            lora: None,
            train: LoopOptions {
                steps: 300,
                lr: 1e-3,
                warmup_steps: 20,
                eval_every: 50,
                ..Default::default()
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SftReport {
    pub steps: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub skipped: usize,
    /// Assistant-token validation loss (nats per token) before and after.
    pub val_loss_before: f64,
    pub val_loss: f64,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// Weights that were trained (the adapters only, with LoRA) and all weights.
    pub trained_parameters: usize,
    pub model_parameters: usize,
    /// Peak resident memory of the process (MB).
    pub peak_rss_mb: f64,
    #[serde(skip)]
    pub losses: Vec<(usize, f64)>,
}

/// Reads and renders conversations, applying the on-error policy.
fn load_examples(
    files: &[PathBuf],
    opts: &SftOptions,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<(Vec<RenderedChat>, usize)> {
    let mut examples = Vec::new();
    let mut skipped = 0;
    let mut shown = 0;
    let mut reject = |location: &str, reason: &str| -> Result<()> {
        if opts.on_error == OnError::Fail {
            bail!("{location}: {reason} (use --on-error skip to leave such records out)");
        }
        skipped += 1;
        if shown < 3 && !opts.train.quiet {
            eprintln!("skipping {location}: {reason}");
            shown += 1;
        }
        Ok(())
    };
    for file in files {
        let f = read_chat_file(file, opts.format)?;
        for b in &f.bad {
            reject(&b.location, &b.reason)?;
        }
        for (i, conv) in f.conversations.iter().enumerate() {
            let r = render(tok, template, conv, false)?;
            if r.ids.len() > max_len {
                reject(
                    &format!("{} conversation {}", file.display(), i + 1),
                    &format!(
                        "{} tokens, longer than the {max_len}-token limit (--max-len)",
                        r.ids.len()
                    ),
                )?;
            } else {
                examples.push(r);
            }
        }
    }
    Ok((examples, skipped))
}

struct SftStage {
    train: Vec<RenderedChat>,
    val: Vec<RenderedChat>,
    batch_size: usize,
    pad: u32,
    mix: Option<(ShardSet, usize)>,
    device: Device,
}

impl SftStage {
    /// Right-padded inputs, targets and target mask for `rows` (a mask of `None` trains every
    /// token: pretraining text mixed in).
    fn tensors(&self, rows: &[(&[u32], Option<&[u8]>)]) -> Result<(Tensor, Tensor, Tensor)> {
        let len = rows
            .iter()
            .map(|(ids, _)| ids.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let (mut x, mut y, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for (ids, mask) in rows {
            for t in 0..len - 1 {
                x.push(ids.get(t).copied().unwrap_or(self.pad));
                y.push(ids.get(t + 1).copied().unwrap_or(self.pad));
                let trained = t + 1 < ids.len() && mask.is_none_or(|m| m[t + 1] != 0);
                m.push(if trained { 1.0f32 } else { 0.0 });
            }
        }
        let shape = (rows.len(), len - 1);
        Ok((
            Tensor::from_vec(x, shape, &self.device)?,
            Tensor::from_vec(y, shape, &self.device)?,
            Tensor::from_vec(m, shape, &self.device)?,
        ))
    }

    /// The summed masked loss of `rows`, run in groups of similar length (see
    /// [`length_groups`]), and the tokens computed.
    fn summed_loss(
        &self,
        model: &Llama,
        rows: &[(&[u32], Option<&[u8]>)],
    ) -> Result<(Tensor, f64, usize)> {
        let lens: Vec<usize> = rows.iter().map(|(ids, _)| ids.len()).collect();
        let (mut total, mut count, mut computed) = (None, 0.0, 0);
        for group in length_groups(&lens) {
            let group: Vec<_> = group.iter().map(|&i| rows[i]).collect();
            let (x, y, m) = self.tensors(&group)?;
            computed += x.elem_count();
            let (t, c) = Self::masked_loss(model, &x, &y, &m)?;
            count += c;
            total = Some(match total {
                None => t,
                Some(sum) => (sum + t)?,
            });
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::zeros((), DType::F32, &self.device)?,
        };
        Ok((total, count, computed))
    }

    fn masked_loss(model: &Llama, x: &Tensor, y: &Tensor, m: &Tensor) -> Result<(Tensor, f64)> {
        let nll = model.token_nll(x, y)?;
        let count = m.sum_all()?.to_scalar::<f32>()? as f64;
        let total = (nll * m)?.sum_all()?;
        Ok((total, count))
    }
}

impl Stage for SftStage {
    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)> {
        let chats: Vec<&RenderedChat> = (0..self.batch_size)
            .map(|_| &self.train[rng.below(self.train.len() as u64) as usize])
            .collect();
        let mut extra = Vec::new();
        if let Some((shards, k)) = &self.mix {
            let len = chats.iter().map(|r| r.ids.len()).max().unwrap_or(2).max(2);
            let (x, _) =
                super::pretrain::sample_batch(&shards.train, rng, *k, len - 1, &self.device)?;
            let windows: Vec<Vec<u32>> = x.to_vec2()?;
            extra = windows;
        }
        let rows: Vec<(&[u32], Option<&[u8]>)> = chats
            .iter()
            .map(|r| (r.ids.as_slice(), Some(r.mask.as_slice())))
            .chain(extra.iter().map(|e| (e.as_slice(), None)))
            .collect();
        // Every rank divides its part's summed loss by the whole batch's count of trained tokens.
        let trained = |(ids, mask): &(&[u32], Option<&[u8]>)| match mask {
            Some(m) => m
                .iter()
                .take(ids.len())
                .skip(1)
                .filter(|&&b| b != 0)
                .count(),
            None => ids.len().saturating_sub(1),
        };
        let count = rows.iter().map(trained).sum::<usize>() as f64;
        let mine = &rows[part.rows(rows.len())];
        let (total, _, _) = self.summed_loss(model, mine)?;
        let tokens = mine.iter().map(|(ids, _)| ids.len()).sum();
        Ok(((total / count.max(1.0))?, tokens))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>> {
        let (mut sum, mut count) = (0.0, 0.0);
        for chunk in self.val.chunks(self.batch_size) {
            let rows: Vec<(&[u32], Option<&[u8]>)> = chunk
                .iter()
                .map(|r| (r.ids.as_slice(), Some(r.mask.as_slice())))
                .collect();
            let (total, c, _) = self.summed_loss(model, &rows)?;
            sum += total.to_scalar::<f32>()? as f64;
            count += c;
        }
        Ok(vec![("val_loss".into(), sum / count.max(1.0))])
    }
}

/// Fine-tunes a base run on conversations and writes the SFT run.
pub fn sft(opts: &SftOptions) -> Result<SftReport> {
    if opts.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if opts.data.is_empty() {
        bail!("no --data files given");
    }
    crate::util::check_range("--val-fraction", opts.val_fraction, 0.0..=0.9)?;
    crate::util::check_range("--mix-fraction", opts.mix_fraction, 0.0..=1.0)?;
    let base = &opts.base;
    let (config, tok) = crate::model::load_config_and_tokenizer(base)
        .map_err(|e| anyhow::anyhow!("--base: {e:#}"))?;
    let template = match &opts.template {
        Some(name) => ChatTemplate::by_name(name)?,
        None => ChatTemplate::detect(&tok)
            .map_err(|e| anyhow::anyhow!("base model {}: {e}", base.display()))?,
    };
    // Check the template's tokens exist before reading any data.
    render(&tok, &template, &[], true)
        .map_err(|e| anyhow::anyhow!("base model {}: {e}", base.display()))?;
    let max_len = opts
        .max_len
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let (mut train_set, mut skipped) = load_examples(&opts.data, opts, &tok, &template, max_len)?;
    let val_set = if opts.val_data.is_empty() {
        let (kept, held) = util::hold_out_every(train_set, util::stride_for(opts.val_fraction));
        train_set = kept;
        held
    } else {
        let (v, s) = load_examples(&opts.val_data, opts, &tok, &template, max_len)?;
        skipped += s;
        v
    };
    if train_set.is_empty() {
        bail!("no usable training conversations in {:?}", opts.data);
    }
    if val_set.is_empty() {
        bail!("no validation conversations: add data, raise --val-fraction or give --val-data");
    }
    if !opts.train.quiet {
        eprintln!(
            "sft: {} train / {} validation conversations ({} skipped), template {:?}, {} assistant tokens",
            train_set.len(),
            val_set.len(),
            skipped,
            template_name(&template),
            train_set.iter().map(|r| r.trained_tokens()).sum::<usize>()
        );
    }
    let mix = match &opts.mix_pretrain {
        Some(dir) if opts.mix_fraction > 0.0 => {
            let k = ((opts.batch_size as f64 * opts.mix_fraction).round() as usize).max(1);
            Some((ShardSet::open(dir)?, k))
        }
        _ => None,
    };
    let (n_train, n_val) = (train_set.len(), val_set.len());
    let mut stage = SftStage {
        train: train_set,
        val: val_set,
        batch_size: opts.batch_size,
        pad: tok.special_id("<|pad|>").unwrap_or(0),
        mix,
        device: Device::Cpu,
    };
    let spec = RunSpec {
        stage: "sft",
        out: &opts.out,
        config: &config,
        tokenizer: &tok,
        start: Start::From(base.clone()),
        hyper: serde_json::to_value(opts)?,
        parents: vec![base.display().to_string()],
        data: serde_json::json!({"files": opts.data, "val_files": opts.val_data,
            "train_conversations": n_train, "val_conversations": n_val, "skipped": skipped}),
        lora: opts.lora.clone(),
        batch_size: opts.batch_size,
    };
    let r = train(&opts.train, spec, &mut stage)?;
    let before = r
        .eval_before
        .iter()
        .find(|(k, _)| k == "val_loss")
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN);
    Ok(SftReport {
        steps: r.steps,
        train_examples: n_train,
        val_examples: n_val,
        skipped,
        val_loss_before: before,
        val_loss: r.metric("val_loss"),
        tokens_per_second: r.tokens_per_second,
        seconds: r.seconds,
        trained_parameters: r.parameters,
        model_parameters: config.parameter_count(),
        peak_rss_mb: r.peak_rss_mb,
        losses: r.losses,
    })
}

fn template_name(t: &ChatTemplate) -> &'static str {
    match t {
        ChatTemplate::Chatforge => "chatforge",
        ChatTemplate::ChatMl => "chatml",
        ChatTemplate::Llama3 => "llama3",
        ChatTemplate::Jinja(_) => "jinja",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    #[test]
    fn a_batch_of_mixed_lengths_sums_the_loss_each_row_has_alone() {
        let config = LlamaConfig::small(64, 64);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Llama::new(&config, vb).unwrap();
        crate::model::llama::seeded_init(&config, &varmap, &mut Rng::new(9), false).unwrap();
        let stage = SftStage {
            train: Vec::new(),
            val: Vec::new(),
            batch_size: 8,
            pad: 0,
            mix: None,
            device: Device::Cpu,
        };
        // Short and long conversations; the masks train the second half of each (the reply),
        // and one row of pretraining text trains everything.
        let ids: Vec<Vec<u32>> = (0..9)
            .map(|i| {
                let len = if i % 3 == 0 { 50 + i } else { 4 + i };
                (0..len).map(|t| ((t * 5 + i) % 60) as u32 + 1).collect()
            })
            .collect();
        let masks: Vec<Vec<u8>> = ids
            .iter()
            .map(|s| (0..s.len()).map(|t| (2 * t >= s.len()) as u8).collect())
            .collect();
        let rows: Vec<(&[u32], Option<&[u8]>)> = ids
            .iter()
            .zip(&masks)
            .enumerate()
            .map(|(i, (s, m))| (s.as_slice(), (i != 4).then_some(m.as_slice())))
            .collect();
        let (total, count, computed) = stage.summed_loss(&model, &rows).unwrap();
        let total = total.to_scalar::<f32>().unwrap() as f64;
        let (mut alone, mut alone_count) = (0.0, 0.0);
        for row in &rows {
            let (t, c, _) = stage.summed_loss(&model, &[*row]).unwrap();
            alone += t.to_scalar::<f32>().unwrap() as f64;
            alone_count += c;
        }
        assert_eq!(count, alone_count);
        assert!(
            (total - alone).abs() < 1e-3 * alone.abs(),
            "{total} vs {alone}"
        );
        // Padding every row to the longest would have computed 9 × 57 positions.
        assert!(computed < 9 * 57 * 6 / 10, "{computed}");
    }
}
