//! The training loop every stage shares: initialisation or resume, AdamW with warmup + cosine,
//! gradient accumulation and clipping, periodic evaluation, metrics.jsonl, a progress bar, atomic
//! checkpoints, and the finished run directory. A stage supplies batches and evaluation.
//!
//! Under mpirun each rank computes its part of every batch, gradients and losses are summed
//! across ranks before clipping, and rank 0 alone evaluates and writes (see `crate::dist`).

use super::checkpoint::{self, Checkpoint, TrainState};
use super::optim::{lr_at, GradAccumulator, MatrixOptimizer, Optimizer, OptimizerConfig, Schedule};
use crate::dist::{self, Part};
use crate::model::llama::{parameter_count, seeded_init};
use crate::model::lora::LoraConfig;
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

/// Optimisation and bookkeeping settings shared by all stages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoopOptions {
    pub steps: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// A step whose loss or gradient is not finite is skipped (weights untouched); this many in a
    /// row stop the run.
    #[serde(default = "default_max_bad_steps")]
    pub max_bad_steps: usize,
    /// bf16 runs the projections' matmuls with bf16 operands (mixed precision); auto does where
    /// the CPU has a bf16 kernel.
    #[serde(default)]
    pub precision: super::Precision,
    /// The blocks' weight matrices' update: AdamW or Muon.
    #[serde(default)]
    pub optimizer: MatrixOptimizer,
    /// Muon's peak learning rate (the schedule scales it as it scales `lr`).
    #[serde(default = "default_muon_lr")]
    pub muon_lr: f64,
    /// The learning rate's fall after warmup.
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(skip)]
    pub resume: bool,
    /// Stop (as if killed) right after this step's checkpoint: for testing resume.
    #[serde(skip)]
    pub halt_after: Option<usize>,
    #[serde(skip)]
    pub quiet: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            steps: 1000,
            grad_accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            eval_every: 100,
            log_every: 10,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            max_bad_steps: default_max_bad_steps(),
            precision: super::Precision::Auto,
            optimizer: MatrixOptimizer::default(),
            muon_lr: default_muon_lr(),
            schedule: Schedule::default(),
            resume: false,
            halt_after: None,
            quiet: false,
        }
    }
}

impl LoopOptions {
    /// Every number in its range, refused by its flag's name.
    pub fn validate(&self) -> Result<()> {
        use crate::util::{check_positive, check_range};
        check_positive("--steps", self.steps)?;
        check_positive("--grad-accum", self.grad_accum)?;
        check_positive("--eval-every", self.eval_every)?;
        check_positive("--log-every", self.log_every)?;
        check_positive("--checkpoint-every", self.checkpoint_every)?;
        check_range("--lr", self.lr, f64::MIN_POSITIVE..=10.0)?;
        check_range("--min-lr-ratio", self.min_lr_ratio, 0.0..=1.0)?;
        check_range("--weight-decay", self.weight_decay, 0.0..=10.0)?;
        check_range("--grad-clip", self.grad_clip, 0.0..=f64::MAX)?;
        check_range("--muon-lr", self.muon_lr, f64::MIN_POSITIVE..=10.0)?;
        Ok(())
    }
}

fn default_max_bad_steps() -> usize {
    5
}

/// Muon's usual peak rate (Keller Jordan's default, which nanochat keeps).
fn default_muon_lr() -> f64 {
    0.02
}

/// What a stage contributes to the loop.
pub trait Stage {
    /// Draws one micro-batch with `rng` (the whole global batch, so every rank's RNG moves
    /// alike) and returns `part`'s share of its mean loss, the part's summed loss over the whole
    /// batch's count (so the parts' shares add up to the mean), and the tokens the part processed.
    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)>;
    /// Held-out metrics; the first is the headline (lower is better).
    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>>;
    /// Creates trainable tensors beyond the language model (a reward or value head) in the run's
    /// VarMap and returns their names: these may be missing from the starting weights.
    fn build_heads(&mut self, _vb: VarBuilder) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Learning-rate multiplier for the heads of [`Stage::build_heads`].
    fn head_lr_scale(&self) -> f64 {
        1.0
    }
    /// Whether a language-model weight trains (a stage may freeze some: 0 learning rate).
    fn trains(&self, _name: &str) -> bool {
        true
    }
    /// State beyond the weights, optimizer and RNG that a resumed run needs to continue exactly
    /// (saved in each checkpoint).
    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// Takes back what [`Stage::state`] saved.
    fn restore(&mut self, _state: serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Stage statistics of the latest step (rollout reward, KL...), logged with the loss. Under
    /// mpirun they are this rank's, averaged over the ranks by position: every rank must give the
    /// same names in the same order.
    fn step_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

/// Where the weights of a new run come from.
pub enum Start {
    /// Fresh weights from the seeded initialiser; `zero_outputs` starts the blocks' output
    /// projections at zero (see `seeded_init`).
    Fresh { zero_outputs: bool },
    /// The weights of an earlier run or a Hugging Face directory (its safetensors, sharded or
    /// not, or its adapters merged).
    From(PathBuf),
}

/// The run being trained.
pub struct RunSpec<'a> {
    pub stage: &'static str,
    pub out: &'a Path,
    pub config: &'a LlamaConfig,
    pub tokenizer: &'a Tokenizer,
    pub start: Start,
    /// Stage-specific settings, recorded in checkpoints and chatforge.json.
    pub hyper: serde_json::Value,
    /// Parent runs and data, recorded in chatforge.json.
    pub parents: Vec<String>,
    pub data: serde_json::Value,
    /// Train LoRA adapters on the frozen starting weights instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Rows of the global batch, refused under mpirun unless the ranks split it evenly.
    pub batch_size: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoopReport {
    pub stage: String,
    pub steps: usize,
    pub finished: bool,
    pub parameters: usize,
    pub final_train_loss: f64,
    /// Latest evaluation metrics.
    pub eval: Vec<(String, f64)>,
    /// First evaluation of this invocation, taken before any training step when starting fresh.
    pub eval_before: Vec<(String, f64)>,
    pub tokens_seen: u64,
    /// Steps skipped because their loss or gradient was not finite.
    pub skipped_steps: usize,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// Seconds this invocation spent summing gradients across ranks (0 in one process).
    pub all_reduce_seconds: f64,
    /// Peak resident memory of the process when training finished.
    pub peak_rss_mb: f64,
    #[serde(skip)]
    pub losses: Vec<(usize, f64)>,
}

impl LoopReport {
    pub fn metric(&self, name: &str) -> f64 {
        self.eval
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    }
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

fn metrics_json(step: usize, metrics: &[(String, f64)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), step.into());
    for (k, v) in metrics {
        m.insert(k.clone(), serde_json::json!(v));
    }
    serde_json::Value::Object(m)
}

fn describe(metrics: &[(String, f64)]) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Trains (or resumes) a run with `stage` and writes the run directory when all steps are done.
pub fn train(opts: &LoopOptions, spec: RunSpec, stage: &mut dyn Stage) -> Result<LoopReport> {
    opts.validate()?;
    let world = dist::world();
    dist::check_divides("--batch-size", spec.batch_size, world.size())?;
    let (part, leader) = (Part::of_world(), dist::is_leader());
    // Under mpirun rank 0 alone shows progress.
    let quiet = opts.quiet || !leader;
    let device = Device::Cpu;
    let run = spec.out;
    let existing = checkpoint::list_checkpoints(run)?;
    if !opts.resume && (!existing.is_empty() || run.join("model.safetensors").exists()) {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            run.display()
        );
    }
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))?;
    let precision = opts.precision.apply()?;

    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut rng = Rng::new(opts.seed);
    let model = match (&spec.lora, &spec.start) {
        (None, _) => Llama::new(spec.config, vb.clone())?,
        // The starting weights stay frozen outside the VarMap: only adapters get gradients and
        // optimizer state.
        (Some(lora), Start::From(base)) => {
            let mut m = crate::model::load(base, &device)?.model;
            m.attach_lora(lora, vb.clone())?;
            m
        }
        (Some(_), Start::Fresh { .. }) => bail!("LoRA adapters need a base model to start from"),
    };
    let heads = stage.build_heads(vb)?;
    let zero_outputs = matches!(spec.start, Start::Fresh { zero_outputs: true });
    seeded_init(spec.config, &varmap, &mut rng, zero_outputs)?;
    if let (None, Start::From(base)) = (&spec.lora, &spec.start) {
        load_weights(&varmap, base, &heads)?
    }
    let mut optimizer = Optimizer::new(
        &varmap,
        OptimizerConfig {
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    if opts.optimizer == MatrixOptimizer::Muon {
        optimizer.use_muon(opts.muon_lr / opts.lr);
    }
    for p in optimizer.params.iter_mut() {
        if heads.contains(&p.name) {
            p.lr_scale = stage.head_lr_scale();
        } else if !stage.trains(&p.name) {
            p.lr_scale = 0.0;
        }
    }
    let metrics_path = run.join("metrics.jsonl");
    let (mut step, mut tokens_seen, mut elapsed_before) = (0usize, 0u64, 0.0f64);
    let resumed = match existing.last() {
        Some((_, dir)) if opts.resume => {
            let ck = Checkpoint::load(dir)?;
            if let Some(saved) = ck.state.optimizer.filter(|o| *o != opts.optimizer) {
                bail!(
                    "{} was trained with --optimizer {}; resume it with --optimizer {} (the saved moments belong to that optimizer), or start a new run with another --out",
                    run.display(),
                    saved.flag(),
                    saved.flag()
                );
            }
            ck.restore_weights(&mut varmap, spec.config)?;
            optimizer.load_state(&ck.optimizer, ck.state.step)?;
            step = ck.state.step;
            tokens_seen = ck.state.tokens_seen;
            elapsed_before = ck.state.elapsed_s;
            rng = ck.state.rng.clone();
            if let Some(state) = ck.state.stage_state.clone() {
                stage.restore(state)?;
            }
            if leader {
                checkpoint::truncate_metrics(&metrics_path, step)?;
            }
            if !quiet {
                eprintln!("resuming {} from step {step}", run.display());
            }
            true
        }
        _ => {
            if leader {
                let _ = std::fs::remove_file(&metrics_path);
            }
            false
        }
    };
    let params = parameter_count(&varmap);
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(opts.steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{} {{bar:25}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}",
            spec.stage
        ))
        .expect("valid template"),
    );
    pb.set_position(step as u64);
    say(
        &pb,
        quiet,
        format!(
            "{}: {params} parameters, matmuls on {}{}",
            spec.stage,
            precision.describe(),
            if world.size() > 1 {
                format!(", data parallel over {}", world.backend())
            } else {
                String::new()
            }
        ),
    );
    let eval_before = if resumed || !leader {
        Vec::new()
    } else {
        let m = stage.evaluate(&model)?;
        append_metrics(&metrics_path, &metrics_json(0, &m))?;
        say(&pb, quiet, format!("step {:>6}: {}", 0, describe(&m)));
        m
    };
    let start = Instant::now();
    let tokens_at_start = tokens_seen;
    let mut losses = Vec::new();
    let mut last_loss = f64::NAN;
    let mut last_eval = eval_before.clone();
    let (mut skipped, mut bad_in_a_row) = (0usize, 0usize);
    // Time spent summing gradients across ranks (waiting for the slowest included).
    let mut summing_s = 0.0f64;
    while step < opts.steps {
        let lr = lr_at(
            step,
            opts.steps,
            opts.warmup_steps,
            (opts.lr, opts.min_lr_ratio),
            opts.schedule,
        );
        let mut acc = GradAccumulator::new(optimizer.params.len());
        let mut loss_sum = 0.0;
        let mut step_tokens = 0u64;
        for _ in 0..opts.grad_accum {
            let (loss, tokens) = stage.batch_loss(&model, &mut rng, part)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            step_tokens += tokens as u64;
            let scaled = (loss / opts.grad_accum as f64)?;
            acc.add(&optimizer.params, &scaled.backward()?)?;
        }
        let summing = Instant::now();
        let grads = dist::sum_tensors(world, &acc.into_grads(&optimizer.params)?)?;
        let mut totals = [loss_sum, step_tokens as f64];
        world.sum_f64(&mut totals);
        summing_s += summing.elapsed().as_secs_f64();
        let (grads, grad_norm) = super::optim::clip(grads, opts.grad_clip)?;
        let (loss_sum, step_tokens) = (totals[0], totals[1] as u64);
        let loss = loss_sum / opts.grad_accum as f64;
        step += 1;
        tokens_seen += step_tokens;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            // A bad batch or a spike: skip the update so the weights stay as they were.
            skipped += 1;
            bad_in_a_row += 1;
            say(
                &pb,
                quiet,
                format!("step {step:>6}: loss {loss}, gradient norm {grad_norm}: not finite, step skipped ({skipped} so far)"),
            );
            if bad_in_a_row >= opts.max_bad_steps.max(1) {
                let last = checkpoint::list_checkpoints(run)?
                    .pop()
                    .map(|(_, p)| p.display().to_string())
                    .unwrap_or_else(|| "none yet".into());
                bail!(
                    "the loss was not finite for {bad_in_a_row} steps in a row (up to step {step}); stopped without saving them. Last good checkpoint: {last}. Lower --lr (or check the data), then rerun with --resume"
                );
            }
        } else {
            bad_in_a_row = 0;
            optimizer.apply(&grads, lr)?;
            last_loss = loss;
            losses.push((step, last_loss));
        }
        let secs = start.elapsed().as_secs_f64();
        let tps = (tokens_seen - tokens_at_start) as f64 / secs.max(1e-9);
        pb.set_position(step as u64);
        pb.set_message(format!(
            "loss {last_loss:.4} | {} tok/s | lr {lr:.2e}",
            util::human_count(tps)
        ));
        let extra = mean_over_ranks(world, stage.step_metrics());
        if leader && (step % opts.log_every.max(1) == 0 || step == opts.steps) {
            let mut line = serde_json::json!({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens_seen, "tokens_per_s": tps, "elapsed_s": elapsed_before + secs});
            for (k, v) in &extra {
                line[k] = serde_json::json!(v);
            }
            append_metrics(&metrics_path, &line)?;
        }
        if leader && (step % opts.eval_every.max(1) == 0 || step == opts.steps) {
            last_eval = stage.evaluate(&model)?;
            append_metrics(&metrics_path, &metrics_json(step, &last_eval))?;
            say(
                &pb,
                quiet,
                format!(
                    "step {step:>6}: train loss {last_loss:.4}, {}",
                    describe(&last_eval)
                ),
            );
        }
        let halt = opts.halt_after == Some(step);
        let due = step % opts.checkpoint_every.max(1) == 0 || step == opts.steps || halt;
        if leader && due {
            let state = TrainState {
                stage: spec.stage.into(),
                step,
                total_steps: opts.steps,
                tokens_seen,
                elapsed_s: elapsed_before + start.elapsed().as_secs_f64(),
                rng: rng.clone(),
                config: spec.config.clone(),
                hyper: spec.hyper.clone(),
                stage_state: stage.state()?,
                optimizer: Some(opts.optimizer),
            };
            checkpoint::save(
                run,
                &varmap,
                &optimizer.state(),
                spec.tokenizer,
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
    if world.size() > 1 {
        say(
            &pb,
            quiet,
            format!(
                "{}: {:.1} s of {seconds:.1} s ({:.1}%) went to summing gradients across the {} ranks",
                spec.stage,
                summing_s,
                100.0 * summing_s / seconds.max(1e-9),
                world.size()
            ),
        );
    }
    let report = LoopReport {
        stage: spec.stage.into(),
        steps: step,
        finished: step == opts.steps,
        parameters: params,
        final_train_loss: last_loss,
        eval: last_eval,
        eval_before,
        tokens_seen,
        skipped_steps: skipped,
        tokens_per_second: (tokens_seen - tokens_at_start) as f64 / seconds.max(1e-9),
        seconds: elapsed_before + seconds,
        all_reduce_seconds: summing_s,
        peak_rss_mb: util::peak_rss_mb(),
        losses,
    };
    if leader && report.finished {
        write_run(&spec, opts, precision.kernel, &varmap, &model, &report)?;
    }
    Ok(report)
}

/// Each rank's step statistics (means over its part) averaged over the ranks.
fn mean_over_ranks(
    world: &dyn dist::Collective,
    metrics: Vec<(String, f64)>,
) -> Vec<(String, f64)> {
    if world.size() == 1 {
        return metrics;
    }
    let mut values: Vec<f64> = metrics.iter().map(|(_, v)| *v).collect();
    world.sum_f64(&mut values);
    let n = world.size() as f64;
    metrics
        .into_iter()
        .zip(values)
        .map(|((k, _), v)| (k, v / n))
        .collect()
}

/// Loads starting weights into `varmap`; tensors named in `optional` (new heads) may be absent and
/// keep their initial values, any other missing tensor is an error naming it.
fn load_weights(varmap: &VarMap, path: &Path, optional: &[String]) -> Result<()> {
    let tensors = crate::model::weight_tensors(path)?;
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        match tensors.get(name) {
            Some(t) => {
                if t.dims() != var.dims() {
                    bail!(
                        "{}: tensor {name} has shape {:?} but the model of its config.json needs {:?} (an incompatible checkpoint?)",
                        path.display(),
                        t.dims(),
                        var.dims()
                    );
                }
                var.set(&t.to_dtype(var.dtype())?)?;
            }
            None if optional.contains(name) => {}
            None => bail!(
                "{} has no tensor {name} (an incompatible checkpoint?)",
                path.display()
            ),
        }
    }
    Ok(())
}

/// The finished run directory: the model files at the top level plus provenance and the report.
fn write_run(
    spec: &RunSpec,
    opts: &LoopOptions,
    kernel: crate::model::bf16::Kernel,
    varmap: &VarMap,
    model: &Llama,
    report: &LoopReport,
) -> Result<()> {
    let run = spec.out;
    // The precision that ran (`kernel`, with auto resolved).
    let recorded = LoopOptions {
        precision: if kernel.is_bf16() {
            super::Precision::Bf16
        } else {
            super::Precision::F32
        },
        ..opts.clone()
    };
    util::write_json_atomic(&run.join("config.json"), spec.config)?;
    spec.tokenizer.save(run)?;
    match (&spec.lora, &spec.start) {
        (Some(lora), Start::From(base)) => {
            // The adapters in PEFT's layout, and the merged weights so every tool loads the run.
            let adapters: std::collections::HashMap<String, Tensor> = varmap
                .data()
                .lock()
                .expect("varmap lock")
                .iter()
                .map(|(k, v)| {
                    (
                        format!("{}.{k}", crate::model::lora::PEFT_PREFIX),
                        v.as_tensor().clone(),
                    )
                })
                .collect();
            let base = base.canonicalize().unwrap_or_else(|_| base.clone());
            util::write_json_atomic(&run.join("adapter_config.json"), &lora.peft_json(&base))?;
            util::write_atomic_with(&run.join("adapter_model.safetensors"), |tmp| {
                Ok(candle_core::safetensors::save(&adapters, tmp)?)
            })?;
            if lora.merge {
                crate::model::save_weights(model, &run.join("model.safetensors"))?;
            }
        }
        _ => util::write_atomic_with(&run.join("model.safetensors"), |tmp| Ok(varmap.save(tmp)?))?,
    }
    util::write_json_atomic(
        &run.join("chatforge.json"),
        &serde_json::json!({
            "stage": spec.stage,
            "parents": spec.parents,
            "data": spec.data,
            "hyperparameters": {"loop": recorded, "stage": spec.hyper},
            "matmul_kernel": kernel.describe(),
            "git_commit": checkpoint::git_commit(),
            "chatforge_version": env!("CARGO_PKG_VERSION"),
        }),
    )?;
    util::write_json_atomic(&run.join("report.json"), report)
}
