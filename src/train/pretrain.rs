//! Pretraining: next-token prediction on token shards.

use super::checkpoint::{self, Checkpoint, TrainState};
use super::optim::{lr_at, AdamW, AdamWConfig, GradAccumulator};
use crate::data::shards::{ShardSet, TokenSplit};
use crate::model::llama::{parameter_count, seeded_init};
use crate::model::{Llama, LlamaConfig};
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Hyperparameters of a pretraining run (recorded in checkpoints and chatforge.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub config: Option<PathBuf>,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub eval_tokens: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub resume: bool,
    /// Stop (as if killed) right after this step's checkpoint: for testing resume.
    #[serde(skip)]
    pub halt_after: Option<usize>,
    #[serde(skip)]
    pub quiet: bool,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions {
            data: PathBuf::new(),
            out: PathBuf::new(),
            config: None,
            steps: 1000,
            batch_size: 16,
            seq_len: 256,
            grad_accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            eval_every: 100,
            eval_tokens: 32_768,
            log_every: 10,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            resume: false,
            halt_after: None,
            quiet: false,
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
    let device = model.device().clone();
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
    let (mut nll_sum, mut count, mut nll_bytes, mut bytes) = (0.0f64, 0usize, 0.0f64, 0u64);
    for chunk in windows.chunks(batch) {
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

fn append_metrics(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{value}")?;
    Ok(())
}

fn say(pb: &ProgressBar, quiet: bool, msg: String) {
    if quiet {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// The model config for a run: from `--config` (checked against the tokenizer) or the default.
fn resolve_config(opts: &PretrainOptions, tokenizer: &Tokenizer) -> Result<LlamaConfig> {
    let mut cfg = match &opts.config {
        Some(p) => LlamaConfig::load(p)?,
        None => LlamaConfig::small(tokenizer.vocab_size(), opts.seq_len),
    };
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

/// Runs (or resumes) pretraining and writes the run directory.
pub fn pretrain(opts: &PretrainOptions) -> Result<PretrainReport> {
    if opts.steps == 0 || opts.batch_size == 0 || opts.seq_len < 2 || opts.grad_accum == 0 {
        bail!("--steps, --batch-size and --grad-accum must be positive and --seq-len at least 2");
    }
    let device = Device::Cpu;
    let shards = ShardSet::open(&opts.data)?;
    let tokenizer = shards.tokenizer()?;
    let config = resolve_config(opts, &tokenizer)?;
    let run = &opts.out;
    let existing = checkpoint::list_checkpoints(run)?;
    if !opts.resume && (!existing.is_empty() || run.join("model.safetensors").exists()) {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            run.display()
        );
    }
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))?;

    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut rng = Rng::new(opts.seed);
    let model = Llama::new(&config, vb)?;
    seeded_init(&config, &varmap, &mut rng)?;
    let mut optimizer = AdamW::new(
        &varmap,
        AdamWConfig {
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let metrics_path = run.join("metrics.jsonl");
    let (mut step, mut tokens_seen, mut elapsed_before) = (0usize, 0u64, 0.0f64);
    if opts.resume {
        if let Some((_, dir)) = existing.last() {
            let ck = Checkpoint::load(dir)?;
            ck.restore_weights(&mut varmap, &config)?;
            optimizer.load_state(&ck.optimizer, ck.state.step)?;
            step = ck.state.step;
            tokens_seen = ck.state.tokens_seen;
            elapsed_before = ck.state.elapsed_s;
            rng = ck.state.rng.clone();
            checkpoint::truncate_metrics(&metrics_path, step)?;
            if !opts.quiet {
                eprintln!("resuming {} from step {step}", run.display());
            }
        } else {
            let _ = std::fs::remove_file(&metrics_path);
        }
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let params = parameter_count(&varmap);
    let meta = &shards.meta;
    if !opts.quiet {
        eprintln!(
            "model: {} parameters ({} layers, width {}, {} heads / {} kv heads, context {}); data: {} train tokens, {} val tokens; unigram entropy {:.3} nats/token",
            util::human_count(params as f64),
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
    let hyper = serde_json::to_value(opts)?;
    let tokens_per_step = (opts.batch_size * opts.seq_len * opts.grad_accum) as u64;
    let pb = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(opts.steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "pretrain {bar:25} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    pb.set_position(step as u64);
    let start = Instant::now();
    let start_step = step;
    let mut losses = Vec::new();
    let mut last_loss = f64::NAN;
    let (mut val_loss, mut val_bpb) = (f64::NAN, f64::NAN);
    let token_bytes = tokenizer.token_bytes().to_vec();
    while step < opts.steps {
        let lr = lr_at(
            step,
            opts.steps,
            opts.warmup_steps,
            opts.lr,
            opts.min_lr_ratio,
        );
        let mut acc = GradAccumulator::new(optimizer.params.len());
        let mut loss_sum = 0.0;
        for _ in 0..opts.grad_accum {
            let (x, y) = sample_batch(
                &shards.train,
                &mut rng,
                opts.batch_size,
                opts.seq_len,
                &device,
            )?;
            let loss = model.loss(&x, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let scaled = (loss / opts.grad_accum as f64)?;
            acc.add(&optimizer.params, &scaled.backward()?)?;
        }
        let (grads, grad_norm) = acc.finish(&optimizer.params, opts.grad_clip)?;
        optimizer.apply(&grads, lr)?;
        step += 1;
        tokens_seen += tokens_per_step;
        last_loss = loss_sum / opts.grad_accum as f64;
        if !last_loss.is_finite() {
            bail!("training diverged at step {step} (loss {last_loss}); lower --lr");
        }
        losses.push((step, last_loss));
        let secs = start.elapsed().as_secs_f64();
        let tps = ((step - start_step) as u64 * tokens_per_step) as f64 / secs.max(1e-9);
        pb.set_position(step as u64);
        pb.set_message(format!(
            "loss {last_loss:.4} | {} tok/s | lr {lr:.2e}",
            util::human_count(tps)
        ));
        if step % opts.log_every == 0 || step == opts.steps {
            append_metrics(
                &metrics_path,
                &serde_json::json!({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens_seen, "tokens_per_s": tps, "elapsed_s": elapsed_before + secs}),
            )?;
        }
        if step % opts.eval_every == 0 || step == opts.steps {
            (val_loss, val_bpb) = evaluate(
                &model,
                &shards.val,
                &token_bytes,
                opts.batch_size,
                opts.seq_len,
                opts.eval_tokens,
            )?;
            append_metrics(
                &metrics_path,
                &serde_json::json!({"step": step, "val_loss": val_loss, "val_bpb": val_bpb}),
            )?;
            say(
                &pb,
                opts.quiet,
                format!(
                    "step {step:>6}: train loss {last_loss:.4}, val loss {val_loss:.4} (unigram {:.4}), val {val_bpb:.4} bits/byte",
                    meta.unigram_val_nats
                ),
            );
        }
        let halt = opts.halt_after == Some(step);
        if step % opts.checkpoint_every == 0 || step == opts.steps || halt {
            let state = TrainState {
                stage: "pretrain".into(),
                step,
                total_steps: opts.steps,
                tokens_seen,
                elapsed_s: elapsed_before + start.elapsed().as_secs_f64(),
                rng: rng.clone(),
                config: config.clone(),
                hyper: hyper.clone(),
            };
            checkpoint::save(
                run,
                &varmap,
                &optimizer.state(),
                &tokenizer,
                &state,
                opts.keep_checkpoints,
            )?;
        }
        if halt {
            break;
        }
    }
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let report = PretrainReport {
        steps: step,
        parameters: params,
        final_train_loss: last_loss,
        val_loss,
        val_bpb,
        unigram_entropy_nats: meta.unigram_entropy_nats,
        unigram_val_nats: meta.unigram_val_nats,
        tokens_seen,
        tokens_per_second: ((step - start_step) as u64 * tokens_per_step) as f64
            / seconds.max(1e-9),
        seconds: elapsed_before + seconds,
        losses,
    };
    if step == opts.steps {
        write_run(run, &varmap, &config, &tokenizer, opts, &report)?;
    }
    Ok(report)
}

/// The finished run directory: the model files at the top level plus provenance and the report.
fn write_run(
    run: &Path,
    varmap: &VarMap,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    opts: &PretrainOptions,
    report: &PretrainReport,
) -> Result<()> {
    util::write_json_atomic(&run.join("config.json"), config)?;
    tokenizer.save(run)?;
    let weights = run.join("model.safetensors");
    util::write_atomic_with(&weights, |tmp| Ok(varmap.save(tmp)?))?;
    util::write_json_atomic(
        &run.join("chatforge.json"),
        &serde_json::json!({
            "stage": "pretrain",
            "parents": [],
            "data": opts.data,
            "hyperparameters": opts,
            "git_commit": checkpoint::git_commit(),
            "chatforge_version": env!("CARGO_PKG_VERSION"),
        }),
    )?;
    let mut summary = serde_json::to_value(report)?;
    summary.as_object_mut().map(|o| o.remove("losses"));
    util::write_json_atomic(&run.join("report.json"), &summary)
}
