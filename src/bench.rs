//! `chatforge bench`: throughput of the parts that set what a user can do on a CPU, measured the
//! way `bench/compare.sh` measures the peers (PyTorch, llama.cpp, HF tokenizers, tiktoken) so the
//! ratios are like for like: a training step, prefill and decode, tokenizer encode and BPE
//! training, and the fp32 matmul ceiling those numbers are a fraction of.

use crate::model::llama::seeded_init;
use crate::model::{Llama, LlamaConfig};
use crate::train::optim::{GradAccumulator, Optimizer, OptimizerConfig};
use crate::train::Precision;
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::time::Instant;

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:25}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    pb
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// The model and batch of a training-step benchmark (default: the GPT-2-small-like config of
/// issue 10: 6 layers, width 384, 6 heads, context 256, vocab 8192, batch 8).
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct TrainBenchOptions {
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    #[arg(long, default_value_t = 384)]
    pub width: usize,
    #[arg(long, default_value_t = 6)]
    pub heads: usize,
    /// Key/value heads (fewer than --heads for grouped-query attention).
    #[arg(long, default_value_t = 6)]
    pub kv_heads: usize,
    /// SwiGLU hidden width (1024 gives the parameters of a 4x GELU MLP).
    #[arg(long, default_value_t = 1024)]
    pub ffn: usize,
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Matmul precision, as in training: auto (bf16 where a bf16 kernel is faster), bf16 or f32.
    #[arg(long, value_enum, default_value_t = Precision::default())]
    pub precision: Precision,
    /// The architecture switches, as in `pretrain`, to time what each costs.
    #[command(flatten)]
    pub switches: crate::model::switches::ArchSwitches,
}

impl TrainBenchOptions {
    pub fn config(&self) -> Result<LlamaConfig> {
        let mut c = LlamaConfig {
            hidden_size: self.width,
            intermediate_size: self.ffn,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            ..LlamaConfig::small(self.vocab, self.context)
        };
        self.switches.apply(&mut c, "bench train")?;
        c.validate("bench train")?;
        Ok(c)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub options: TrainBenchOptions,
    /// The projections' kernel that ran (`amx-bf16`, `avx512-bf16`, or f32 with its SIMD level).
    pub matmul_kernel: String,
    pub parameters: usize,
    pub tokens_per_step: usize,
    pub step_seconds: Vec<f64>,
    pub median_step_seconds: f64,
    /// The step's phases: the loss, its backward pass, and clipping plus the AdamW update.
    pub median_forward_seconds: f64,
    pub median_backward_seconds: f64,
    pub median_update_seconds: f64,
    pub tokens_per_second: f64,
    /// Model FLOPs of one step (6 per weight per token for the matmuls, plus attention scores).
    pub gflop_per_step: f64,
    pub gflop_per_second: f64,
    pub losses: Vec<f64>,
    pub peak_rss_mb: f64,
}

/// Model FLOPs of one training step: forward and backward through every matrix (the tied output
/// head included) and the attention score and value products over the full context.
pub fn train_step_flops(c: &LlamaConfig, batch: usize, context: usize) -> f64 {
    let (h, hd) = (c.hidden_size as f64, c.head_size() as f64);
    let q = c.num_attention_heads as f64 * hd;
    let kv = c.kv_heads() as f64 * hd;
    let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * c.intermediate_size as f64;
    let matrices = c.num_hidden_layers as f64 * per_layer + c.vocab_size as f64 * h;
    let tokens = (batch * context) as f64;
    let attention = c.num_hidden_layers as f64 * 2.0 * 2.0 * context as f64 * q * tokens;
    3.0 * (2.0 * matrices * tokens + attention)
}

/// Times `steps` AdamW steps (after `warmup` untimed ones) on random tokens: forward, backward,
/// gradient clipping and the update, as `pretrain` does them.
pub fn train(opts: &TrainBenchOptions) -> Result<TrainBench> {
    if opts.steps == 0 || opts.batch == 0 {
        bail!("--steps and --batch must be positive");
    }
    let config = opts.config()?;
    let device = Device::Cpu;
    let precision = opts.precision.apply()?;
    let varmap = VarMap::new();
    let model = Llama::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut rng = Rng::new(opts.seed);
    seeded_init(&config, &varmap, &mut rng, opts.switches.zero_start())?;
    let mut optimizer = Optimizer::new(&varmap, OptimizerConfig::default())?;
    let parameters = crate::model::llama::parameter_count(&varmap);
    let (b, t) = (opts.batch, opts.context);
    let pb = progress((opts.warmup + opts.steps) as u64, "bench train");
    let mut step_seconds = Vec::new();
    // Forward, backward, and clipping plus the optimizer update, per timed step.
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let mut losses = Vec::new();
    for step in 0..opts.warmup + opts.steps {
        let ids: Vec<u32> = (0..b * (t + 1))
            .map(|_| rng.below(opts.vocab as u64) as u32)
            .collect();
        let all = Tensor::from_vec(ids, (b, t + 1), &device)?;
        let (x, y) = (all.narrow(1, 0, t)?, all.narrow(1, 1, t)?);
        let start = Instant::now();
        let loss = model.loss(&x, &y)?;
        let forward = start.elapsed().as_secs_f64();
        let grad_store = loss.backward()?;
        let backward = start.elapsed().as_secs_f64();
        let mut acc = GradAccumulator::new(optimizer.params.len());
        acc.add(&optimizer.params, &grad_store)?;
        drop(grad_store);
        let (grads, _) = acc.finish(&optimizer.params, 1.0)?;
        optimizer.apply(&grads, 1e-3)?;
        let update = start.elapsed().as_secs_f64();
        let loss = loss.to_scalar::<f32>()? as f64;
        let secs = start.elapsed().as_secs_f64();
        if step >= opts.warmup {
            phases.push([forward, backward - forward, update - backward]);
            step_seconds.push(secs);
            losses.push(loss);
        }
        pb.inc(1);
        pb.set_message(format!("{:.0} tok/s", (b * t) as f64 / secs));
    }
    pb.finish_and_clear();
    let med = median(&step_seconds);
    let flops = train_step_flops(&config, b, t);
    Ok(TrainBench {
        options: opts.clone(),
        matmul_kernel: format!(
            "{}; other kernels: {}",
            precision.describe(),
            crate::model::kernels::simd_path()
        ),
        parameters,
        tokens_per_step: b * t,
        step_seconds,
        median_step_seconds: med,
        median_forward_seconds: median(&phases.iter().map(|p| p[0]).collect::<Vec<_>>()),
        median_backward_seconds: median(&phases.iter().map(|p| p[1]).collect::<Vec<_>>()),
        median_update_seconds: median(&phases.iter().map(|p| p[2]).collect::<Vec<_>>()),
        tokens_per_second: (b * t) as f64 / med,
        gflop_per_step: flops / 1e9,
        gflop_per_second: flops / 1e9 / med,
        losses,
        peak_rss_mb: crate::util::peak_rss_mb(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct MatmulBench {
    pub size: usize,
    pub seconds: f64,
    /// fp32 through gemm, and the SIMD level it ran.
    pub gflop_per_second: f64,
    pub f32_kernel: String,
    /// bf16 operands, f32 sums, on the fastest bf16 kernel (absent where the CPU has none, or
    /// `CHATFORGE_MATMUL` caps the choice at f32).
    pub bf16_gflop_per_second: Option<f64>,
    pub bf16_kernel: Option<String>,
}

/// The matmul ceilings: the best of several `[n, n] · [n, n]` products through candle in fp32,
/// and through the fastest bf16 kernel.
pub fn matmul(size: usize, repeats: usize) -> Result<MatmulBench> {
    use crate::model::bf16::{self, Kernel};
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (size, size), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (size, size), &dev)?;
    let best = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            f()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let seconds = best(&|| a.matmul(&b)?.device().synchronize().map_err(Into::into))?;
    let flops = 2.0 * (size as f64).powi(3);
    let kernel = Kernel::best()?;
    let bf16_gflop_per_second = if kernel.is_bf16() {
        let (av, bv) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        let strided = |data| bf16::Strided {
            data,
            rows: size,
            cols: size,
            rs: size,
            cs: 1,
        };
        let secs = best(&|| {
            bf16::matmul(kernel, strided(&av), strided(&bv));
            Ok(())
        })?;
        Some(flops / secs / 1e9)
    } else {
        None
    };
    Ok(MatmulBench {
        size,
        seconds,
        gflop_per_second: flops / seconds / 1e9,
        f32_kernel: Kernel::F32.describe(),
        bf16_gflop_per_second,
        bf16_kernel: kernel.is_bf16().then(|| kernel.name().to_string()),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateBench {
    pub model: String,
    /// The kernels inference ran on: f32 products (gemm's SIMD level) and GGUF block products.
    pub matmul_kernel: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub peak_rss_mb: f64,
}

/// Prefill and decode speed: a prompt of `prompt_tokens` tokens (a sentence repeated), then
/// `new_tokens` greedy tokens with stops disabled; the median of `repeats` runs.
pub fn generate(
    model: &std::path::Path,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
) -> Result<GenerateBench> {
    use crate::infer::generate::generate_from_ids;
    let lm = crate::model::load(model, &Device::Cpu)?;
    let sentence = lm
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. ")?;
    if sentence.is_empty() {
        bail!("the tokenizer encodes the benchmark sentence as nothing");
    }
    let ids: Vec<u32> = sentence
        .iter()
        .copied()
        .cycle()
        .take(prompt_tokens)
        .collect();
    if prompt_tokens + new_tokens > lm.model.config.max_position_embeddings {
        bail!(
            "{} prompt + {} new tokens exceed the model's context of {}",
            prompt_tokens,
            new_tokens,
            lm.model.config.max_position_embeddings
        );
    }
    let opts = crate::infer::sampler::SamplingParams::greedy(new_tokens);
    let pb = progress(repeats as u64 + 1, "bench generate");
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for i in 0..repeats + 1 {
        let g = generate_from_ids(&lm, &ids, &opts, &[], None, |_| Ok(()))?;
        pb.inc(1);
        if i == 0 {
            continue; // warm-up
        }
        prefill.push(prompt_tokens as f64 / g.prefill_seconds);
        let rest = g.tokens.len().saturating_sub(1) as f64;
        decode.push(rest / (g.seconds - g.prefill_seconds).max(1e-9));
    }
    pb.finish_and_clear();
    Ok(GenerateBench {
        model: model.display().to_string(),
        matmul_kernel: format!(
            "{}; quantized blocks: {}",
            crate::model::bf16::Kernel::F32.describe(),
            crate::model::quant::kernel_name()
        ),
        prompt_tokens,
        new_tokens,
        prefill_tokens_per_second: median(&prefill),
        decode_tokens_per_second: median(&decode),
        peak_rss_mb: crate::util::peak_rss_mb(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenizeBench {
    pub documents: usize,
    pub megabytes: f64,
    pub tokens: usize,
    /// Documents encoded in parallel (`encode_batch`), median of the repeats.
    pub encode_mb_per_second: f64,
    pub encode_tokens_per_second: f64,
    /// BPE training on the same text, when a vocabulary size was given.
    pub train_vocab: Option<usize>,
    pub train_seconds: Option<f64>,
}

/// Encode throughput of `tokenizer` (a run or tokenizer directory) over the documents of
/// `inputs`, and optionally the time to train a `train_vocab` BPE on them.
pub fn tokenize(
    tokenizer: &std::path::Path,
    inputs: &[std::path::PathBuf],
    repeats: usize,
    train_vocab: Option<usize>,
) -> Result<TokenizeBench> {
    let tok = crate::tokenizer::Tokenizer::load(tokenizer)?;
    let docs =
        crate::data::text::read_all_documents(inputs, crate::data::text::DocFormat::Auto, "text")?;
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let mut secs = Vec::new();
    let mut tokens = 0;
    for _ in 0..repeats.max(1) {
        let batch = docs.clone();
        let start = Instant::now();
        let enc = tok.encode_batch(batch)?;
        secs.push(start.elapsed().as_secs_f64());
        tokens = enc.iter().map(|e| e.len()).sum();
    }
    let med = median(&secs);
    let train_seconds = match train_vocab {
        Some(v) => {
            let chunks: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
            let start = Instant::now();
            crate::tokenizer::Tokenizer::train(
                &chunks,
                &crate::tokenizer::TrainOptions {
                    vocab_size: v,
                    ..Default::default()
                },
            )?;
            Some(start.elapsed().as_secs_f64())
        }
        None => None,
    };
    Ok(TokenizeBench {
        documents: docs.len(),
        megabytes: bytes as f64 / 1e6,
        tokens,
        encode_mb_per_second: bytes as f64 / 1e6 / med,
        encode_tokens_per_second: tokens as f64 / med,
        train_vocab,
        train_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_count_six_per_weight_per_token_plus_attention() {
        let c = TrainBenchOptions {
            layers: 1,
            width: 8,
            heads: 2,
            kv_heads: 2,
            ffn: 16,
            context: 4,
            vocab: 10,
            batch: 1,
            steps: 1,
            warmup: 0,
            seed: 0,
            precision: Precision::F32,
            switches: Default::default(),
        }
        .config()
        .unwrap();
        // 4·8·8 attention + 3·8·16 MLP + 10·8 head = 720 weights; attention 2·2·4·8 per token.
        let expected = 3.0 * (2.0 * 720.0 * 4.0 + 128.0 * 4.0);
        assert_eq!(train_step_flops(&c, 1, 4), expected);
    }
}
