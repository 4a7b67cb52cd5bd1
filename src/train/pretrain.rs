//! Pretraining: next-token prediction on token shards.

use super::trainer::{train, LoopOptions, RunSpec, Stage, Start};
use crate::data::shards::{ShardSet, TokenSplit};
use crate::dist::Part;
use crate::model::switches::ArchSwitches;
use crate::model::{Llama, LlamaConfig};
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Settings of a pretraining run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub config: Option<PathBuf>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Validation tokens per evaluation.
    pub eval_tokens: usize,
    /// Architecture switches over the config (and the zero start of a fresh model).
    #[serde(default)]
    pub switches: ArchSwitches,
    #[serde(skip)]
    pub train: LoopOptions,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions {
            data: PathBuf::new(),
            out: PathBuf::new(),
            config: None,
            batch_size: 16,
            seq_len: 256,
            eval_tokens: 32_768,
            switches: ArchSwitches::default(),
            train: LoopOptions::default(),
        }
    }
}

/// What a finished (or halted) run reports.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainReport {
    pub steps: usize,
    pub parameters: usize,
    pub final_train_loss: f64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub unigram_entropy_nats: f64,
    pub unigram_val_nats: f64,
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
    pub seconds: f64,
    #[serde(skip)]
    pub losses: Vec<(usize, f64)>,
}

/// Draws training windows of `seq_len + 1` tokens at random positions (weighted by shard size).
pub fn sample_batch(
    split: &TokenSplit,
    rng: &mut Rng,
    batch: usize,
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let usable: Vec<(usize, usize)> = split
        .shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.len() > seq_len)
        .map(|(i, s)| (i, s.len() - seq_len))
        .collect();
    let total: usize = usable.iter().map(|(_, n)| n).sum();
    if total == 0 {
        bail!(
            "the train split has no window of {} tokens; use a smaller --seq-len or more data",
            seq_len + 1
        );
    }
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    let mut window = Vec::with_capacity(seq_len + 1);
    for _ in 0..batch {
        let mut r = rng.below(total as u64) as usize;
        let (shard, start) = usable
            .iter()
            .find_map(|&(i, n)| {
                if r < n {
                    Some((i, r))
                } else {
                    r -= n;
                    None
                }
            })
            .expect("r < total");
        window.clear();
        split.shards[shard].read_into(start, seq_len + 1, &mut window);
        inputs.extend_from_slice(&window[..seq_len]);
        targets.extend_from_slice(&window[1..]);
    }
    Ok((
        Tensor::from_vec(inputs, (batch, seq_len), device)?,
        Tensor::from_vec(targets, (batch, seq_len), device)?,
    ))
}

/// Mean loss (nats/token) and bits per byte over up to `max_tokens` of a split, in fixed
/// consecutive windows so every evaluation sees the same tokens.
pub fn evaluate(
    model: &Llama,
    split: &TokenSplit,
    token_bytes: &[u32],
    batch: usize,
    seq_len: usize,
    max_tokens: usize,
) -> Result<(f64, f64)> {
    let mut windows: Vec<Vec<u32>> = Vec::new();
    'outer: for shard in &split.shards {
        let mut start = 0;
        while start + seq_len < shard.len() {
            if windows.len() * seq_len >= max_tokens {
                break 'outer;
            }
            let mut w = Vec::with_capacity(seq_len + 1);
            shard.read_into(start, seq_len + 1, &mut w);
            windows.push(w);
            start += seq_len;
        }
    }
    if windows.is_empty() {
        bail!(
            "the validation split has fewer than {} tokens; raise --val-fraction when tokenizing or lower --seq-len",
            seq_len + 1
        );
    }
    evaluate_windows(model, &windows, token_bytes, batch)
}

/// Mean loss (nats/token) and bits per byte over windows of equal length (inputs then the last
/// target); special-token targets count in the loss but carry no bytes.
pub fn evaluate_windows(
    model: &Llama,
    windows: &[Vec<u32>],
    token_bytes: &[u32],
    batch: usize,
) -> Result<(f64, f64)> {
    let device = model.device().clone();
    let seq_len = windows.first().map_or(1, |w| w.len() - 1);
    let (mut nll_sum, mut count, mut nll_bytes, mut bytes) = (0.0f64, 0usize, 0.0f64, 0u64);
    for chunk in windows.chunks(batch.max(1)) {
        let b = chunk.len();
        let inputs: Vec<u32> = chunk
            .iter()
            .flat_map(|w| w[..seq_len].iter().copied())
            .collect();
        let targets: Vec<u32> = chunk.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let ids = Tensor::from_vec(inputs, (b, seq_len), &device)?;
        let tg = Tensor::from_vec(targets.clone(), (b, seq_len), &device)?;
        let nll: Vec<f32> = model.token_nll(&ids, &tg)?.flatten_all()?.to_vec1()?;
        for (l, t) in nll.iter().zip(&targets) {
            nll_sum += *l as f64;
            count += 1;
            let nb = token_bytes.get(*t as usize).copied().unwrap_or(0);
            if nb > 0 {
                nll_bytes += *l as f64;
                bytes += nb as u64;
            }
        }
    }
    let bpb = nll_bytes / (std::f64::consts::LN_2 * bytes.max(1) as f64);
    Ok((nll_sum / count as f64, bpb))
}

/// The model config for a run: from `--config` (checked against the tokenizer) or the default.
fn resolve_config(opts: &PretrainOptions, tokenizer: &Tokenizer) -> Result<LlamaConfig> {
    let (mut cfg, source) = match &opts.config {
        Some(p) => (LlamaConfig::load(p)?, p.display().to_string()),
        None => (
            LlamaConfig::small(tokenizer.vocab_size(), opts.seq_len),
            "the default model config".into(),
        ),
    };
    opts.switches.apply(&mut cfg, &source)?;
    cfg.validate(&source)?;
    if cfg.vocab_size < tokenizer.vocab_size() {
        bail!(
            "{}: vocab_size {} is smaller than the tokenizer's {} tokens",
            opts.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.vocab_size,
            tokenizer.vocab_size()
        );
    }
    if cfg.max_position_embeddings < opts.seq_len {
        bail!(
            "--seq-len {} is longer than the model's max_position_embeddings {}",
            opts.seq_len,
            cfg.max_position_embeddings
        );
    }
    cfg.bos_token_id = tokenizer.bos_id();
    cfg.eos_token_id = tokenizer.bos_id().map(|b| serde_json::json!(b));
    Ok(cfg)
}

/// Next-token prediction on random windows of the train split.
struct PretrainStage<'a> {
    shards: &'a ShardSet,
    token_bytes: Vec<u32>,
    batch_size: usize,
    seq_len: usize,
    eval_tokens: usize,
    device: Device,
}

impl Stage for PretrainStage<'_> {
    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)> {
        let (x, y) = sample_batch(
            &self.shards.train,
            rng,
            self.batch_size,
            self.seq_len,
            &self.device,
        )?;
        // Every row holds seq_len targets, so the part's mean weighs by its share of rows.
        let rows = part.rows(self.batch_size);
        let (x, y) = (
            x.narrow(0, rows.start, rows.len())?,
            y.narrow(0, rows.start, rows.len())?,
        );
        let loss = (model.loss(&x, &y)? * part.share(self.batch_size))?;
        Ok((loss, rows.len() * self.seq_len))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>> {
        let (loss, bpb) = evaluate(
            model,
            &self.shards.val,
            &self.token_bytes,
            self.batch_size,
            self.seq_len,
            self.eval_tokens,
        )?;
        Ok(vec![("val_loss".into(), loss), ("val_bpb".into(), bpb)])
    }
}

/// Runs (or resumes) pretraining and writes the run directory.
pub fn pretrain(opts: &PretrainOptions) -> Result<PretrainReport> {
    if opts.batch_size == 0 || opts.seq_len < 2 {
        bail!("--batch-size must be positive and --seq-len at least 2");
    }
    let shards = ShardSet::open(&opts.data)?;
    let tokenizer = shards.tokenizer()?;
    let config = resolve_config(opts, &tokenizer)?;
    let meta = &shards.meta;
    if !opts.train.quiet {
        eprintln!(
            "model: {} layers, width {}, {} heads / {} kv heads, context {}; data: {} train tokens, {} val tokens; unigram entropy {:.3} nats/token",
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
            config.max_position_embeddings,
            util::human_count(meta.train.tokens as f64),
            util::human_count(meta.val.tokens as f64),
            meta.unigram_entropy_nats
        );
    }
    let mut stage = PretrainStage {
        shards: &shards,
        token_bytes: tokenizer.token_bytes().to_vec(),
        batch_size: opts.batch_size,
        seq_len: opts.seq_len,
        eval_tokens: opts.eval_tokens,
        device: Device::Cpu,
    };
    let spec = RunSpec {
        stage: "pretrain",
        out: &opts.out,
        config: &config,
        tokenizer: &tokenizer,
        start: Start::Fresh {
            zero_outputs: opts.switches.zero_start(),
        },
        hyper: serde_json::to_value(opts)?,
        parents: Vec::new(),
        data: serde_json::json!({"shards": opts.data, "sources": meta.sources,
            "train_tokens": meta.train.tokens, "val_tokens": meta.val.tokens}),
        lora: None,
        batch_size: opts.batch_size,
    };
    let r = train(&opts.train, spec, &mut stage)?;
    Ok(PretrainReport {
        steps: r.steps,
        parameters: r.parameters,
        final_train_loss: r.final_train_loss,
        val_loss: r.metric("val_loss"),
        val_bpb: r.metric("val_bpb"),
        unigram_entropy_nats: meta.unigram_entropy_nats,
        unigram_val_nats: meta.unigram_val_nats,
        tokens_seen: r.tokens_seen,
        tokens_per_second: r.tokens_per_second,
        seconds: r.seconds,
        losses: r.losses,
    })
}
