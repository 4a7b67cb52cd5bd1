//! Pretraining end to end on a tiny model: learning, exact resume, generation from the run.

mod common;

use chatforge::infer::generate::{
    generate, generate_batch, generate_from_ids, stop_ids, FinishReason,
};
use chatforge::infer::sampler::SamplingParams;
use chatforge::train::pretrain::pretrain;

#[test]
fn loss_falls_well_below_unigram_and_the_run_generates() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    let report = pretrain(&common::tiny_pretrain(&shards, &cfg, &run, 120)).unwrap();
    let first = report.losses[0].1;
    assert!(
        report.val_loss < first - 1.5,
        "val {} vs first {first}",
        report.val_loss
    );
    assert!(
        report.val_loss < report.unigram_val_nats - 1.0,
        "val {} vs unigram {}",
        report.val_loss,
        report.unigram_val_nats
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chatforge.json",
        "report.json",
        "metrics.jsonl",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(ckpts.len(), 2, "only the last K checkpoints are kept");

    let lm = chatforge::model::load(&run, &candle_core::Device::Cpu).unwrap();
    let greedy = SamplingParams::greedy(40);
    let mut streamed = String::new();
    let a = generate(&lm, "Once upon a time", &greedy, |p| {
        streamed.push_str(p);
        Ok(())
    })
    .unwrap();
    assert_eq!(streamed, a.text, "streamed pieces add up to the text");
    let b = generate(&lm, "Once upon a time", &greedy, |_| Ok(())).unwrap();
    assert_eq!(a.tokens, b.tokens, "greedy is deterministic");
    // The corpus continues "Once upon a time, the cat number ...": a trained model knows.
    assert!(a.text.starts_with(", the cat"), "{:?}", a.text);

    // A stop string ends generation and is not included.
    let stop = SamplingParams {
        stop: vec!["cat".into()],
        ..greedy.clone()
    };
    let s = generate(&lm, "Once upon a time", &stop, |_| Ok(())).unwrap();
    assert_eq!(s.text, ", the ");
    assert_eq!(s.finish_reason, FinishReason::Stop);

    // Each paragraph of the corpus ends with this line: the model ends the document (EOS) there.
    let end = generate(
        &lm,
        "Emoji time 🎉🐱 and café naïve résumé.",
        &greedy,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(end.finish_reason, FinishReason::Stop, "{:?}", end.text);
    assert!(end.tokens.len() < 5, "{:?}", end.text);
    // max_tokens ends a generation that has not stopped.
    let short = SamplingParams {
        max_tokens: 3,
        ..greedy.clone()
    };
    let s3 = generate(&lm, "Once upon a time", &short, |_| Ok(())).unwrap();
    assert_eq!(
        (s3.tokens.len(), s3.finish_reason),
        (3, FinishReason::Length)
    );

    // Sampling with a seed is reproducible; different seeds differ somewhere.
    let sampled = |seed| {
        let o = SamplingParams {
            temperature: 1.5,
            seed,
            ..greedy.clone()
        };
        generate(&lm, "The", &o, |_| Ok(())).unwrap().tokens
    };
    assert_eq!(sampled(1), sampled(1));
    assert!((2..6).any(|s| sampled(s) != sampled(1)));

    // Batched greedy decoding of prompts of different lengths equals decoding each alone.
    let bos = lm.tokenizer.bos_id().unwrap();
    let prompts: Vec<Vec<u32>> = ["Once upon a time", "The", "小猫坐在垫子上", "fn add(a: i32"]
        .iter()
        .map(|p| {
            let mut ids = vec![bos];
            ids.extend(lm.tokenizer.encode(p).unwrap());
            ids
        })
        .collect();
    let stops = stop_ids(&lm);
    let batch = generate_batch(
        &lm.model,
        &lm.tokenizer,
        &prompts,
        &SamplingParams {
            max_tokens: 15,
            ..greedy.clone()
        },
        &stops,
    )
    .unwrap();
    for (p, o) in prompts.iter().zip(&batch) {
        let single = generate_from_ids(
            &lm,
            p,
            &SamplingParams {
                max_tokens: 15,
                ..greedy.clone()
            },
            &stops,
            None,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(o.tokens, single.tokens);
        assert_eq!(o.finish_reason, single.finish_reason);
    }

    // Prompts prefilled in pieces of 2 positions between the decode steps of rows already
    // running (the server's chunked prefill) reply as they do alone.
    {
        use chatforge::infer::decode::{Decoder, Request, Update};
        let params = SamplingParams {
            max_tokens: 15,
            ..greedy.clone()
        };
        let request = |key: usize| Request {
            key,
            prompt: prompts[key].clone(),
            params: params.clone(),
            stop_ids: stops.clone(),
        };
        let mut decoder = Decoder::new(&lm.model, &lm.tokenizer);
        let mut updates = Vec::new();
        decoder.join(vec![request(1)], &mut updates).unwrap();
        decoder
            .begin_join(vec![request(0), request(2), request(3)])
            .unwrap();
        let mut pieces = 0;
        while decoder.prefill_left() > 0 {
            assert_eq!(decoder.len(), 4);
            decoder.prefill(2, &mut updates).unwrap();
            decoder.step(&mut updates).unwrap();
            pieces += 1;
        }
        assert!(pieces >= 3, "{pieces} pieces");
        while !decoder.is_empty() {
            decoder.step(&mut updates).unwrap();
        }
        for (key, expected) in batch.iter().enumerate() {
            let reply = updates
                .iter()
                .find_map(|u| match u {
                    Update::Done(r) if r.key == key => Some(r),
                    _ => None,
                })
                .unwrap();
            assert_eq!(reply.tokens, expected.tokens, "prompt {key}");
        }
    }

    // A prompt longer than the context is refused with the numbers.
    let long = "cat ".repeat(200);
    let err = generate(&lm, &long, &greedy, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("context is 64"), "{err}");
}

/// Every step a resumed run logged has the uninterrupted run's loss at that step.
fn assert_resumed_losses_match(
    resumed: &chatforge::train::pretrain::PretrainReport,
    full: &chatforge::train::pretrain::PretrainReport,
) {
    for (step, loss) in &resumed.losses {
        let expected = full.losses[step - 1].1;
        assert!(
            (loss - expected).abs() < 1e-5,
            "step {step}: {loss} vs {expected}"
        );
    }
}

#[test]
fn resume_after_a_kill_reproduces_the_uninterrupted_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let full = pretrain(&common::tiny_pretrain(
        &shards,
        &cfg,
        &dir.path().join("full"),
        14,
    ))
    .unwrap();

    let run = dir.path().join("killed");
    let mut first = common::tiny_pretrain(&shards, &cfg, &run, 14);
    first.train.halt_after = Some(6);
    let part = pretrain(&first).unwrap();
    assert_eq!(part.steps, 6);
    assert!(
        !run.join("model.safetensors").exists(),
        "a halted run is not a finished run"
    );

    // Without --resume an existing run is refused rather than overwritten.
    let err = pretrain(&common::tiny_pretrain(&shards, &cfg, &run, 14))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");

    let mut again = common::tiny_pretrain(&shards, &cfg, &run, 14);
    again.train.resume = true;
    let resumed = pretrain(&again).unwrap();
    assert_eq!(resumed.steps, 14);
    assert_eq!(resumed.losses.first().unwrap().0, 7);
    assert_resumed_losses_match(&resumed, &full);
    assert!((resumed.val_loss - full.val_loss).abs() < 1e-5);
    // metrics.jsonl holds each step once.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    let mut dedup = steps.clone();
    dedup.dedup();
    assert_eq!(steps, dedup);
}

#[test]
fn resuming_with_a_different_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    let mut o = common::tiny_pretrain(&shards, &cfg, &run, 8);
    o.train.halt_after = Some(4);
    pretrain(&o).unwrap();
    let mut other = common::tiny_config(320, 64);
    other.hidden_size = 48;
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, serde_json::to_string(&other).unwrap()).unwrap();
    let mut r = common::tiny_pretrain(&shards, &other_path, &run, 8);
    r.train.resume = true;
    let err = format!("{:#}", pretrain(&r).unwrap_err());
    assert!(
        err.contains("different model config") && err.contains("hidden_size"),
        "{err}"
    );
}

/// Evaluation and RL rollouts decode through the same core as `generate`, so a stop string ends
/// their replies too: the reply is the greedy reply cut where the stop string starts.
#[test]
fn a_stop_string_ends_replies_in_eval_and_in_rl_rollouts() {
    use chatforge::data::prefs::RlPrompt;
    use chatforge::eval::model::{Evaluatee, ModelEvaluatee, Prompt};
    use chatforge::rlhf::rollout::Sampling;
    use chatforge::tokenizer::chat::{ChatTemplate, Message, Role};

    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    pretrain(&common::tiny_pretrain(&shards, &cfg, &run, 60)).unwrap();
    let lm = chatforge::model::load(&run, &candle_core::Device::Cpu).unwrap();

    /// A stop string taken from the middle of `text`, and where it starts.
    fn stop_inside(text: &str) -> (String, usize) {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        assert!(chars.len() >= 6, "the reply is too short to cut: {text:?}");
        let (start, end) = (chars[2].0, chars[4].0);
        let stop = text[start..end].to_string();
        (stop.clone(), text.find(&stop).unwrap())
    }

    let mut evaluatee = ModelEvaluatee {
        lm: &lm,
        template: None,
        batch_size: 4,
        truncated_prompts: 0,
        progress: indicatif::ProgressBar::hidden(),
    };
    let prompts = [Prompt::Text("Once upon a time".into())];
    let full = evaluatee.generate(&prompts, 30, &[]).unwrap().remove(0);
    let (stop, at) = stop_inside(&full.text);
    let cut = evaluatee
        .generate(&prompts, 30, std::slice::from_ref(&stop))
        .unwrap()
        .remove(0);
    assert_eq!(cut.text, full.text[..at], "stop {stop:?}");
    assert!(cut.stopped, "a stop string counts as stopping");

    let template = ChatTemplate::detect(&lm.tokenizer).unwrap();
    let stops = stop_ids(&lm);
    let rl_prompt = RlPrompt {
        messages: vec![Message::new(Role::User, "Tell me a story.")],
        family: None,
        answer: None,
    };
    let sample = |stop: &[String]| {
        let s = Sampling {
            tokenizer: &lm.tokenizer,
            template: &template,
            stops: &stops,
            stop,
            max_new_tokens: 30,
        };
        s.sample(&lm.model, &[&rl_prompt], 1, 0.0, 7)
            .unwrap()
            .remove(0)
    };
    let full = sample(&[]);
    let (stop, at) = stop_inside(&full.text);
    let cut = sample(std::slice::from_ref(&stop));
    assert_eq!(cut.text, full.text[..at], "stop {stop:?}");
    assert!(cut.stopped);
    assert!(
        cut.row.len < full.row.len,
        "decoding ended at the stop string"
    );
}

/// `--optimizer muon` learns the tiny corpus about as fast as AdamW's test asks of AdamW, and a
/// killed Muon run resumes to the same losses (its momentum is saved with the checkpoint), and
/// only with Muon: under AdamW its saved momentum would be read as AdamW's moments.
#[test]
fn muon_learns_and_resumes_exactly() {
    use chatforge::train::optim::MatrixOptimizer;
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let muon = |out: &str, steps: usize| {
        let mut o = common::tiny_pretrain(&shards, &cfg, &dir.path().join(out), steps);
        o.train.optimizer = MatrixOptimizer::Muon;
        o
    };
    let learned = pretrain(&muon("learned", 120)).unwrap();
    let first = learned.losses[0].1;
    assert!(
        learned.val_loss < first - 1.5,
        "val {} vs first {first}",
        learned.val_loss
    );

    let full = pretrain(&muon("full", 14)).unwrap();
    let mut halted = muon("killed", 14);
    halted.train.halt_after = Some(6);
    pretrain(&halted).unwrap();
    let mut switched = muon("killed", 14);
    switched.train.resume = true;
    switched.train.optimizer = MatrixOptimizer::Adamw;
    let err = pretrain(&switched).unwrap_err().to_string();
    assert!(err.contains("resume it with --optimizer muon"), "{err}");
    let mut again = muon("killed", 14);
    again.train.resume = true;
    let resumed = pretrain(&again).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 7);
    assert_resumed_losses_match(&resumed, &full);
}

/// Each architecture switch trains the tiny corpus as far as the plain model's test asks, is
/// written into config.json so that the saved run scores its validation windows exactly as the
/// report says, and the switches GGUF's llama graph lacks are refused by `export --format gguf`
/// with the way out.
#[test]
fn every_architecture_switch_learns_and_reloads_exactly() {
    use chatforge::model::switches::{ArchSwitches, GateActivation};
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let one = |f: fn(&mut ArchSwitches)| {
        let mut s = ArchSwitches::default();
        f(&mut s);
        s
    };
    let cases = [
        ("relu2", one(|s| s.activation = Some(GateActivation::Relu2))),
        ("qk_norm", one(|s| s.qk_norm = Some(true))),
        ("untied", one(|s| s.untied_head = Some(true))),
        ("softcap", one(|s| s.logit_softcap = Some(5.0))),
        ("zero", one(|s| s.zero_init = Some(true))),
    ];
    let shard_set = chatforge::data::shards::ShardSet::open(&shards).unwrap();
    let token_bytes = shard_set.tokenizer().unwrap().token_bytes().to_vec();
    for (name, switches) in cases {
        let run = dir.path().join(name);
        let mut opts = common::tiny_pretrain(&shards, &cfg, &run, 120);
        opts.switches = switches;
        // f32 throughout, so the reloaded model's score can be compared exactly.
        opts.train.precision = chatforge::train::Precision::F32;
        let report = pretrain(&opts).unwrap();
        let first = report.losses[0].1;
        assert!(
            report.val_loss < first - 1.5,
            "{name}: val {} vs first {first}",
            report.val_loss
        );
        let lm = chatforge::model::load(&run, &candle_core::Device::Cpu).unwrap();
        let (reloaded, _) = chatforge::train::pretrain::evaluate(
            &lm.model,
            &shard_set.val,
            &token_bytes,
            opts.batch_size,
            opts.seq_len,
            opts.eval_tokens,
        )
        .unwrap();
        assert!(
            (reloaded - report.val_loss).abs() < 1e-6,
            "{name}: the saved run scores {reloaded}, the report {}",
            report.val_loss
        );
        let gguf = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
            .args([
                "export",
                "--model",
                run.to_str().unwrap(),
                "--format",
                "gguf",
                "--out",
                dir.path().join(format!("{name}.gguf")).to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let refused = matches!(name, "relu2" | "softcap");
        assert_eq!(!gguf.status.success(), refused, "{name}: export gguf");
        if refused {
            let err = String::from_utf8_lossy(&gguf.stderr);
            assert!(err.contains("--format hf"), "{name}: {err}");
        }
    }
}
