//! Rollouts shared by the RLHF algorithms: sampling responses with the KV-cache sampler, packing
//! prompt+response rows into right-padded batches, and per-token log-probabilities of responses.

use crate::data::prefs::RlPrompt;
use crate::infer::generate::{generate_batch, FinishReason};
use crate::infer::sampler::SamplingParams;
use crate::model::Llama;
use crate::tokenizer::chat::{render, ChatTemplate};
use crate::tokenizer::Tokenizer;
use crate::train::padding::length_groups;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// A prompt followed by a response. Target position `start + k` (the input at `start + k`
/// predicts `ids[start + k + 1]`) is response token k.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub ids: Vec<u32>,
    pub start: usize,
    /// Response tokens (including the end-of-turn token when the response stopped).
    pub len: usize,
    /// Response positions the decoding core wrote (calculator outputs): not the policy's actions,
    /// so no loss reaches them.
    #[serde(default)]
    pub forced: Vec<usize>,
}

impl Row {
    pub fn new(prompt: &[u32], response: &[u32]) -> Row {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(response);
        Row {
            ids,
            start: prompt.len() - 1,
            len: response.len(),
            forced: Vec::new(),
        }
    }

    /// The row with the response positions in `forced` left out of the loss.
    pub fn with_forced(mut self, forced: Vec<usize>) -> Row {
        self.forced = forced;
        self
    }

    /// Response positions the loss trains: the policy's own draws.
    pub fn trained_positions(&self) -> usize {
        (0..self.len).filter(|&k| self.sampled(k)).count()
    }

    pub fn response(&self) -> &[u32] {
        &self.ids[self.start + 1..]
    }

    /// Whether response position `k` is the policy's own draw, not a forced calculator output.
    pub fn sampled(&self, k: usize) -> bool {
        !self.forced.contains(&k)
    }

    /// log π − log π_ref summed over the positions the policy drew: the k1 estimate of the
    /// response's KL. Forced positions are no draws from π, so their log-ratio estimates nothing;
    /// counted, they turned the KL negative as the policy drifted on tokens no loss reaches.
    pub fn sampled_log_ratio(&self, logp: &[f32], ref_logp: &[f32]) -> f64 {
        logp.iter()
            .zip(ref_logp)
            .enumerate()
            .filter(|(k, _)| self.sampled(*k))
            .map(|(_, (a, b))| (a - b) as f64)
            .sum()
    }
}

/// Inputs, targets and response mask of right-padded rows, all [N, T].
pub struct Packed {
    pub x: Tensor,
    pub y: Tensor,
    pub mask: Tensor,
    pub width: usize,
}

/// Input positions of `rows` packed together: the longest row's, at least 1.
pub fn packed_width(rows: &[&Row]) -> usize {
    rows.iter()
        .map(|r| r.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1)
}

pub fn pack(rows: &[&Row], pad: u32, device: &Device) -> Result<Packed> {
    let width = packed_width(rows);
    let n = rows.len();
    let (mut x, mut y, mut m) = (
        Vec::with_capacity(n * width),
        Vec::with_capacity(n * width),
        Vec::with_capacity(n * width),
    );
    for r in rows {
        for t in 0..width {
            x.push(r.ids.get(t).copied().unwrap_or(pad));
            y.push(r.ids.get(t + 1).copied().unwrap_or(pad));
            let resp = t >= r.start && t < r.start + r.len && !r.forced.contains(&(t - r.start));
            m.push(if resp { 1f32 } else { 0.0 });
        }
    }
    Ok(Packed {
        x: Tensor::from_vec(x, (n, width), device)?,
        y: Tensor::from_vec(y, (n, width), device)?,
        mask: Tensor::from_vec(m, (n, width), device)?,
        width,
    })
}

/// Places per-response-token values of each row at their positions in a [N, width] tensor.
pub fn place(rows: &[&Row], width: usize, values: &[&[f32]], device: &Device) -> Result<Tensor> {
    let mut out = vec![0f32; rows.len() * width];
    for (i, (r, v)) in rows.iter().zip(values).enumerate() {
        for (k, &x) in v.iter().enumerate().take(r.len) {
            out[i * width + r.start + k] = x;
        }
    }
    Ok(Tensor::from_vec(out, (rows.len(), width), device)?)
}

/// Reads the response positions of each row out of a [N, width] tensor.
pub fn gather(rows: &[&Row], t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let all: Vec<Vec<f32>> = t.to_vec2()?;
    Ok(rows
        .iter()
        .zip(all)
        .map(|(r, v)| v[r.start..r.start + r.len].to_vec())
        .collect())
}

/// `f` of each row, with the rows packed in groups of similar length of at most `max_rows`
/// (see [`length_groups`]); results come back in the rows' order.
pub fn per_row_in_groups<T: Default + Clone>(
    rows: &[&Row],
    pad: u32,
    device: &Device,
    max_rows: usize,
    mut f: impl FnMut(&[&Row], &Packed) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let lens: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
    let mut out = vec![T::default(); rows.len()];
    for group in length_groups(&lens) {
        for chunk in group.chunks(max_rows.max(1)) {
            let part: Vec<&Row> = chunk.iter().map(|&i| rows[i]).collect();
            let packed = pack(&part, pad, device)?;
            for (&i, v) in chunk.iter().zip(f(&part, &packed)?) {
                out[i] = v;
            }
        }
    }
    Ok(out)
}

/// Per-token log-probabilities of each row's response under `model` (no gradient).
pub fn response_logprobs(model: &Llama, rows: &[&Row], pad: u32) -> Result<Vec<Vec<f32>>> {
    per_row_in_groups(rows, pad, model.device(), 16, |part, p| {
        gather(part, &model.token_nll(&p.x, &p.y)?.neg()?)
    })
}

/// Entropy (nats) of the next-token distribution summed over response positions, and how many
/// positions (no gradient).
pub fn response_entropy_sums(model: &Llama, rows: &[&Row], pad: u32) -> Result<(f64, f64)> {
    let per_row = per_row_in_groups(rows, pad, model.device(), 8, |_, p| {
        let logits = model.forward(&p.x, None)?;
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let ent = (logp.exp()? * &logp)?.sum(candle_core::D::Minus1)?.neg()?;
        let sums: Vec<f32> = (ent * &p.mask)?.sum(1)?.to_vec1()?;
        let counts: Vec<f32> = p.mask.sum(1)?.to_vec1()?;
        Ok(sums
            .into_iter()
            .zip(counts)
            .map(|(s, c)| (s as f64, c as f64))
            .collect())
    })?;
    Ok(per_row
        .into_iter()
        .fold((0.0, 0.0), |(s, c), (a, b)| (s + a, c + b)))
}

/// One sampled response.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Index into the prompts given.
    pub prompt: usize,
    pub row: Row,
    pub text: String,
    /// Ended with an end-of-turn token or a stop string rather than at the length limit.
    pub stopped: bool,
}

/// Everything needed to sample from a policy.
pub struct Sampling<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub stops: &'a [u32],
    /// Strings that end a response (cut from its text; the tokens that wrote them stay).
    pub stop: &'a [String],
    pub max_new_tokens: usize,
}

/// Prompt tokens a context of `context` keeps beside `max_new_tokens` of answer; longer prompts lose
/// their start.
pub fn prompt_room(context: usize, max_new_tokens: usize) -> usize {
    context.saturating_sub(max_new_tokens).max(1)
}

impl Sampling<'_> {
    /// The prompt's ids with the assistant header, cut from the left to leave room to answer.
    pub fn prompt_ids(&self, model: &Llama, p: &RlPrompt) -> Result<Vec<u32>> {
        let mut ids = render(self.tokenizer, self.template, &p.messages, true)?.ids;
        let room = prompt_room(model.config.max_position_embeddings, self.max_new_tokens);
        if ids.len() > room {
            ids.drain(..ids.len() - room);
        }
        Ok(ids)
    }

    /// `per_prompt` responses to each prompt, sampled at `temperature` (0 = greedy) with `seed`.
    pub fn sample(
        &self,
        model: &Llama,
        prompts: &[&RlPrompt],
        per_prompt: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<Sample>> {
        let mut jobs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let ids = self.prompt_ids(model, p)?;
            for _ in 0..per_prompt {
                jobs.push((i, ids.clone()));
            }
        }
        let mut out = Vec::with_capacity(jobs.len());
        for (c, chunk) in jobs.chunks(32).enumerate() {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
            let params = SamplingParams {
                max_tokens: self.max_new_tokens,
                temperature,
                seed: seed.wrapping_add(1000 * c as u64),
                stop: self.stop.to_vec(),
                ..SamplingParams::DEFAULT
            };
            let gen = generate_batch(model, self.tokenizer, &ids, &params, self.stops)?;
            for ((prompt, ids), g) in chunk.iter().zip(gen) {
                let mut response = g.tokens.clone();
                response.extend(g.stop_token);
                if response.is_empty() {
                    // The context was full: nothing to learn from this prompt.
                    continue;
                }
                out.push(Sample {
                    prompt: *prompt,
                    row: Row::new(ids, &response).with_forced(g.forced),
                    text: g.text,
                    stopped: g.finish_reason == FinishReason::Stop,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A calculator output the decoding core wrote is no draw from the policy: its log-ratio
    /// stays out of the KL estimate, whatever the policy now thinks of it.
    #[test]
    fn the_kl_estimate_counts_only_sampled_tokens() {
        let row = Row::new(&[1], &[6, 7, 8]).with_forced(vec![1]);
        let (logp, ref_logp) = ([-0.5f32, -9.0, -1.0], [-0.75f32, -0.1, -1.5]);
        assert!((row.sampled_log_ratio(&logp, &ref_logp) - 0.75).abs() < 1e-6);
        let unforced = Row::new(&[1], &[6, 7, 8]);
        assert!(unforced.sampled_log_ratio(&logp, &ref_logp) < 0.0);
    }

    #[test]
    fn packing_marks_exactly_the_response_targets() {
        let a = Row::new(&[1, 2, 3], &[4, 5]);
        let b = Row::new(&[1], &[6, 7, 8]).with_forced(vec![1]);
        assert_eq!(a.response(), &[4, 5]);
        let p = pack(&[&a, &b], 0, &Device::Cpu).unwrap();
        let x: Vec<Vec<u32>> = p.x.to_vec2().unwrap();
        let y: Vec<Vec<u32>> = p.y.to_vec2().unwrap();
        let m: Vec<Vec<f32>> = p.mask.to_vec2().unwrap();
        assert_eq!(x[0], vec![1, 2, 3, 4]);
        assert_eq!(y[0], vec![2, 3, 4, 5]);
        assert_eq!(m[0], vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(y[1], vec![6, 7, 8, 0]);
        assert_eq!(m[1], vec![1.0, 0.0, 1.0, 0.0]);
        let v = place(
            &[&a, &b],
            p.width,
            &[&[9.0, 8.0], &[1.0, 2.0, 3.0]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            gather(&[&a, &b], &v).unwrap(),
            vec![vec![9.0, 8.0], vec![1.0, 2.0, 3.0]]
        );
    }

    #[test]
    fn log_probs_of_mixed_lengths_match_each_row_alone_in_order() {
        use crate::model::LlamaConfig;
        let config = LlamaConfig::small(64, 64);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        let model = Llama::new(&config, vb).unwrap();
        let mut rng = crate::util::Rng::new(4);
        crate::model::llama::seeded_init(&config, &varmap, &mut rng, false).unwrap();
        // Short and long responses interleaved: grouping reorders them, and more rows than one
        // chunk holds.
        let rows: Vec<Row> = (0..20u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..3 + i % 4).map(|t| (t * 3 + i) % 60 + 1).collect();
                let n = if i % 2 == 0 { 2 + i } else { 45 };
                let response: Vec<u32> = (0..n).map(|t| (t * 7 + i) % 60 + 1).collect();
                Row::new(&prompt, &response).with_forced(if i % 5 == 0 { vec![1] } else { vec![] })
            })
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        let together = response_logprobs(&model, &refs, 0).unwrap();
        assert_eq!(together.len(), rows.len());
        for (i, r) in refs.iter().enumerate() {
            let alone = response_logprobs(&model, &[r], 0).unwrap();
            assert_eq!(together[i].len(), r.len, "row {i}");
            for (a, b) in together[i].iter().zip(&alone[0]) {
                assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
            }
        }
        let (sum, count) = response_entropy_sums(&model, &refs, 0).unwrap();
        assert_eq!(
            count as usize,
            rows.iter().map(|r| r.trained_positions()).sum::<usize>()
        );
        let alone: f64 = refs
            .iter()
            .map(|r| response_entropy_sums(&model, &[r], 0).unwrap().0)
            .sum();
        assert!((sum - alone).abs() < 1e-3 * alone, "{sum} vs {alone}");
    }
}
