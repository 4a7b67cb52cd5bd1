//! DPO: raise the policy's log-probability of chosen over rejected responses relative to the
//! frozen start model, with no reward model and no sampling during training.

use super::losses::dpo_loss;
use super::rollout::{pack, response_logprobs, Row};
use super::{PolicyEval, RlhfOptions};
use crate::data::prefs::{read_pref_file, Comparison};
use crate::dist::Part;
use crate::model::Llama;
use crate::tokenizer::chat::{render, ChatTemplate};
use crate::tokenizer::Tokenizer;
use crate::train::reward::conversation_ids;
use crate::train::trainer::Stage;
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::Tensor;

struct Pair {
    chosen: Row,
    rejected: Row,
    /// Summed reference log-probabilities (chosen, rejected), computed once.
    reference: Option<(f32, f32)>,
}

pub struct DpoStage {
    train: Vec<Pair>,
    val: Vec<Pair>,
    beta: f64,
    batch_size: usize,
    pad: u32,
    eval: PolicyEval,
    stats: Vec<(String, f64)>,
}

/// What reading preference files for DPO kept, cut and left out.
#[derive(Default)]
struct Read {
    /// Comparisons cut to fit the context: the prompt loses its start, a response still too long
    /// its end (as TRL cuts them).
    cut: usize,
    /// Records left out, by reason.
    skipped: std::collections::BTreeMap<String, usize>,
}

impl Read {
    fn skip(&mut self, why: &str) {
        *self.skipped.entry(why.to_string()).or_default() += 1;
    }

    fn describe_skipped(&self) -> String {
        if self.skipped.is_empty() {
            return "none skipped".into();
        }
        let total: usize = self.skipped.values().sum();
        let why: Vec<String> = self
            .skipped
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        format!("{total} skipped: {}", why.join(", "))
    }
}

/// The rows of prompt+response, with the response starting after the assistant header, cut to
/// `max_len` (the flag says whether anything was cut). `Err` says why a comparison cannot be
/// used.
fn rows_of(
    c: &Comparison,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<std::result::Result<(Vec<Row>, bool), &'static str>> {
    let prompt = render(tok, template, &c.prompt, true)?.ids;
    let mut responses = Vec::new();
    for r in &c.responses {
        let full = conversation_ids(tok, template, &c.prompt, r)?;
        if !full.starts_with(&prompt) {
            return Ok(Err(
                "whose chat template does not render the response after the prompt",
            ));
        }
        if full.len() == prompt.len() {
            return Ok(Err("with an empty response"));
        }
        responses.push(full[prompt.len()..].to_vec());
    }
    // As TRL does: the prompt keeps its end, in at most half the context when the responses
    // need the rest; responses that still do not fit keep their start.
    let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
    let cut = prompt.len() + longest > max_len;
    let keep = if cut {
        prompt
            .len()
            .min((max_len - longest.min(max_len)).max(max_len / 2).max(1))
    } else {
        prompt.len()
    };
    let prompt = &prompt[prompt.len() - keep..];
    let room = max_len - keep;
    let rows = responses
        .iter()
        .map(|r| Row::new(prompt, &r[..r.len().min(room)]))
        .collect();
    Ok(Ok((rows, cut)))
}

fn read_pairs(
    files: &[std::path::PathBuf],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
    read: &mut Read,
) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for f in files {
        let file = read_pref_file(f)?;
        for _ in &file.bad {
            read.skip("unreadable");
        }
        for c in &file.comparisons {
            match rows_of(c, tok, template, max_len)? {
                Ok((rows, cut)) => {
                    read.cut += usize::from(cut);
                    for (i, j) in c.pairs() {
                        pairs.push(Pair {
                            chosen: rows[i].clone(),
                            rejected: rows[j].clone(),
                            reference: None,
                        })
                    }
                }
                Err(why) => read.skip(why),
            }
        }
    }
    Ok(pairs)
}

impl DpoStage {
    pub fn new(
        opts: &RlhfOptions,
        tok: &Tokenizer,
        template: &ChatTemplate,
        eval: PolicyEval,
    ) -> Result<DpoStage> {
        if opts.prefs.is_empty() {
            bail!("--algo dpo needs --prefs (preference pairs or rankings)");
        }
        let max_len = eval.reference.config.max_position_embeddings;
        let mut read = Read::default();
        let mut train = read_pairs(&opts.prefs, tok, template, max_len, &mut read)?;
        let val = if opts.val_prefs.is_empty() {
            let (kept, held) = crate::util::hold_out_every(train, 10);
            train = kept;
            held
        } else {
            read_pairs(&opts.val_prefs, tok, template, max_len, &mut read)?
        };
        let summary = format!(
            "{} comparisons cut to fit the {max_len}-token context, {}",
            read.cut,
            read.describe_skipped()
        );
        if train.is_empty() || val.is_empty() {
            bail!(
                "DPO needs training and held-out pairs (have {} and {}; {summary})",
                train.len(),
                val.len()
            );
        }
        if !opts.train.quiet {
            eprintln!(
                "dpo: {} train / {} held-out pairs ({summary})",
                train.len(),
                val.len()
            );
        }
        let mut stage = DpoStage {
            train,
            val,
            beta: opts.dpo_beta,
            batch_size: opts.minibatch,
            pad: tok.special_id("<|pad|>").unwrap_or(0),
            eval,
            stats: Vec::new(),
        };
        // Held-out pairs keep 256 at most: evaluation runs many times.
        stage.val.truncate(256);
        Ok(stage)
    }

    fn fill_reference(&self, pairs: &mut [&mut Pair]) -> Result<()> {
        let missing: Vec<usize> = (0..pairs.len())
            .filter(|&i| pairs[i].reference.is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<&Row> = missing
            .iter()
            .flat_map(|&i| [&pairs[i].chosen, &pairs[i].rejected])
            .collect();
        let lp = response_logprobs(&self.eval.reference, &rows, self.pad)?;
        let sums: Vec<f32> = lp.iter().map(|v| v.iter().sum()).collect();
        for (k, &i) in missing.iter().enumerate() {
            pairs[i].reference = Some((sums[2 * k], sums[2 * k + 1]));
        }
        Ok(())
    }

    /// Loss, implicit rewards of chosen and rejected, for `pairs` (reference values filled).
    fn losses(&self, model: &Llama, pairs: &[&mut Pair]) -> Result<(Tensor, Tensor, Tensor)> {
        let n = pairs.len();
        let rows: Vec<&Row> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let device = model.device();
        let p = pack(&rows, self.pad, device)?;
        let sums = (model.token_nll(&p.x, &p.y)?.neg()? * &p.mask)?.sum(1)?;
        let refs: Vec<(f32, f32)> = pairs.iter().map(|p| p.reference.expect("filled")).collect();
        let rc = Tensor::new(refs.iter().map(|r| r.0).collect::<Vec<_>>(), device)?;
        let rr = Tensor::new(refs.iter().map(|r| r.1).collect::<Vec<_>>(), device)?;
        Ok(dpo_loss(
            &sums.narrow(0, 0, n)?,
            &sums.narrow(0, n, n)?,
            &rc,
            &rr,
            self.beta,
        )?)
    }
}

/// The step statistics of a DPO batch: mean implicit rewards, their margin, and how often the
/// chosen answer wins.
const DPO_STATS: [&str; 4] = [
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
];

impl Stage for DpoStage {
    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)> {
        let mut idx: Vec<usize> = (0..self.batch_size)
            .map(|_| rng.below(self.train.len() as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        // The loss is a mean over the batch's pairs: the part sums its own and divides by all.
        let all = idx.len();
        let idx = &idx[part.rows(all)];
        if idx.is_empty() {
            // Fewer distinct pairs than ranks: this rank adds nothing (but the same statistics).
            self.stats = DPO_STATS.iter().map(|k| (k.to_string(), 0.0)).collect();
            return Ok((
                Tensor::zeros((), candle_core::DType::F32, model.device())?,
                0,
            ));
        }
        let mut taken = std::mem::take(&mut self.train);
        let mut picked: Vec<&mut Pair> = taken
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| idx.binary_search(i).is_ok())
            .map(|(_, p)| p)
            .collect();
        let result = self
            .fill_reference(&mut picked)
            .and_then(|_| self.losses(model, &picked));
        let tokens: usize = picked
            .iter()
            .map(|p| p.chosen.ids.len() + p.rejected.ids.len())
            .sum();
        drop(picked);
        self.train = taken;
        let (loss, c, r) = result?;
        let margin = (&c - &r)?;
        let mean = |t: &Tensor| -> Result<f64> { Ok(t.mean_all()?.to_scalar::<f32>()? as f64) };
        let won = margin.gt(0.0)?.to_dtype(candle_core::DType::F32)?;
        let values = [mean(&c)?, mean(&r)?, mean(&margin)?, mean(&won)?];
        self.stats = DPO_STATS
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(((loss.sum_all()? / all as f64)?, tokens))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>> {
        let mut val = std::mem::take(&mut self.val);
        let (mut loss, mut correct, mut margin, mut n) = (0.0, 0usize, 0.0, 0usize);
        let mut failed = None;
        for chunk in val.chunks_mut(self.batch_size.max(1)) {
            let mut refs: Vec<&mut Pair> = chunk.iter_mut().collect();
            match self
                .fill_reference(&mut refs)
                .and_then(|_| self.losses(model, &refs))
            {
                Ok((l, c, r)) => {
                    let d: Vec<f32> = (c - r)?.to_vec1()?;
                    loss += l.sum_all()?.to_scalar::<f32>()? as f64;
                    correct += d.iter().filter(|&&x| x > 0.0).count();
                    margin += d.iter().map(|&x| x as f64).sum::<f64>();
                    n += d.len();
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.val = val;
        if let Some(e) = failed {
            return Err(e);
        }
        let n = n.max(1) as f64;
        let mut m = vec![
            ("dpo_val_loss".to_string(), loss / n),
            ("dpo_val_accuracy".to_string(), correct as f64 / n),
            ("dpo_val_margin".to_string(), margin / n),
        ];
        if !self.eval.prompts.is_empty() {
            m.extend(self.eval.measure(model)?);
        }
        Ok(m)
    }

    fn step_metrics(&mut self) -> Vec<(String, f64)> {
        self.stats.clone()
    }
}
