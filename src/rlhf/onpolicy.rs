//! PPO and GRPO: sample a batch of responses with the current policy, score them, then take
//! several optimizer steps over minibatches of that batch with the clipped objective.
//!
//! PPO's value head (`v_head`) reads the policy's final hidden state (as TRL's value-head models
//! do), so one forward pass gives both; its loss does not flow back into the trunk (measured: with
//! it, the value loss's gradient dominated and the policy drifted away from the reference without
//! raising reward). Each trainer step is one minibatch; a new
//! rollout is sampled when the previous one is used up. A checkpoint carries the KL coefficient
//! (which the adaptive controller moves) and the rest of the rollout being trained on, so a
//! resumed run continues exactly.

use super::losses::{
    clipped_surrogate, clipped_value_loss, explained_variance, gae, kl_k3_tensor,
    scale_to_unit_spread, whiten,
};
use super::rollout::{
    pack, packed_width, per_row_in_groups, place, response_entropy_sums, response_logprobs, Row,
    Sample,
};
use super::{mean, Algo, PolicyEval, RewardSource, RlhfOptions};
use crate::data::curriculum::tasks::check;
use crate::data::prefs::RlPrompt;
use crate::data::shards::ShardSet;
use crate::dist::Part;
use crate::model::Llama;
use crate::train::padding::length_groups;
use crate::train::trainer::Stage;
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

/// One sampled response with what the update needs, per response token.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Experience {
    row: Row,
    old_logp: Vec<f32>,
    ref_logp: Vec<f32>,
    advantages: Vec<f32>,
    returns: Vec<f32>,
    old_values: Vec<f32>,
}

pub struct OnPolicy {
    opts: RlhfOptions,
    hidden: usize,
    prompts: Vec<RlPrompt>,
    eval: PolicyEval,
    value_head: Option<Linear>,
    ptx: Option<ShardSet>,
    pad: u32,
    kl_coef: f64,
    /// Minibatches of the current rollout still to train on, last first.
    queue: Vec<Vec<Experience>>,
    rollout_stats: Vec<(String, f64)>,
    step_stats: Vec<(String, f64)>,
}

impl OnPolicy {
    pub fn new(
        opts: &RlhfOptions,
        hidden: usize,
        prompts: Vec<RlPrompt>,
        eval: PolicyEval,
    ) -> Result<OnPolicy> {
        let ptx = match &opts.ptx_data {
            Some(dir) if opts.ptx_coef > 0.0 => Some(ShardSet::open(dir)?),
            _ => None,
        };
        // `RlhfOptions::validate` has checked the counts and GRPO's group size.
        let pad = eval.tokenizer.special_id("<|pad|>").unwrap_or(0);
        Ok(OnPolicy {
            opts: opts.clone(),
            hidden,
            prompts,
            eval,
            value_head: None,
            ptx,
            pad,
            kl_coef: opts.kl_coef,
            queue: Vec::new(),
            rollout_stats: Vec::new(),
            step_stats: Vec::new(),
        })
    }

    fn scores(&self, prompts: &[&RlPrompt], samples: &[Sample]) -> Result<Vec<f64>> {
        if self.opts.reward_source == RewardSource::Checker {
            return Ok(samples
                .iter()
                .map(|s| {
                    let a = prompts[s.prompt].answer.as_ref().expect("checked at start");
                    f64::from(u8::from(check(a, &s.text)))
                })
                .collect());
        }
        let rm = self.eval.reward.as_ref().expect("checked at start");
        let items: Vec<_> = samples
            .iter()
            .map(|s| (prompts[s.prompt].messages.as_slice(), s.text.as_str()))
            .collect();
        rm.score(&items)
    }

    /// Per-token values of each row's response positions (no gradient).
    fn values(&self, model: &Llama, rows: &[&Row]) -> Result<Vec<Vec<f32>>> {
        let head = self.value_head.as_ref().expect("built");
        per_row_in_groups(rows, self.pad, model.device(), 16, |part, p| {
            let v = head
                .forward(&model.hidden(&p.x, None)?)?
                .squeeze(D::Minus1)?;
            super::rollout::gather(part, &v)
        })
    }

    /// Samples `prompts` (the rollout's from index `first` on) and measures the responses.
    fn measure(
        &self,
        model: &Llama,
        prompts: &[&RlPrompt],
        first: usize,
        per_prompt: usize,
        seed: u64,
    ) -> Result<RolloutPart> {
        if prompts.is_empty() {
            return Ok(RolloutPart::default());
        }
        let o = &self.opts;
        let mut samples =
            self.eval
                .sampling()
                .sample(model, prompts, per_prompt, o.temperature, seed)?;
        let rows: Vec<&Row> = samples.iter().map(|s| &s.row).collect();
        let part = RolloutPart {
            old_logp: response_logprobs(model, &rows, self.pad)?,
            ref_logp: response_logprobs(&self.eval.reference, &rows, self.pad)?,
            scores: self.scores(prompts, &samples)?,
            values: match self.value_head {
                Some(_) => self.values(model, &rows)?,
                None => Vec::new(),
            },
            entropy: response_entropy_sums(model, &rows, self.pad)?,
            samples: Vec::new(),
        };
        for s in &mut samples {
            s.prompt += first;
        }
        Ok(RolloutPart { samples, ..part })
    }

    /// Samples and scores a rollout batch and queues its minibatches.
    ///
    /// Under mpirun each rank samples and measures its part of the prompts (the costly part);
    /// the parts are gathered, so every rank holds the whole rollout, computes the same
    /// advantages, statistics and minibatches, and trains on its part of each.
    fn rollout(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<()> {
        let o = &self.opts;
        let picked: Vec<&RlPrompt> = (0..o.rollout_prompts)
            .map(|_| &self.prompts[rng.below(self.prompts.len() as u64) as usize])
            .collect();
        let per_prompt = if o.algo == Algo::Grpo || o.prompt_baseline {
            o.group_size
        } else {
            1
        };
        let seed = rng.next_u64();
        let mine = part.rows(picked.len());
        let local = self.measure(model, &picked[mine.clone()], mine.start, per_prompt, seed)?;
        let mut all = RolloutPart::default();
        for p in crate::dist::gather(crate::dist::world(), &local)? {
            all.append(p);
        }
        let RolloutPart {
            samples,
            old_logp,
            ref_logp,
            scores,
            values,
            entropy,
        } = all;
        if samples.is_empty() {
            anyhow::bail!("no responses could be sampled: the prompts fill the whole context");
        }
        if samples.len() < part.count {
            anyhow::bail!(
                "the rollout has {} responses, fewer than the {} ranks; raise --rollout-prompts",
                samples.len(),
                part.count
            );
        }
        let rows: Vec<&Row> = samples.iter().map(|s| &s.row).collect();
        let kl_seq: Vec<f64> = rows
            .iter()
            .zip(old_logp.iter().zip(&ref_logp))
            .map(|(row, (a, b))| row.sampled_log_ratio(a, b))
            .collect();
        let mut stats = vec![
            ("rollout_reward".to_string(), mean(&scores)),
            ("rollout_kl".to_string(), mean(&kl_seq)),
            (
                "rollout_length".to_string(),
                mean(&rows.iter().map(|r| r.len as f64).collect::<Vec<_>>()),
            ),
            (
                "rollout_entropy".to_string(),
                entropy.0 / entropy.1.max(1.0),
            ),
            // Every rank's responses, gathered: the statistics cover the whole rollout.
            ("rollout_responses".to_string(), samples.len() as f64),
        ];
        let checked: Vec<f64> = samples
            .iter()
            .filter_map(|s| {
                picked[s.prompt]
                    .answer
                    .as_ref()
                    .map(|a| f64::from(u8::from(check(a, &s.text))))
            })
            .collect();
        if !checked.is_empty() {
            stats.push(("rollout_accuracy".into(), mean(&checked)));
        }
        let mut experiences = Vec::with_capacity(samples.len());
        match o.algo {
            Algo::Ppo => {
                // With --prompt-baseline each score is taken relative to the mean of the other
                // answers to the same prompt (leave-one-out), removing how easy the prompt is.
                let shaped = if o.prompt_baseline {
                    leave_one_out(&samples, &scores)
                } else {
                    scores.clone()
                };
                let (mut all_adv, mut all_v, mut all_ret) = (Vec::new(), Vec::new(), Vec::new());
                let mut per_row = Vec::new();
                for i in 0..samples.len() {
                    // Reward: −β·KL per sampled token, the reward model's score added at the
                    // last token.
                    let row = &samples[i].row;
                    let mut r: Vec<f64> = old_logp[i]
                        .iter()
                        .zip(&ref_logp[i])
                        .enumerate()
                        .map(|(k, (a, b))| {
                            if row.sampled(k) {
                                -self.kl_coef * (a - b) as f64
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    *r.last_mut().expect("responses are nonempty") += shaped[i];
                    // Without a critic each token's advantage is its return: values of 0
                    // and λ = 1.
                    let (v, lambda) = if o.critic {
                        (values[i].iter().map(|&x| x as f64).collect(), o.lambda)
                    } else {
                        (vec![0.0; r.len()], 1.0)
                    };
                    let (adv, ret) = gae(&r, &v, o.gamma, lambda);
                    all_adv.extend(&adv);
                    // Explained variance measures the critic; there is none to measure.
                    if o.critic {
                        all_v.extend(&v);
                        all_ret.extend(&ret);
                    }
                    per_row.push((adv.len(), ret));
                }
                stats.push(("kl_coef".into(), self.kl_coef));
                if o.critic {
                    stats.push((
                        "explained_variance".into(),
                        explained_variance(&all_v, &all_ret),
                    ));
                    whiten(&mut all_adv);
                } else {
                    // The group's scores are already relative to their prompt. Centring them
                    // again over every token would subtract a mean weighted by answer length:
                    // long answers have more tokens, so a short refusal scored above its group
                    // could end up with a negative advantage.
                    scale_to_unit_spread(&mut all_adv);
                }
                let mut at = 0;
                for (i, (n, ret)) in per_row.into_iter().enumerate() {
                    experiences.push(Experience {
                        row: samples[i].row.clone(),
                        old_logp: old_logp[i].clone(),
                        ref_logp: ref_logp[i].clone(),
                        advantages: all_adv[at..at + n].iter().map(|&x| x as f32).collect(),
                        returns: ret.iter().map(|&x| x as f32).collect(),
                        old_values: values.get(i).cloned().unwrap_or_default(),
                    });
                    at += n;
                }
                // Adaptive KL controller (Ziegler et al. 2019): move β towards the target KL.
                if let Some(target) = o.target_kl {
                    let err = (mean(&kl_seq) / target - 1.0).clamp(-0.2, 0.2);
                    self.kl_coef *= 1.0 + err * samples.len() as f64 / o.kl_horizon;
                }
            }
            Algo::Grpo => {
                // Advantages: each sample's score against its group's mean and spread.
                for group in samples.chunks(o.group_size) {
                    let start = experiences.len();
                    let s = &scores[start..start + group.len()];
                    let m = mean(s);
                    let sd = (s.iter().map(|x| (x - m).powi(2)).sum::<f64>()
                        / s.len().max(1) as f64)
                        .sqrt();
                    for (j, sample) in group.iter().enumerate() {
                        let a = ((s[j] - m) / (sd + 1e-4)) as f32;
                        let i = start + j;
                        experiences.push(Experience {
                            row: sample.row.clone(),
                            old_logp: old_logp[i].clone(),
                            ref_logp: ref_logp[i].clone(),
                            advantages: vec![a; sample.row.len],
                            returns: Vec::new(),
                            old_values: Vec::new(),
                        });
                    }
                }
            }
            Algo::Dpo => unreachable!("DPO does not sample"),
        }
        // Epochs of shuffled minibatches, queued last first.
        let mut batches = Vec::new();
        for _ in 0..o.epochs {
            let mut order: Vec<usize> = (0..experiences.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut chunks: Vec<&[usize]> = order.chunks(o.minibatch).collect();
            // Every rank needs a row of each minibatch: a short last one joins the one before.
            if chunks.len() > 1 && chunks[chunks.len() - 1].len() < part.count {
                let n = chunks.len();
                chunks[n - 2] = &order[(n - 2) * o.minibatch..];
                chunks.pop();
            }
            for chunk in chunks {
                batches.push(chunk.iter().map(|&i| experiences[i].clone()).collect());
            }
        }
        batches.reverse();
        self.queue = batches;
        self.rollout_stats = stats;
        Ok(())
    }
}

/// What a rank sampled and measured of a rollout; the ranks' parts append into the whole.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct RolloutPart {
    /// Prompt indices into the whole rollout's prompts.
    samples: Vec<Sample>,
    old_logp: Vec<Vec<f32>>,
    ref_logp: Vec<Vec<f32>>,
    scores: Vec<f64>,
    /// PPO's value estimates per response token (empty for GRPO).
    values: Vec<Vec<f32>>,
    /// Entropy summed over response tokens, and their count.
    entropy: (f64, f64),
}

impl RolloutPart {
    fn append(&mut self, other: RolloutPart) {
        self.samples.extend(other.samples);
        self.old_logp.extend(other.old_logp);
        self.ref_logp.extend(other.ref_logp);
        self.scores.extend(other.scores);
        self.values.extend(other.values);
        self.entropy.0 += other.entropy.0;
        self.entropy.1 += other.entropy.1;
    }
}

/// Each score minus the mean score of the other samples of its prompt (unchanged when alone).
fn leave_one_out(samples: &[Sample], scores: &[f64]) -> Vec<f64> {
    let mut sums: std::collections::HashMap<usize, (f64, usize)> = Default::default();
    for (s, x) in samples.iter().zip(scores) {
        let e = sums.entry(s.prompt).or_default();
        e.0 += x;
        e.1 += 1;
    }
    samples
        .iter()
        .zip(scores)
        .map(|(s, x)| {
            let (sum, n) = sums[&s.prompt];
            if n > 1 {
                x - (sum - x) / (n - 1) as f64
            } else {
                *x
            }
        })
        .collect()
}

impl Stage for OnPolicy {
    fn build_heads(&mut self, vb: VarBuilder) -> Result<Vec<String>> {
        if self.opts.algo != Algo::Ppo || !self.opts.critic {
            return Ok(Vec::new());
        }
        self.value_head = Some(candle_nn::linear(self.hidden, 1, vb.pp("v_head"))?);
        Ok(vec!["v_head.weight".into(), "v_head.bias".into()])
    }

    fn head_lr_scale(&self) -> f64 {
        self.opts.value_lr_scale
    }

    fn batch_loss(&mut self, model: &Llama, rng: &mut Rng, part: Part) -> Result<(Tensor, usize)> {
        if self.queue.is_empty() {
            self.rollout(model, rng, part)?;
        }
        let batch = self.queue.pop().expect("a rollout queues minibatches");
        let o = &self.opts;
        let device = model.device().clone();
        let rows: Vec<&Row> = batch.iter().map(|e| &e.row).collect();
        // Every rank divides its rows' summed terms by the whole minibatch's response tokens.
        let count = rows
            .iter()
            .map(|r| r.trained_positions())
            .sum::<usize>()
            .max(1) as f64;
        let mine = part.rows(rows.len());
        let local = rows[mine.clone()]
            .iter()
            .map(|r| r.trained_positions())
            .sum::<usize>()
            .max(1) as f64;
        // This rank's rows run in groups of similar length; each term is a sum over tokens, so
        // the groups' shares add up to the minibatch's.
        let lens: Vec<usize> = rows[mine.clone()].iter().map(|r| r.ids.len()).collect();
        let mut loss: Option<Tensor> = None;
        let (mut pg_sum, mut vf_sum, mut kl_sum, mut clipped, mut approx_kl) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        for group in length_groups(&lens) {
            let idx: Vec<usize> = group.iter().map(|&g| mine.start + g).collect();
            let g_rows: Vec<&Row> = idx.iter().map(|&i| rows[i]).collect();
            let p = pack(&g_rows, self.pad, &device)?;
            let col = |f: &dyn Fn(&Experience) -> &[f32]| -> Result<Tensor> {
                let v: Vec<&[f32]> = idx.iter().map(|&i| f(&batch[i])).collect();
                place(&g_rows, p.width, &v, &device)
            };
            let mask = &p.mask;
            let old_logp = col(&|e| &e.old_logp)?;
            let adv = col(&|e| &e.advantages)?;
            let hidden = model.hidden(&p.x, None)?;
            let logp = model.hidden_token_nll(&hidden, &p.y)?.neg()?;
            let masked_share =
                |t: &Tensor| -> Result<Tensor> { Ok(((t * mask)?.sum_all()? / count)?) };
            let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
            let (surrogate, ratio) = clipped_surrogate(&logp, &old_logp, &adv, o.clip)?;
            let pg = masked_share(&surrogate)?;
            pg_sum += scalar(&pg)?;
            let mut group_loss = pg;
            match o.algo {
                // The value loss trains the head only: its gradient through the shared trunk
                // moved the policy as much as the policy gradient did. Without a critic the KL
                // penalty is in the advantages already.
                Algo::Ppo => {
                    if let Some(head) = self.value_head.as_ref() {
                        let values = head.forward(&hidden.detach())?.squeeze(D::Minus1)?;
                        let old_v = col(&|e| &e.old_values)?;
                        let ret = col(&|e| &e.returns)?;
                        let vf = masked_share(&clipped_value_loss(
                            &values,
                            &old_v,
                            &ret,
                            o.value_clip,
                        )?)?;
                        vf_sum += scalar(&vf)?;
                        group_loss = (group_loss + (vf * o.vf_coef)?)?;
                    }
                }
                Algo::Grpo => {
                    if o.kl_coef > 0.0 {
                        let ref_logp = col(&|e| &e.ref_logp)?;
                        let kl = masked_share(&kl_k3_tensor(&logp, &ref_logp)?)?;
                        kl_sum += scalar(&kl)?;
                        group_loss = (group_loss + (kl * o.kl_coef)?)?;
                    }
                }
                Algo::Dpo => unreachable!(),
            }
            clipped += scalar(
                &((&ratio - 1.0)?
                    .abs()?
                    .gt(o.clip)?
                    .to_dtype(candle_core::DType::F32)?
                    * mask)?
                    .sum_all()?,
            )?;
            approx_kl += scalar(&masked_share(&((&logp - &old_logp)?.sqr()? * 0.5)?)?)?;
            loss = Some(match loss {
                None => group_loss,
                Some(l) => (l + group_loss)?,
            });
        }
        let mut loss = match loss {
            Some(l) => l,
            None => Tensor::zeros((), candle_core::DType::F32, &device)?,
        };
        // Statistics are this rank's own means (the trainer averages them over ranks).
        let own_mean = |share: f64| share * count / local;
        let mut stats = vec![("policy_loss".to_string(), own_mean(pg_sum))];
        match o.algo {
            Algo::Ppo if o.critic => stats.push(("value_loss".into(), own_mean(vf_sum))),
            Algo::Grpo if o.kl_coef > 0.0 => stats.push(("kl_loss".into(), own_mean(kl_sum))),
            _ => {}
        }
        stats.push(("clip_fraction".into(), clipped / local));
        stats.push(("approx_kl".into(), own_mean(approx_kl)));
        let tokens = rows[mine.clone()].iter().map(|r| r.ids.len()).sum();
        if let Some(shards) = &self.ptx {
            let w = packed_width(&rows);
            let cut = |t: &Tensor| t.narrow(0, mine.start, mine.len());
            let (x, y) = crate::train::pretrain::sample_batch(
                &shards.train,
                rng,
                rows.len().max(1),
                w.min(model.config.max_position_embeddings),
                &device,
            )?;
            let lm = model.loss(&cut(&x)?, &cut(&y)?)?;
            stats.push(("ptx_loss".into(), lm.to_scalar::<f32>()? as f64));
            loss = (loss + (lm * (o.ptx_coef * part.share(rows.len())))?)?;
        }
        self.step_stats = stats;
        Ok((loss, tokens))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>> {
        self.eval.measure(model)
    }

    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({
            "kl_coef": self.kl_coef,
            "queue": self.queue,
            "rollout_stats": self.rollout_stats,
        })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let bad = || anyhow::anyhow!("the checkpoint's RLHF state is unreadable");
        self.kl_coef = state["kl_coef"].as_f64().ok_or_else(bad)?;
        self.queue = serde_json::from_value(state["queue"].clone()).map_err(|_| bad())?;
        self.rollout_stats =
            serde_json::from_value(state["rollout_stats"].clone()).map_err(|_| bad())?;
        Ok(())
    }

    fn step_metrics(&mut self) -> Vec<(String, f64)> {
        let mut m = self.rollout_stats.clone();
        m.extend(self.step_stats.iter().cloned());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: usize) -> Sample {
        Sample {
            prompt,
            row: Row::new(&[1], &[2]),
            text: String::new(),
            stopped: true,
        }
    }

    #[test]
    fn leave_one_out_scores_against_the_other_answers_of_the_prompt() {
        let samples = [sample(0), sample(0), sample(0), sample(1)];
        let got = leave_one_out(&samples, &[1.0, 2.0, 6.0, 5.0]);
        // 1 − (2+6)/2, 2 − (1+6)/2, 6 − (1+2)/2; a lone answer keeps its score.
        assert_eq!(got, vec![-3.0, -1.5, 4.5, 5.0]);
    }
}
