//! The training loop's handling of non-finite losses: skipped and counted, and a run of them stops
//! training with the last good checkpoint intact.

mod common;

use candle_core::{Device, Tensor};
use chatforge::dist::Part;
use chatforge::model::Llama;
use chatforge::tokenizer::{Tokenizer, TrainOptions};
use chatforge::train::checkpoint;
use chatforge::train::trainer::{train, RunSpec, Stage, Start};
use chatforge::util::Rng;

/// Next-token loss on one fixed batch; the steps in `bad` return NaN instead.
struct Flaky {
    tokens: Vec<u32>,
    call: usize,
    bad: Vec<usize>,
}

impl Stage for Flaky {
    fn batch_loss(
        &mut self,
        model: &Llama,
        _rng: &mut Rng,
        _part: Part,
    ) -> anyhow::Result<(Tensor, usize)> {
        self.call += 1;
        let n = self.tokens.len() - 1;
        let x = Tensor::new(&self.tokens[..n], &Device::Cpu)?.unsqueeze(0)?;
        let y = Tensor::new(&self.tokens[1..], &Device::Cpu)?.unsqueeze(0)?;
        let loss = model.loss(&x, &y)?;
        let loss = if self.bad.contains(&self.call) {
            (loss * f64::NAN)?
        } else {
            loss
        };
        Ok((loss, n))
    }

    fn evaluate(&mut self, _model: &Llama) -> anyhow::Result<Vec<(String, f64)>> {
        Ok(vec![("zero".into(), 0.0)])
    }
}

fn run(dir: &std::path::Path, bad: Vec<usize>, steps: usize) -> anyhow::Result<(usize, f64)> {
    let corpus = common::mixed_corpus();
    let (tok, _) = Tokenizer::train(
        &[corpus.as_str()],
        &TrainOptions {
            vocab_size: 300,
            ..Default::default()
        },
    )?;
    let config = common::tiny_config(tok.vocab_size(), 64);
    let tokens: Vec<u32> = tok.encode(&corpus[..200])?.into_iter().take(33).collect();
    let mut stage = Flaky {
        tokens,
        call: 0,
        bad,
    };
    let mut opts = common::quiet_loop(steps, 1e-2);
    opts.checkpoint_every = 4;
    opts.max_bad_steps = 3;
    let r = train(
        &opts,
        RunSpec {
            stage: "test",
            out: dir,
            config: &config,
            tokenizer: &tok,
            start: Start::Fresh {
                zero_outputs: false,
            },
            hyper: serde_json::Value::Null,
            parents: Vec::new(),
            data: serde_json::Value::Null,
            lora: None,
            batch_size: 1,
        },
        &mut stage,
    )?;
    Ok((r.skipped_steps, r.final_train_loss))
}

#[test]
fn a_non_finite_step_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (skipped, loss) = run(dir.path(), vec![3, 7, 8], 12).unwrap();
    assert_eq!(skipped, 3);
    // The skipped steps left the weights usable: training went on and finished finite.
    assert!(loss.is_finite(), "{loss}");
    assert!(dir.path().join("model.safetensors").exists());
}

#[test]
fn non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(dir.path(), vec![6, 7, 8, 9], 12)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 steps in a row"), "{e}");
    let checkpoints = checkpoint::list_checkpoints(dir.path()).unwrap();
    assert_eq!(checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4]);
    let good = checkpoints[0].1.display().to_string();
    assert!(e.contains(&good) && e.contains("--resume"), "{e}");
    assert!(!dir.path().join("model.safetensors").exists());
}
