//! Token sampling: temperature, top-k, top-p (nucleus), seeded.

use crate::util::Rng;

/// How a reply is decoded: every caller (generate, chat, eval, RL rollouts, the reward model's
/// sampling, the server) passes this one struct, and [`SamplingParams::validate`] holds the rules.
/// The CLI flags derive from it, so each default is written once, here.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct SamplingParams {
    /// The most new tokens in a reply.
    #[arg(long, default_value_t = SamplingParams::DEFAULT.max_tokens)]
    pub max_tokens: usize,
    /// 0 means greedy (argmax) and deterministic.
    #[arg(long, default_value_t = SamplingParams::DEFAULT.temperature)]
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = SamplingParams::DEFAULT.top_k)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = SamplingParams::DEFAULT.top_p)]
    pub top_p: f64,
    #[arg(long, default_value_t = SamplingParams::DEFAULT.seed)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); it is not part of the reply.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Subtracted from a token's logit once if it appeared in the reply (OpenAI's).
    #[arg(long, default_value_t = SamplingParams::DEFAULT.presence_penalty, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per appearance in the reply (OpenAI's).
    #[arg(long, default_value_t = SamplingParams::DEFAULT.frequency_penalty, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Added to these tokens' logits at every step (OpenAI's `logit_bias`).
    #[arg(skip)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each reply token's log-probability with this many most likely alternatives
    /// (0 to [`MAX_TOP_LOGPROBS`]); `None` reports none (OpenAI's `logprobs`/`top_logprobs`).
    #[arg(skip)]
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// What the reply must match (a JSON schema, a Lark grammar, a regular expression): tokens
    /// that would leave it are never sampled.
    #[arg(skip)]
    #[serde(default)]
    pub grammar: Option<super::grammar::Grammar>,
}

/// The most alternatives a reply token's log-probability comes with (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// The one set of defaults (llama.cpp's server samples at 0.8 too).
    pub const DEFAULT: SamplingParams = SamplingParams {
        max_tokens: 200,
        temperature: 0.8,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        stop: Vec::new(),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        logprobs: None,
        grammar: None,
    };

    /// Greedy decoding of at most `max_tokens`, the rest default.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            temperature: 0.0,
            ..Self::DEFAULT
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A sampling setting outside its range: which field, and the message the user sees.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSampling {
    /// The field's name as the API spells it (the CLI flag is the same with dashes).
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for InvalidSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InvalidSampling {}

impl SamplingParams {
    /// The rules, the same for the CLI and the server (OpenAI's ranges).
    pub fn check(&self) -> Result<(), InvalidSampling> {
        let bad = |field: &'static str, message: String| Err(InvalidSampling { field, message });
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad(
                "temperature",
                format!(
                    "temperature must be between 0 and 2, got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("{field} must be between -2 and 2, got {v}"));
            }
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            );
        }
        if let Some(&(_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(
                "logit_bias",
                format!("logit_bias values must be between -100 and 100, got {b}"),
            );
        }
        if self.stop.len() > 4 {
            return bad(
                "stop",
                format!("at most 4 stop strings, got {}", self.stop.len()),
            );
        }
        Ok(())
    }

    /// [`SamplingParams::check`] for the command line: the message names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check()
            .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.truncate(p.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if r < cum {
                return cands[i].0;
            }
        }
        cands[probs.len() - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let c = counts(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            &[0.1, 2.0, 1.9],
            50,
        );
        assert_eq!(c, vec![0, 50, 0]);
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
            &logits,
            8000,
        );
        let frac = c[1] as f64 / 8000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0f32, 2.9, 0.0, -1.0];
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_k: 2,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert_eq!(c[2] + c[3], 0);
        assert!(c[0] > 0 && c[1] > 0);
        // p = 0.5: the first token alone already holds more than half the mass.
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                ..Default::default()
            },
            &logits,
            500,
        );
        assert_eq!(c[0], 500);
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 5,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..30).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..30).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }
}
