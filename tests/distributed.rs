//! Data-parallel training under mpirun (the `mpi` feature): two ranks give a single process's
//! losses for the same global batch (pretraining, SFT full and LoRA, the reward model, DPO), GRPO
//! and PPO learn with each rank sampling its part of a rollout, a killed rank ends the job with
//! mpirun naming it, `--resume` continues the run with one rank or two, and `data prepare` on two
//! ranks writes a single process's output.
//!
//! The binary with MPI is built by this test into `target/mpi` (the test build's own binary has
//! no MPI, as a default build has none); without `mpirun` the tests skip, and fail under CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Mpi {
    chatforge: PathBuf,
    open_mpi: bool,
}

/// The MPI build of chatforge and which mpirun runs it; None (after a SKIP line) without MPI.
fn mpi() -> Option<&'static Mpi> {
    static MPI: OnceLock<Option<Mpi>> = OnceLock::new();
    MPI.get_or_init(|| {
        let version = Command::new("mpirun").arg("--version").output().ok();
        let Some(version) = version.filter(|o| o.status.success()) else {
            common::skip(
                "mpirun is not installed (apt install openmpi-bin libopenmpi-dev libclang-dev)",
            );
            return None;
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/mpi");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--features",
                "mpi",
                "--bin",
                "chatforge",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "building chatforge with --features mpi failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        Some(Mpi {
            chatforge: target.join("release/chatforge"),
            open_mpi: String::from_utf8_lossy(&version.stdout).contains("Open MPI"),
        })
    })
    .as_ref()
}

impl Mpi {
    /// `chatforge ARGS` in one process (the MPI build, started without a launcher).
    fn alone(&self, args: &[String]) -> Command {
        let mut c = Command::new(&self.chatforge);
        c.args(args);
        c
    }

    /// `mpirun -np RANKS chatforge ARGS` on this host.
    fn ranks(&self, ranks: usize, args: &[String]) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["-np", &ranks.to_string()]);
        if self.open_mpi {
            // Tests run as root in CI and beside each other on two cores.
            c.arg("--oversubscribe")
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        c.arg(&self.chatforge).args(args);
        c
    }
}

fn ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// (step, training loss) of every logged step of a run.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// Both runs logged the same steps with losses within 1e-5, and training moved the loss.
fn assert_same_losses(one: &Path, other: &Path, steps: usize) {
    let (a, b) = (losses(one), losses(other));
    assert_eq!(a.len(), steps, "{}", one.display());
    assert_eq!(b.len(), steps, "{}", other.display());
    for ((s, x), (t, y)) in a.iter().zip(&b) {
        assert_eq!(s, t);
        assert!((x - y).abs() < 1e-5, "step {s}: {x} alone, {y} on 2 ranks");
    }
    let (first, last) = (a[0].1, a[steps - 1].1);
    assert!(
        first - last > 0.05,
        "the loss did not fall: {first} → {last}"
    );
}

/// The job ran on two ranks and only rank 0 printed the report.
fn assert_two_ranks(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data parallel over MPI"), "{err}");
    assert!(err.contains("2 ranks"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("\"steps\"").count(), 1, "{stdout}");
}

/// Pretraining flags for the tiny shards: exact f32 matmuls, every step's loss logged.
fn pretrain_args(shards: &Path, cfg: &Path, out: &Path, steps: usize) -> Vec<String> {
    let mut a = strings(&["pretrain", "--data"]);
    a.push(shards.display().to_string());
    a.extend(strings(&["--config"]));
    a.push(cfg.display().to_string());
    a.extend(strings(&["--out"]));
    a.push(out.display().to_string());
    a.extend(strings(&[
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "5",
        "--eval-every",
        "1000",
        "--log-every",
        "1",
        "--precision",
        "f32",
        "--steps",
    ]));
    a.push(steps.to_string());
    a
}

#[test]
fn pretraining_on_two_ranks_gives_the_single_process_losses() {
    let Some(mpi) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    ok(mpi.alone(&pretrain_args(&shards, &cfg, &one, 20)));
    let out = ok(mpi.ranks(2, &pretrain_args(&shards, &cfg, &two, 20)));
    assert_two_ranks(&out);
    assert_same_losses(&one, &two, 20);
    assert!(two.join("model.safetensors").exists());

    // A global batch the ranks cannot split evenly is refused by its flag.
    let out = mpi
        .ranks(
            3,
            &pretrain_args(&shards, &cfg, &dir.path().join("three"), 20),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--batch-size 8 is the global batch") && err.contains("multiple of 3"),
        "{err}"
    );
    // A command that does not train says so instead of running twice.
    let mut generate = strings(&["generate", "--prompt", "hi", "--model"]);
    generate.push(two.display().to_string());
    let out = mpi.ranks(2, &generate).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`chatforge generate` runs in one process"),
        "{err}"
    );
}

/// Rankings of three answers per prompt, the best first.
fn write_rankings(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for round in 0..6 {
        for (animal, sound) in [("cat", "meow"), ("dog", "woof"), ("cow", "moo")] {
            lines.push_str(
                &serde_json::json!({"prompt": format!("What does the {animal} say? ({round})"),
                    "responses": [format!("The {animal} says {sound}."), sound, "Go away."]})
                .to_string(),
            );
            lines.push('\n');
        }
    }
    let path = dir.join("rankings.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// Flags that take a path, in order.
type Files<'a> = Vec<(&'a str, &'a Path)>;

fn stage_args(head: &[&str], files: &[(&str, &Path)], tail: &[&str]) -> Vec<String> {
    let mut a = strings(head);
    for (flag, path) in files {
        a.push(flag.to_string());
        a.push(path.display().to_string());
    }
    a.extend(strings(tail));
    a
}

#[test]
fn sft_lora_reward_and_dpo_on_two_ranks_give_the_single_process_losses() {
    let Some(mpi) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let chats = common::animal_conversations(
        dir.path(),
        "chats.jsonl",
        &[("cat", "meow"), ("dog", "woof"), ("cow", "moo")],
        10,
    );
    let rankings = write_rankings(dir.path());
    let shared = [
        "--steps",
        "20",
        "--log-every",
        "1",
        "--eval-every",
        "1000",
        "--precision",
        "f32",
    ];
    let stages: [(&str, Vec<&str>, Files); 4] = [
        (
            "sft",
            vec!["sft", "--batch-size", "6"],
            vec![("--base", &base), ("--data", &chats)],
        ),
        (
            "lora",
            vec![
                "sft",
                "--batch-size",
                "6",
                "--lora-rank",
                "4",
                "--lr",
                "1e-2",
            ],
            vec![("--base", &base), ("--data", &chats)],
        ),
        (
            "reward",
            vec!["reward", "--batch-size", "6"],
            vec![("--base", &base), ("--data", &rankings)],
        ),
        (
            "dpo",
            vec!["rlhf", "--algo", "dpo", "--minibatch", "6"],
            vec![("--policy", &base), ("--prefs", &rankings)],
        ),
    ];
    for (name, head, files) in stages {
        let (one, two) = (
            dir.path().join(format!("{name}_one")),
            dir.path().join(format!("{name}_two")),
        );
        let run = |out: &Path| {
            let mut files = files.clone();
            files.push(("--out", out));
            stage_args(&head, &files, &shared)
        };
        ok(mpi.alone(&run(&one)));
        let out = ok(mpi.ranks(2, &run(&two)));
        assert_two_ranks(&out);
        let steps = losses(&one).len();
        assert_eq!(steps, 20, "{name}");
        let (a, b) = (losses(&one), losses(&two));
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-5,
                "{name} step {s}: {x} alone, {y} on 2 ranks"
            );
        }
        assert!(
            a.iter().any(|(_, x)| (x - a[0].1).abs() > 1e-3),
            "{name}: the loss never moved"
        );
        assert!(two.join("model.safetensors").exists(), "{name}");
    }
}

/// One metric of every logged step.
fn metric(run: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[name].as_f64())
        .collect()
}

#[test]
fn grpo_and_ppo_learn_with_rollouts_split_across_two_ranks() {
    let Some(mpi) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let prompts = common::write_cat_prompts(dir.path());
    let rl = |algo: &str, out: &Path, steps: &str| {
        stage_args(
            &["rlhf", "--algo", algo],
            &[("--policy", &base), ("--prompts", &prompts), ("--out", out)],
            &[
                "--reward-source",
                "checker",
                "--rollout-prompts",
                "4",
                "--group-size",
                "4",
                "--max-new-tokens",
                "10",
                "--minibatch",
                "16",
                "--epochs",
                "2",
                "--kl-coef",
                "0.02",
                "--eval-samples",
                "32",
                "--lr",
                "3e-3",
                "--weight-decay",
                "0",
                "--log-every",
                "1",
                "--steps",
                steps,
            ],
        )
    };
    // GRPO raises the held-out checker accuracy as it does in one process (tests/rlhf.rs).
    let grpo = dir.path().join("grpo");
    let out = ok(mpi.ranks(2, &rl("grpo", &grpo, "60")));
    assert_two_ranks(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (before, after) = (
        report["eval_before"]["accuracy"].as_f64().unwrap(),
        report["eval_after"]["accuracy"].as_f64().unwrap(),
    );
    eprintln!("GRPO on 2 ranks: held-out accuracy {before} → {after}");
    assert!(after > before + 0.1, "held-out accuracy {before} → {after}");
    // Each rank sampled 2 of the 4 prompts; the statistics cover all 16 responses.
    let responses = metric(&grpo, "rollout_responses");
    assert!(
        !responses.is_empty() && responses.iter().all(|&n| n == 16.0),
        "{responses:?}"
    );

    // PPO halted on two ranks resumes on one: the checkpoint holds the whole rollout.
    let ppo = dir.path().join("ppo");
    let mut halted = rl("ppo", &ppo, "12");
    halted.extend(strings(&["--checkpoint-every", "3", "--halt-after", "6"]));
    ok(mpi.ranks(2, &halted));
    assert!(!ppo.join("model.safetensors").exists());
    let mut resumed = rl("ppo", &ppo, "12");
    resumed.push("--resume".into());
    ok(mpi.alone(&resumed));
    assert!(ppo.join("model.safetensors").exists());
    assert_eq!(losses(&ppo).len(), 12);
    assert!(metric(&ppo, "value_loss").iter().all(|v| v.is_finite()));
}

/// The files `data prepare` wrote that hold data (reports carry timings), by path under `dir`.
fn prepared_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for sub in ["kept", "shards"] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.ends_with(".jsonl") || name.ends_with(".bin")
            })
            .collect();
        names.sort();
        for p in names {
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            files.push((name, std::fs::read(&p).unwrap()));
        }
    }
    files
}

#[test]
fn data_prepare_on_two_ranks_writes_the_single_process_output() {
    let Some(mpi) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Small blocks, so each source spans several and both ranks get some.
    let block = 4096;
    let mut outputs = Vec::new();
    for (name, ranks) in [("one", 1), ("two", 2)] {
        let at = dir.path().join(name);
        std::fs::create_dir_all(&at).unwrap();
        common::prepare_fixture::write_fixture(&at);
        let config = at.join("data.toml");
        std::fs::write(&config, common::prepare_fixture::CONFIG).unwrap();
        assert!(std::fs::metadata(at.join("web.jsonl")).unwrap().len() > 4 * block);
        let args = strings(&["data", "prepare", "--config", config.to_str().unwrap()]);
        let mut run = if ranks == 1 {
            mpi.alone(&args)
        } else {
            mpi.ranks(2, &args)
        };
        run.env("CHATFORGE_BLOCK_BYTES", block.to_string());
        let out = ok(run);
        // One table, from rank 0.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.matches("share written").count(), 1, "{stdout}");
        outputs.push(at.join("prepared"));
    }
    let (one, two) = (prepared_files(&outputs[0]), prepared_files(&outputs[1]));
    assert!(
        one.iter().any(|(n, _)| n.ends_with(".bin")),
        "{:?}",
        one.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert_eq!(
        one.iter().map(|f| &f.0).collect::<Vec<_>>(),
        two.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in one.iter().zip(&two) {
        assert!(a == b, "{name} differs between 1 and 2 ranks");
    }
    // The pipeline did drop duplicates and low-quality pages (across block edges too).
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(outputs[1].join("prepare_report.json")).unwrap(),
    )
    .unwrap();
    let web = &report["sources"][0];
    assert!(web["exact_duplicates"].as_u64().unwrap() >= 10, "{web}");
    assert!(web["quality_dropped"].as_u64().unwrap() >= 35, "{web}");
}

/// The process ids of `chatforge` ranks whose command line names `out`, with their rank.
fn ranks_writing(out: &Path) -> Vec<(u32, String)> {
    let needle = out.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&needle) || cmdline.starts_with("mpirun") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        if let Some(rank) = environ
            .split('\0')
            .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK="))
        {
            found.push((pid, rank.to_string()));
        }
    }
    found
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_on_one_or_two_ranks() {
    let Some(mpi) = mpi() else { return };
    if !mpi.open_mpi {
        common::skip("finding a rank's process uses Open MPI's environment variables");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let steps = 60;
    let with_checkpoints = |out: &Path| {
        let mut a = pretrain_args(&shards, &cfg, out, steps);
        a.extend(strings(&[
            "--checkpoint-every",
            "5",
            "--keep-checkpoints",
            "2",
        ]));
        a
    };
    let whole = dir.path().join("whole");
    ok(mpi.alone(&with_checkpoints(&whole)));

    let killed = dir.path().join("killed");
    let job = mpi
        .ranks(2, &with_checkpoints(&killed))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let victim = loop {
        let has_checkpoint = std::fs::read_dir(killed.join("checkpoints"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("step_"))
            })
            .unwrap_or(false);
        let rank1 = ranks_writing(&killed).into_iter().find(|(_, r)| r == "1");
        if let (true, Some((pid, _))) = (has_checkpoint, rank1) {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    kill_hard(victim);
    let kept: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("killed rank 1 (pid {victim}) with checkpoints {kept:?} written");
    let out = job.wait_with_output().unwrap();
    assert!(!out.status.success(), "the job went on without rank 1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("process rank 1") && err.contains("signal 9"),
        "mpirun did not name the killed rank:\n{err}"
    );
    assert!(
        !killed.join("model.safetensors").exists(),
        "the run finished before the kill"
    );

    // The same checkpoint resumed on one rank and on two: both finish the whole run's curve.
    let copy = dir.path().join("killed_copy");
    copy_dir(&killed, &copy);
    let resumed_alone = {
        let mut a = with_checkpoints(&killed);
        a.push("--resume".into());
        ok(mpi.alone(&a))
    };
    assert!(String::from_utf8_lossy(&resumed_alone.stderr).contains("resuming"));
    let mut a = with_checkpoints(&copy);
    a.push("--resume".into());
    assert_two_ranks(&ok(mpi.ranks(2, &a)));
    assert_same_losses(&whole, &killed, steps);
    assert_same_losses(&whole, &copy, steps);
}

/// SIGKILL, as the OOM killer or a lost host would end a rank.
fn kill_hard(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
