//! Reward model (InstructGPT step 2): the Transformer with a scalar head (`score.weight`, as Hugging
//! Face's LlamaForSequenceClassification) read at the last token, trained with the Bradley-Terry
//! loss on every pair of a ranking at once, then shifted so the policy's own answers score 0 on
//! average.

use super::padding::length_groups;
use super::sft::OnError;
use super::trainer::{train, LoopOptions, RunSpec, Stage, Start};
use crate::data::prefs::{read_pref_file, read_prompt_file, Comparison};
use crate::dist::Part;
use crate::infer::generate::generate_batch;
use crate::infer::generate::stop_ids_of;
use crate::infer::sampler::SamplingParams;
use crate::model::Llama;
use crate::tokenizer::chat::{render, ChatTemplate, Message, Role};
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `log(1 + exp(x))`, stable for large |x|.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Bradley-Terry loss: mean of −log σ(better − worse) over pairs.
pub fn bradley_terry_loss(better: &Tensor, worse: &Tensor) -> candle_core::Result<Tensor> {
    softplus(&(worse - better)?)?.mean_all()
}

/// Scores of sequences read at each one's last token, [N], in the order given. Differentiable.
/// Sequences run in groups of similar length, each right-padded to its own longest.
pub fn last_token_scores(
    model: &Llama,
    head: &Linear,
    seqs: &[&[u32]],
    pad: u32,
) -> Result<Tensor> {
    let device = model.device();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len().max(1)).collect();
    let groups = length_groups(&lens);
    let mut parts = Vec::with_capacity(groups.len());
    for group in &groups {
        let len = group.iter().map(|&i| lens[i]).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(group.len() * len);
        let mut pick = vec![0f32; group.len() * len];
        for (row, &i) in group.iter().enumerate() {
            ids.extend_from_slice(seqs[i]);
            ids.extend(std::iter::repeat_n(pad, len - seqs[i].len()));
            pick[row * len + lens[i] - 1] = 1.0;
        }
        let x = Tensor::from_vec(ids, (group.len(), len), device)?;
        let pick = Tensor::from_vec(pick, (group.len(), len), device)?;
        let h = model.hidden(&x, None)?;
        let s = head.forward(&h)?.squeeze(D::Minus1)?;
        parts.push((s * pick)?.sum(1)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, device)?);
    }
    // Back from group order to the caller's.
    let mut position = vec![0u32; seqs.len()];
    for (k, &i) in groups.iter().flatten().enumerate() {
        position[i] = k as u32;
    }
    let grouped = Tensor::cat(&parts, 0)?;
    Ok(grouped.index_select(&Tensor::new(position, device)?, 0)?)
}

/// A trained reward model ready to score conversations.
pub struct RewardModel {
    pub model: Llama,
    pub head: Linear,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Subtracted from raw scores (the normalisation).
    pub bias: f64,
    pub dir: PathBuf,
}

/// What `reward.json` in a reward-model directory holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RewardInfo {
    /// Subtracted from raw scores so the reference answers average 0.
    pub bias: f64,
    /// What the bias was measured on.
    pub normalised_on: String,
    pub heldout_accuracy: f64,
    pub heldout_margin: f64,
    pub heldout_pairs: usize,
    pub accuracy_by_family: BTreeMap<String, f64>,
    /// Accuracy per pair of ranks ("1>2": the best response against the second), which shows
    /// which distinctions (style, correctness, safety) the model has learned.
    #[serde(default)]
    pub accuracy_by_ranks: BTreeMap<String, f64>,
}

/// The rendered ids of `prompt` followed by an assistant `response`, ending at its end-of-turn.
pub fn conversation_ids(
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompt: &[Message],
    response: &str,
) -> Result<Vec<u32>> {
    let mut msgs = prompt.to_vec();
    msgs.push(Message::new(Role::Assistant, response));
    Ok(render(tok, template, &msgs, false)?.ids)
}

impl RewardModel {
    pub fn load(dir: &Path) -> Result<RewardModel> {
        let (config, tokenizer) = crate::model::load_config_and_tokenizer(dir)?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is mapped read-only and written only by atomic rename.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
                .with_context(|| format!("cannot read {}", weights.display()))?;
        let model = Llama::new(&config, vb.clone())?;
        let head = candle_nn::linear_no_bias(config.hidden_size, 1, vb.pp("score")).with_context(
            || {
                format!(
                    "{} has no score.weight: it is not a reward model (train one with `chatforge reward`)",
                    dir.display()
                )
            },
        )?;
        let info: RewardInfo = if dir.join("reward.json").exists() {
            util::read_json(&dir.join("reward.json"))?
        } else {
            RewardInfo::default()
        };
        let template = ChatTemplate::detect(&tokenizer)?;
        Ok(RewardModel {
            model,
            head,
            tokenizer,
            template,
            bias: info.bias,
            dir: dir.to_path_buf(),
        })
    }

    /// Normalised rewards of `(prompt, response)` pairs, batched.
    pub fn score(&self, items: &[(&[Message], &str)]) -> Result<Vec<f64>> {
        let ctx = self.model.config.max_position_embeddings;
        let pad = self.tokenizer.special_id("<|pad|>").unwrap_or(0);
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(16) {
            let ids = chunk
                .iter()
                .map(|(p, r)| {
                    let mut ids = conversation_ids(&self.tokenizer, &self.template, p, r)?;
                    // Keep the end (where the score is read) if a conversation is too long.
                    if ids.len() > ctx {
                        ids.drain(..ids.len() - ctx);
                    }
                    Ok(ids)
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
            let s: Vec<f32> = last_token_scores(&self.model, &self.head, &refs, pad)?.to_vec1()?;
            out.extend(s.into_iter().map(|x| x as f64 - self.bias));
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RewardOptions {
    /// The run the reward model starts from (usually the SFT model).
    pub base: PathBuf,
    pub data: Vec<PathBuf>,
    pub val_data: Vec<PathBuf>,
    pub out: PathBuf,
    /// Comparisons (prompts) per batch; each contributes all its responses.
    pub batch_size: usize,
    /// Longest conversation; longer ones lose the start of the prompt. Default: the context.
    pub max_len: Option<usize>,
    pub val_fraction: f64,
    pub on_error: OnError,
    /// Prompts whose answers by the base model define reward 0; default: the held-out responses.
    pub norm_prompts: Option<PathBuf>,
    pub norm_samples: usize,
    /// Train only the top N Transformer blocks (and the final norm and score head); the rest
    /// keep the starting model's weights. Default: every weight.
    #[serde(default)]
    pub train_layers: Option<usize>,
    #[serde(skip)]
    pub train: LoopOptions,
}

impl Default for RewardOptions {
    fn default() -> Self {
        RewardOptions {
            base: PathBuf::new(),
            data: Vec::new(),
            val_data: Vec::new(),
            out: PathBuf::new(),
            batch_size: 8,
            max_len: None,
            val_fraction: 0.1,
            on_error: OnError::Skip,
            norm_prompts: None,
            norm_samples: 64,
            train_layers: None,
            train: LoopOptions {
                steps: 200,
                lr: 5e-4,
                warmup_steps: 20,
                eval_every: 50,
                weight_decay: 0.0,
                ..Default::default()
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RewardReport {
    pub steps: usize,
    pub train_comparisons: usize,
    pub val_comparisons: usize,
    pub skipped: usize,
    /// Comparisons whose prompts were cut from the left to fit `max_len`.
    pub truncated: usize,
    pub val_accuracy_before: f64,
    pub info: RewardInfo,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// Peak resident memory of the process (MB).
    pub peak_rss_mb: f64,
    #[serde(skip)]
    pub losses: Vec<(usize, f64)>,
}

/// A comparison with every response rendered.
struct Encoded {
    seqs: Vec<Vec<u32>>,
    family: Option<String>,
}

struct RewardStage {
    train: Vec<Encoded>,
    val: Vec<Encoded>,
    batch_size: usize,
    pad: u32,
    hidden: usize,
    head: Option<Linear>,
    /// Blocks below this index keep their starting weights (with the embeddings).
    first_trained_layer: usize,
}

/// Scores of every response of a batch and the (better, worse) index pairs into them, with the
/// comparison each pair belongs to.
struct ScoredBatch {
    scores: Tensor,
    better: Vec<u32>,
    worse: Vec<u32>,
    owner: Vec<usize>,
    /// Ranks (0 = best) of each pair's two responses within their comparison.
    ranks: Vec<(u32, u32)>,
}

/// Pairwise results over comparisons: (loss, accuracy, margin, pairs, per-family accuracy).
struct PairStats {
    loss: f64,
    accuracy: f64,
    margin: f64,
    pairs: usize,
    by_family: BTreeMap<String, f64>,
    by_ranks: BTreeMap<String, f64>,
}

impl RewardStage {
    fn head(&self) -> &Linear {
        self.head.as_ref().expect("heads are built before training")
    }

    /// Scores of every response in `batch` and the (better, worse) index pairs into them.
    fn scores(&self, model: &Llama, batch: &[&Encoded]) -> Result<ScoredBatch> {
        let mut refs: Vec<&[u32]> = Vec::new();
        let (mut better, mut worse, mut owner, mut ranks) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (c, e) in batch.iter().enumerate() {
            let base = refs.len() as u32;
            let k = e.seqs.len() as u32;
            for i in 0..k {
                for j in i + 1..k {
                    better.push(base + i);
                    worse.push(base + j);
                    owner.push(c);
                    ranks.push((i, j));
                }
            }
            refs.extend(e.seqs.iter().map(|s| s.as_slice()));
        }
        let scores = last_token_scores(model, self.head(), &refs, self.pad)?;
        Ok(ScoredBatch {
            scores,
            better,
            worse,
            owner,
            ranks,
        })
    }

    fn pair_loss(s: &Tensor, better: &[u32], worse: &[u32]) -> Result<(Tensor, Tensor)> {
        let device = s.device();
        let b = s.index_select(&Tensor::new(better, device)?, 0)?;
        let w = s.index_select(&Tensor::new(worse, device)?, 0)?;
        Ok((bradley_terry_loss(&b, &w)?, (b - w)?))
    }

    fn stats(&self, model: &Llama, set: &[Encoded]) -> Result<PairStats> {
        let (mut loss, mut correct, mut margin, mut pairs) = (0.0, 0usize, 0.0, 0usize);
        let mut fam: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut by_ranks: BTreeMap<(u32, u32), (usize, usize)> = BTreeMap::new();
        for chunk in set.chunks(self.batch_size.max(1)) {
            let batch: Vec<&Encoded> = chunk.iter().collect();
            let sb = self.scores(model, &batch)?;
            let (l, diff) = Self::pair_loss(&sb.scores, &sb.better, &sb.worse)?;
            let owner = sb.owner;
            let diff: Vec<f32> = diff.to_vec1()?;
            loss += l.to_scalar::<f32>()? as f64 * diff.len() as f64;
            for ((d, &o), &r) in diff.iter().zip(&owner).zip(&sb.ranks) {
                let ok = *d > 0.0;
                let e = by_ranks.entry(r).or_default();
                e.0 += ok as usize;
                e.1 += 1;
                correct += ok as usize;
                margin += *d as f64;
                let f = batch[o].family.clone().unwrap_or_else(|| "all".into());
                let e = fam.entry(f).or_default();
                e.0 += ok as usize;
                e.1 += 1;
            }
            pairs += diff.len();
        }
        let n = pairs.max(1) as f64;
        let rate = |(c, t): (usize, usize)| c as f64 / t.max(1) as f64;
        Ok(PairStats {
            loss: loss / n,
            accuracy: correct as f64 / n,
            margin: margin / n,
            pairs,
            by_family: fam.into_iter().map(|(k, v)| (k, rate(v))).collect(),
            by_ranks: by_ranks
                .into_iter()
                .map(|((i, j), v)| (format!("{}>{}", i + 1, j + 1), rate(v)))
                .collect(),
        })
    }
}

impl Stage for RewardStage {
    fn build_heads(&mut self, vb: VarBuilder) -> Result<Vec<String>> {
        self.head = Some(candle_nn::linear_no_bias(self.hidden, 1, vb.pp("score"))?);
        Ok(vec!["score.weight".into()])
    }

    fn trains(&self, name: &str) -> bool {
        match name.strip_prefix("model.layers.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_none_or(|i| i >= self.first_trained_layer),
            None => self.first_trained_layer == 0 || name == "model.norm.weight",
        }
    }

    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)> {
        let batch: Vec<&Encoded> = (0..self.batch_size)
            .map(|_| &self.train[rng.below(self.train.len() as u64) as usize])
            .collect();
        // The loss is a mean over pairs: the part's pairs weigh by their share of the batch's.
        let pairs = |b: &[&Encoded]| -> usize {
            b.iter()
                .map(|e| e.seqs.len() * e.seqs.len().saturating_sub(1) / 2)
                .sum()
        };
        let all_pairs = pairs(&batch);
        let batch = &batch[part.rows(batch.len())];
        let tokens = batch
            .iter()
            .map(|e| e.seqs.iter().map(|s| s.len()).sum::<usize>())
            .sum();
        let sb = self.scores(model, batch)?;
        let share = pairs(batch) as f64 / all_pairs.max(1) as f64;
        let loss = (Self::pair_loss(&sb.scores, &sb.better, &sb.worse)?.0 * share)?;
        Ok((loss, tokens))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>> {
        let st = self.stats(model, &self.val)?;
        Ok(vec![
            ("val_loss".into(), st.loss),
            ("val_accuracy".into(), st.accuracy),
            ("val_margin".into(), st.margin),
        ])
    }
}

/// Reads and renders comparisons; those longer than `max_len` lose the start of their prompt
/// (counted in `truncated`).
fn encode_files(
    files: &[PathBuf],
    opts: &RewardOptions,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
    truncated: &mut usize,
) -> Result<(Vec<Encoded>, Vec<Comparison>, usize)> {
    let (mut out, mut raw, mut skipped) = (Vec::new(), Vec::new(), 0usize);
    for file in files {
        let f = read_pref_file(file)?;
        let reasons = f
            .bad
            .iter()
            .map(|b| (b.location.clone(), b.reason.clone()))
            .collect::<Vec<_>>();
        for c in f.comparisons {
            let mut seqs = c
                .responses
                .iter()
                .map(|r| conversation_ids(tok, template, &c.prompt, r))
                .collect::<Result<Vec<_>>>()?;
            if seqs.iter().any(|s| s.len() > max_len) {
                // Keep the end, where the score is read; the start of the prompt goes.
                for s in &mut seqs {
                    if s.len() > max_len {
                        s.drain(..s.len() - max_len);
                    }
                }
                *truncated += 1;
            }
            out.push(Encoded {
                seqs,
                family: c.family.clone(),
            });
            raw.push(c);
        }
        for (loc, why) in reasons {
            if opts.on_error == OnError::Fail {
                bail!("{loc}: {why} (use --on-error skip to leave such records out)");
            }
            if skipped < 3 && !opts.train.quiet {
                eprintln!("skipping {loc}: {why}");
            }
            skipped += 1;
        }
    }
    Ok((out, raw, skipped))
}

/// Trains a reward model from preference data and writes it with its normalisation.
pub fn train_reward(opts: &RewardOptions) -> Result<RewardReport> {
    if opts.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if opts.data.is_empty() {
        bail!("no --data files given");
    }
    crate::util::check_range("--val-fraction", opts.val_fraction, 0.0..=0.9)?;
    crate::util::check_positive("--norm-samples", opts.norm_samples)?;
    if let Some(n) = opts.train_layers {
        crate::util::check_positive("--train-layers", n)?;
    }
    let (mut config, tok) = crate::model::load_config_and_tokenizer(&opts.base)
        .map_err(|e| anyhow::anyhow!("--base: {e:#}"))?;
    let template = ChatTemplate::detect(&tok)
        .map_err(|e| anyhow::anyhow!("base model {}: {e}", opts.base.display()))?;
    let max_len = opts
        .max_len
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let mut truncated = 0;
    let (mut train_set, _, mut skipped) =
        encode_files(&opts.data, opts, &tok, &template, max_len, &mut truncated)?;
    let (val_set, val_raw) = if opts.val_data.is_empty() {
        let (kept, held) = util::hold_out_every(train_set, util::stride_for(opts.val_fraction));
        train_set = kept;
        (held, Vec::new())
    } else {
        let (v, raw, s) = encode_files(
            &opts.val_data,
            opts,
            &tok,
            &template,
            max_len,
            &mut truncated,
        )?;
        skipped += s;
        (v, raw)
    };
    if train_set.is_empty() || val_set.is_empty() {
        bail!(
            "need both training and held-out comparisons (have {} and {}); add data or --val-data",
            train_set.len(),
            val_set.len()
        );
    }
    if !opts.train.quiet {
        eprintln!(
            "reward: {} train / {} held-out comparisons ({} skipped, {} cut to the last {max_len} tokens), {} training pairs",
            train_set.len(),
            val_set.len(),
            skipped,
            truncated,
            train_set
                .iter()
                .map(|e| e.seqs.len() * (e.seqs.len() - 1) / 2)
                .sum::<usize>()
        );
    }
    config.architectures = vec!["LlamaForSequenceClassification".into()];
    let (n_train, n_val) = (train_set.len(), val_set.len());
    let mut stage = RewardStage {
        train: train_set,
        val: val_set,
        batch_size: opts.batch_size,
        pad: tok.special_id("<|pad|>").unwrap_or(0),
        hidden: config.hidden_size,
        head: None,
        first_trained_layer: match opts.train_layers {
            Some(0) => bail!("--train-layers must be positive"),
            Some(n) => config.num_hidden_layers.saturating_sub(n),
            None => 0,
        },
    };
    let spec = RunSpec {
        stage: "reward",
        out: &opts.out,
        config: &config,
        tokenizer: &tok,
        start: Start::From(opts.base.clone()),
        hyper: serde_json::to_value(opts)?,
        parents: vec![opts.base.display().to_string()],
        data: serde_json::json!({"files": opts.data, "val_files": opts.val_data,
            "train_comparisons": n_train, "val_comparisons": n_val, "skipped": skipped, "truncated": truncated}),
        lora: None,
        batch_size: opts.batch_size,
    };
    let r = train(&opts.train, spec, &mut stage)?;
    let before = r
        .eval_before
        .iter()
        .find(|(k, _)| k == "val_accuracy")
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN);
    let mut info = RewardInfo::default();
    // Rank 0 wrote the run: it alone measures and normalises it.
    if r.finished && crate::dist::is_leader() {
        let mut rm = RewardModel::load(&opts.out)?;
        let st = stage.stats(&rm.model, &stage.val)?;
        info.heldout_accuracy = st.accuracy;
        info.heldout_margin = st.margin;
        info.heldout_pairs = st.pairs;
        info.accuracy_by_family = st.by_family;
        info.accuracy_by_ranks = st.by_ranks;
        let (bias, on) = normalisation(&rm, opts, &val_raw)?;
        info.bias = bias;
        info.normalised_on = on;
        rm.bias = bias;
        util::write_json_atomic(&opts.out.join("reward.json"), &info)?;
    }
    Ok(RewardReport {
        steps: r.steps,
        train_comparisons: n_train,
        val_comparisons: n_val,
        skipped,
        truncated,
        val_accuracy_before: before,
        info,
        tokens_per_second: r.tokens_per_second,
        seconds: r.seconds,
        peak_rss_mb: r.peak_rss_mb,
        losses: r.losses,
    })
}

/// The raw score that becomes 0: the mean over the base model's own sampled answers to
/// `norm_prompts` (InstructGPT's choice), else over the held-out responses.
fn normalisation(
    rm: &RewardModel,
    opts: &RewardOptions,
    val_raw: &[Comparison],
) -> Result<(f64, String)> {
    let scored: Vec<f64> = if let Some(path) = &opts.norm_prompts {
        let prompts = read_prompt_file(path)?;
        let policy = crate::model::load(&opts.base, &Device::Cpu)?;
        let template = ChatTemplate::detect(&policy.tokenizer)?;
        let stops = stop_ids_of(&policy.model, &policy.tokenizer);
        let take: Vec<_> = util::spread_indices(prompts.len(), opts.norm_samples)
            .into_iter()
            .map(|i| &prompts[i])
            .collect();
        let mut answers = Vec::new();
        for chunk in take.chunks(16) {
            let ids = chunk
                .iter()
                .map(|p| Ok(render(&policy.tokenizer, &template, &p.messages, true)?.ids))
                .collect::<Result<Vec<_>>>()?;
            let sampling = SamplingParams {
                max_tokens: policy.model.config.max_position_embeddings / 2,
                temperature: 1.0,
                seed: opts.train.seed,
                ..SamplingParams::DEFAULT
            };
            for (o, p) in generate_batch(&policy.model, &policy.tokenizer, &ids, &sampling, &stops)?
                .into_iter()
                .zip(chunk)
            {
                answers.push((p.messages.as_slice(), o.text));
            }
        }
        let items: Vec<(&[Message], &str)> =
            answers.iter().map(|(p, a)| (*p, a.as_str())).collect();
        rm.score(&items)?
    } else {
        let items: Vec<(&[Message], &str)> = val_raw
            .iter()
            .flat_map(|c| {
                c.responses
                    .iter()
                    .map(|r| (c.prompt.as_slice(), r.as_str()))
            })
            .collect();
        if items.is_empty() {
            return Ok((0.0, "none".into()));
        }
        rm.score(&items)?
    };
    let mean = scored.iter().sum::<f64>() / scored.len().max(1) as f64;
    let on = match &opts.norm_prompts {
        Some(p) => format!(
            "{} sampled answers of {} to prompts spread over {}",
            scored.len(),
            opts.base.display(),
            p.display()
        ),
        None => format!("{} held-out responses", scored.len()),
    };
    Ok((rm.bias + mean, on))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_prompts_cover_the_whole_file() {
        let idx = util::spread_indices(960, 64);
        assert_eq!(idx.len(), 64);
        assert_eq!(idx[0], 0);
        assert!(idx[63] >= 900, "{idx:?}");
        assert!(idx.windows(2).all(|w| w[1] == w[0] + 15));
        assert_eq!(util::spread_indices(3, 64), [0, 1, 2]);
        assert!(util::spread_indices(0, 64).is_empty());
    }

    #[test]
    fn bradley_terry_matches_hand_computed_values() {
        let d = Device::Cpu;
        let better = Tensor::new(&[2.0f32, 0.0, -1.0], &d).unwrap();
        let worse = Tensor::new(&[0.0f32, 0.0, 1.0], &d).unwrap();
        // −log σ(x) = ln(1 + e^−x) at x = 2, 0, −2.
        let nls = |x: f64| (1.0 + (-x).exp()).ln();
        let want = (nls(2.0) + nls(0.0) + nls(-2.0)) / 3.0;
        assert!((nls(0.0) - std::f64::consts::LN_2).abs() < 1e-12);
        let got = bradley_terry_loss(&better, &worse)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Stable far out: no inf/nan.
        let big = Tensor::new(&[-100.0f32], &d).unwrap();
        let l = bradley_terry_loss(&big, &Tensor::new(&[100.0f32], &d).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 200.0).abs() < 1e-3, "{l}");
    }

    #[test]
    fn scores_of_a_mixed_batch_match_each_sequence_scored_alone() {
        use crate::model::LlamaConfig;
        let config = LlamaConfig::small(64, 64);
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Llama::new(&config, vb.clone()).unwrap();
        let mut rng = Rng::new(5);
        crate::model::llama::seeded_init(&config, &varmap, &mut rng, false).unwrap();
        let head = candle_nn::linear_no_bias(config.hidden_size, 1, vb.pp("score")).unwrap();
        // Long and short rows interleaved, so grouping reorders them.
        let seqs: Vec<Vec<u32>> = (0..12)
            .map(|i| {
                let len = if i % 2 == 0 { 3 + i } else { 40 + i };
                (0..len).map(|t| ((t * 7 + i) % 60) as u32 + 1).collect()
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        assert!(length_groups(&lens).len() > 1, "the batch should split");
        let batch: Vec<f32> = last_token_scores(&model, &head, &refs, 0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, s) in refs.iter().enumerate() {
            let alone: Vec<f32> = last_token_scores(&model, &head, &[s], 0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                (batch[i] - alone[0]).abs() < 1e-4,
                "row {i}: {} vs {}",
                batch[i],
                alone[0]
            );
        }
        // Distinct rows score differently, so a mix-up of the order would show.
        assert!(batch.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-3));
    }
}
