//! Reward model and RLHF on a tiny model: the reward model learns a ranking, PPO raises a
//! programmatic reward in a toy environment with bounded KL, DPO separates chosen from rejected,
//! and GRPO raises the checker's reward.

mod common;

use chatforge::rlhf::{rlhf, Algo, RewardSource, RlhfOptions};
use chatforge::tokenizer::chat::{Message, Role};
use chatforge::train::reward::{train_reward, RewardModel, RewardOptions};
use chatforge::train::trainer::LoopOptions;
use std::path::{Path, PathBuf};

const ANIMALS: [(&str, &str); 6] = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
];

/// Rankings: a full sentence > a curt answer > a rude reply; train and held-out phrasings differ.
fn write_prefs(dir: &Path) -> (PathBuf, PathBuf) {
    let (mut train, mut held) = (String::new(), String::new());
    for round in 0..8 {
        for (animal, sound) in ANIMALS {
            let (q, target) = if round < 6 {
                (format!("What does the {animal} say?"), &mut train)
            } else {
                (format!("Which sound does a {animal} make?"), &mut held)
            };
            target.push_str(
                &serde_json::json!({"prompt": q, "responses": [
                    format!("The {animal} says {sound}."),
                    format!("{sound}"),
                    "Go away.",
                ]})
                .to_string(),
            );
            target.push('\n');
        }
    }
    let (t, h) = (dir.join("prefs_train.jsonl"), dir.join("prefs_held.jsonl"));
    std::fs::write(&t, train).unwrap();
    std::fs::write(&h, held).unwrap();
    (t, h)
}

#[test]
fn reward_model_learns_rankings_and_is_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let (train, held) = write_prefs(dir.path());
    let out = dir.path().join("rm");
    let r = train_reward(&RewardOptions {
        base: base.clone(),
        data: vec![train],
        val_data: vec![held.clone()],
        out: out.clone(),
        batch_size: 6,
        train: LoopOptions {
            weight_decay: 0.0,
            ..common::quiet_loop(120, 3e-3)
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(r.info.heldout_pairs, 12 * 3);
    assert!(
        r.info.heldout_accuracy >= 0.85 && r.info.heldout_accuracy > r.val_accuracy_before + 0.15,
        "held-out pairwise accuracy {} (before {})",
        r.info.heldout_accuracy,
        r.val_accuracy_before
    );
    assert!(r.info.heldout_margin > 0.5, "{}", r.info.heldout_margin);
    // Three ranked responses make three rank pairs, whose accuracies average to the overall one
    // (each pair kind is a third of the pairs).
    let by_ranks = &r.info.accuracy_by_ranks;
    assert_eq!(by_ranks.keys().collect::<Vec<_>>(), ["1>2", "1>3", "2>3"]);
    let mean = by_ranks.values().sum::<f64>() / 3.0;
    assert!(
        (mean - r.info.heldout_accuracy).abs() < 1e-9,
        "{by_ranks:?}"
    );
    let rm = RewardModel::load(&out).unwrap();
    let q = [Message::new(Role::User, "Which sound does a dog make?")];
    let s = rm
        .score(&[(&q, "The dog says woof."), (&q, "Go away.")])
        .unwrap();
    assert!(s[0] > s[1], "{s:?}");
    // Normalised on the policy's own answers (--norm-prompts), fresh answers of the policy to
    // those prompts (another seed) score about 0, as PPO's reward assumes; the held-out
    // rankings, which the bias once came from, do not.
    let prompts = dir.path().join("norm_prompts.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| serde_json::json!({"prompt": format!("Tell me about animal {i}.")}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let normed = dir.path().join("rm_normed");
    train_reward(&RewardOptions {
        base: base.clone(),
        data: vec![write_prefs(dir.path()).0],
        val_data: vec![held.clone()],
        out: normed.clone(),
        batch_size: 6,
        norm_prompts: Some(prompts.clone()),
        norm_samples: 200,
        train: LoopOptions {
            weight_decay: 0.0,
            ..common::quiet_loop(120, 3e-3)
        },
        ..Default::default()
    })
    .unwrap();
    let rm_normed = RewardModel::load(&normed).unwrap();
    let policy = chatforge::model::load(&base, &candle_core::Device::Cpu).unwrap();
    let template = policy.template().unwrap();
    let asked = chatforge::data::prefs::read_prompt_file(&prompts).unwrap();
    let ids: Vec<Vec<u32>> = asked
        .iter()
        .map(|p| {
            chatforge::tokenizer::chat::render(&policy.tokenizer, &template, &p.messages, true)
                .unwrap()
                .ids
        })
        .collect();
    let params = chatforge::infer::sampler::SamplingParams {
        max_tokens: policy.model.config.max_position_embeddings / 2,
        temperature: 1.0,
        seed: 4242,
        ..Default::default()
    };
    let stops = chatforge::infer::generate::stop_ids(&policy);
    let answers = chatforge::infer::generate::generate_batch(
        &policy.model,
        &policy.tokenizer,
        &ids,
        &params,
        &stops,
    )
    .unwrap();
    let items: Vec<(&[Message], &str)> = asked
        .iter()
        .zip(&answers)
        .map(|(p, a)| (p.messages.as_slice(), a.text.as_str()))
        .collect();
    let scores = rm_normed.score(&items).unwrap();
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let sd = (scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 3.0 * sd / n.sqrt() + 0.05,
        "the policy's fresh answers score {mean} (sd {sd}) after normalisation"
    );
    let held_prefs = chatforge::data::prefs::read_pref_file(&held).unwrap();
    let held_items: Vec<(&[Message], &str)> = held_prefs
        .comparisons
        .iter()
        .flat_map(|c| {
            c.responses
                .iter()
                .map(|x| (c.prompt.as_slice(), x.as_str()))
        })
        .collect();
    let held_scores = rm_normed.score(&held_items).unwrap();
    let held_mean = held_scores.iter().sum::<f64>() / held_scores.len() as f64;
    // Two standard errors (a 95% test): the answers are sampled at temperature 1, and their
    // scores' spread (sd about 4) moves with the precision the reward model trained in.
    assert!(
        (held_mean - mean).abs() > 2.0 * sd / n.sqrt(),
        "held-out rankings ({held_mean}) and the policy's answers ({mean}) score alike: the test cannot tell the normalisations apart"
    );
    // A model without a score head is refused by name.
    let e = RewardModel::load(&base).err().unwrap().to_string();
    assert!(e.contains("not a reward model"), "{e}");
    // A reward model whose tokenizer differs from the policy's is refused, even at the same size.
    let other = dir.path().join("rm_other_tokenizer");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&out).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
        }
    }
    let policy_tok = chatforge::tokenizer::Tokenizer::load(&base).unwrap();
    let text = common::mixed_corpus().to_uppercase();
    let (tok, _) = chatforge::tokenizer::Tokenizer::train(
        &[text.as_str()],
        &chatforge::tokenizer::TrainOptions {
            vocab_size: policy_tok.vocab_size(),
            ..Default::default()
        },
    )
    .unwrap();
    tok.save(&other).unwrap();
    let prompts = common::write_cat_prompts(dir.path());
    let mut o = toy_options(&base, prompts, dir.path().join("x"), Algo::Ppo);
    o.reward_source = RewardSource::Model;
    o.reward = Some(other);
    let e = rlhf(&o).err().unwrap().to_string();
    assert!(e.contains("different tokenizer"), "{e}");
}

/// Prompts whose "answer" (the checker) wants the reply to mention 猫 (cat), which the tiny base
/// says in about a third of its samples.
/// `train_layers` trains the top blocks and the score head only: the lower block and the
/// embeddings keep the base model's weights exactly, the top block moves, and it still learns.
#[test]
fn reward_model_can_train_only_its_top_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let (train, held) = write_prefs(dir.path());
    let out = dir.path().join("rm_top");
    let r = train_reward(&RewardOptions {
        base: base.clone(),
        data: vec![train],
        val_data: vec![held],
        out: out.clone(),
        batch_size: 6,
        train_layers: Some(1),
        train: LoopOptions {
            weight_decay: 0.1,
            ..common::quiet_loop(60, 3e-3)
        },
        ..Default::default()
    })
    .unwrap();
    // It learns the training rankings (the toy base model's lower block is too weak for the
    // held-out phrasings, so held-out accuracy is the full model's test above).
    let (first, last) = (r.losses[0].1, r.losses[r.losses.len() - 1].1);
    assert!(last < first / 5.0, "training loss {first} -> {last}");
    let load = |run: &Path| {
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (before, after) = (load(&base), load(&out));
    let moved = |name: &str| {
        let diff = (&before[name] - &after[name]).unwrap().abs().unwrap();
        diff.max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(moved("model.embed_tokens.weight"), 0.0);
    assert_eq!(moved("model.layers.0.mlp.up_proj.weight"), 0.0);
    assert!(moved("model.layers.1.mlp.up_proj.weight") > 0.0);
}

fn toy_options(base: &Path, prompts: PathBuf, out: PathBuf, algo: Algo) -> RlhfOptions {
    RlhfOptions {
        algo,
        policy: base.to_path_buf(),
        prompts: Some(prompts),
        out,
        reward_source: RewardSource::Checker,
        rollout_prompts: 16,
        group_size: 4,
        max_new_tokens: 10,
        minibatch: 16,
        epochs: 2,
        kl_coef: 0.02,
        eval_samples: 32,
        train: LoopOptions {
            weight_decay: 0.0,
            ..common::quiet_loop(60, 3e-3)
        },
        ..Default::default()
    }
}

#[test]
fn prompts_longer_than_the_context_are_cut_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let prompts = common::write_cat_prompts(dir.path());
    let mut text = std::fs::read_to_string(&prompts).unwrap();
    let long = "Tell me a very long story about the cat and the mat. ".repeat(20);
    text.push_str(&serde_json::json!({"prompt": long, "answer": {"contains": ["猫"]}}).to_string());
    text.push('\n');
    std::fs::write(&prompts, text).unwrap();
    let mut o = toy_options(&base, prompts.clone(), dir.path().join("long"), Algo::Grpo);
    o.train.steps = 2;
    let r = rlhf(&o).unwrap();
    assert_eq!(r.truncated_prompts, 1);
    assert_eq!(r.skipped_steps, 0);
    // No room for any prompt at all is refused up front.
    o.max_new_tokens = 64;
    o.out = dir.path().join("none");
    let e = rlhf(&o).err().unwrap().to_string();
    assert!(
        e.contains("--max-new-tokens 64") && e.contains("context of 64"),
        "{e}"
    );
}

/// Trains PPO on the cat prompts; returns the run's report and its rollout metrics lines.
fn toy_ppo(
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut RlhfOptions),
) -> (chatforge::rlhf::RlhfReport, Vec<serde_json::Value>) {
    let base = common::base_run(dir);
    let prompts = common::write_cat_prompts(dir);
    let out = dir.join(name);
    let mut o = toy_options(&base, prompts, out.clone(), Algo::Ppo);
    edit(&mut o);
    let r = rlhf(&o).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("rollout_reward").is_some())
        .collect();
    // Rollout reward (the fraction of replies mentioning "cat") over the first and last rollouts.
    let reward = |v: &[serde_json::Value]| {
        v.iter()
            .map(|x| x["rollout_reward"].as_f64().unwrap())
            .sum::<f64>()
            / v.len() as f64
    };
    let (first, last) = (reward(&lines[..2]), reward(&lines[lines.len() - 2..]));
    assert!(
        last > first + 0.2,
        "{name}: rollout reward {first} -> {last}"
    );
    let acc = (r.eval_before["accuracy"], r.eval_after["accuracy"]);
    assert!(acc.1 > acc.0, "{name}: held-out greedy accuracy {acc:?}");
    assert!(
        r.eval_after["kl"] < 25.0,
        "{name}: KL {}",
        r.eval_after["kl"]
    );
    // The tuned policy still loads as a plain language model.
    chatforge::model::load(&out, &candle_core::Device::Cpu).unwrap();
    (r, lines)
}

#[test]
fn ppo_raises_a_programmatic_reward_with_bounded_kl() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lines) = toy_ppo(dir.path(), "ppo", |_| {});
    for key in [
        "rollout_kl",
        "rollout_entropy",
        "clip_fraction",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "explained_variance",
        "rollout_length",
    ] {
        assert!(lines[0].get(key).is_some(), "metrics lack {key}");
    }
    assert!(saves_a_value_head(&dir.path().join("ppo")));
}

fn saves_a_value_head(run: &Path) -> bool {
    candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .contains_key("v_head.weight")
}

/// Without a critic the group's other answers are the only baseline: the reward still rises,
/// and no value head is trained or saved.
#[test]
fn ppo_without_a_critic_raises_the_reward_on_its_group_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lines) = toy_ppo(dir.path(), "rloo", |o| {
        o.prompt_baseline = true;
        o.critic = false;
    });
    for key in ["value_loss", "explained_variance"] {
        assert!(lines[0].get(key).is_none(), "metrics have {key}");
    }
    assert!(!saves_a_value_head(&dir.path().join("rloo")));
    assert!(lines[0].get("policy_loss").is_some());
    // Without the group there is no baseline at all: refused with the fix.
    let mut o = toy_options(
        &dir.path().join("base"),
        common::write_cat_prompts(dir.path()),
        dir.path().join("none"),
        Algo::Ppo,
    );
    o.critic = false;
    let e = rlhf(&o).err().unwrap().to_string();
    assert!(e.contains("--prompt-baseline"), "{e}");
}

#[test]
fn grpo_raises_the_checker_reward() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let prompts = common::write_cat_prompts(dir.path());
    let out = dir.path().join("grpo");
    let mut o = toy_options(&base, prompts, out, Algo::Grpo);
    o.rollout_prompts = 4;
    let r = rlhf(&o).unwrap();
    let acc = (r.eval_before["accuracy"], r.eval_after["accuracy"]);
    assert!(acc.1 > acc.0 + 0.1, "held-out greedy accuracy {acc:?}");
}

#[test]
fn dpo_prefers_chosen_over_rejected_on_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let (train, held) = write_prefs(dir.path());
    let r = rlhf(&RlhfOptions {
        algo: Algo::Dpo,
        policy: base,
        prefs: vec![train],
        val_prefs: vec![held],
        out: dir.path().join("dpo"),
        minibatch: 8,
        train: LoopOptions {
            weight_decay: 0.0,
            ..common::quiet_loop(60, 3e-3)
        },
        ..Default::default()
    })
    .unwrap();
    let (b, a) = (
        r.eval_before["dpo_val_accuracy"],
        r.eval_after["dpo_val_accuracy"],
    );
    assert!(a >= 0.8 && a > b, "held-out DPO accuracy {b} -> {a}");
    assert!(r.eval_after["dpo_val_margin"] > 0.0);
}

/// Real preference pairs whose answers are longer than a 64-token context are cut to fit, as
/// the reward stage and TRL cut them, instead of all being dropped; when nothing is usable the
/// error says why each record was left out.
#[test]
fn dpo_cuts_long_pairs_to_the_context_and_names_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let options = |prefs: PathBuf, out: &str| RlhfOptions {
        algo: Algo::Dpo,
        policy: base.clone(),
        prefs: vec![prefs],
        out: dir.path().join(out),
        minibatch: 4,
        eval_samples: 4,
        train: common::quiet_loop(2, 1e-4),
        ..Default::default()
    };
    if let Some(demo) = common::shared_data("prefs/dpo_en_demo.json") {
        let r = rlhf(&options(demo, "demo")).unwrap();
        assert_eq!(r.steps, 2);
        assert!(
            r.eval_after.contains_key("dpo_val_accuracy"),
            "{:?}",
            r.eval_after
        );
    }
    let unusable = dir.path().join("no_answers.jsonl");
    let good = serde_json::json!({"prompt": "hi", "chosen": "yes", "rejected": "no"});
    let bad = serde_json::json!({"prompt": "hi", "chosen": "yes"});
    std::fs::write(&unusable, format!("{good}\n{bad}\n{bad}\n")).unwrap();
    let e = format!("{:#}", rlhf(&options(unusable, "none")).unwrap_err());
    assert!(
        e.contains("DPO needs training and held-out pairs") && e.contains("2 unreadable"),
        "{e}"
    );
}

#[test]
fn rlhf_refuses_missing_pieces_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let prompts = common::write_cat_prompts(dir.path());
    let mut o = toy_options(&base, prompts, dir.path().join("x"), Algo::Ppo);
    o.reward_source = RewardSource::Model;
    let e = rlhf(&o).err().unwrap().to_string();
    assert!(e.contains("needs --reward"), "{e}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"hi\"}\n{\"text\": \"no prompt\"}\n").unwrap();
    o.reward_source = RewardSource::Checker;
    o.prompts = Some(bad);
    let e = rlhf(&o).err().unwrap().to_string();
    assert!(
        e.contains("bad.jsonl:2") && e.contains("\"messages\""),
        "{e}"
    );
}

/// PPO (with the adaptive KL controller), GRPO and DPO killed in the middle of a rollout (or
/// an epoch) resume exactly: the checkpoint carries β and the rest of the rollout, so the
/// resumed losses are the uninterrupted run's.
#[test]
fn ppo_grpo_and_dpo_resume_exactly_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let prompts = common::write_cat_prompts(dir.path());
    let (prefs, held) = write_prefs(dir.path());
    // PPO with its critic, and PPO on its group baseline alone (the speedrun's).
    for (algo, critic) in [
        (Algo::Ppo, true),
        (Algo::Ppo, false),
        (Algo::Grpo, true),
        (Algo::Dpo, true),
    ] {
        let options = |out: &str| {
            let mut o = toy_options(&base, prompts.clone(), dir.path().join(out), algo);
            o.critic = critic;
            o.prompt_baseline = !critic;
            if algo == Algo::Dpo {
                o.prompts = None;
                o.prefs = vec![prefs.clone()];
                o.val_prefs = vec![held.clone()];
            }
            // Four minibatches per rollout, so step 3 is in the middle of one.
            o.rollout_prompts = if algo == Algo::Grpo { 4 } else { 16 };
            o.minibatch = 8;
            o.target_kl = Some(0.01);
            o.kl_horizon = 50.0;
            o.eval_samples = 4;
            o.train.steps = 8;
            o.train.checkpoint_every = 2;
            o.train.eval_every = 1000;
            o
        };
        let name = format!("{algo:?}-{critic}");
        let full = rlhf(&options(&format!("{name}-full"))).unwrap();
        let mut first = options(&format!("{name}-killed"));
        first.train.halt_after = Some(3);
        assert_eq!(rlhf(&first).unwrap().steps, 3);
        let mut again = options(&format!("{name}-killed"));
        again.train.resume = true;
        let resumed = rlhf(&again).unwrap();
        assert_eq!(resumed.losses.first().map(|l| l.0), Some(4), "{name}");
        for (step, loss) in &resumed.losses {
            let expected = full.losses[step - 1].1;
            assert!(
                (loss - expected).abs() < 1e-5,
                "{name} step {step}: resumed {loss} vs uninterrupted {expected}"
            );
        }
    }
}
