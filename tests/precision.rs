//! Mixed precision (`--precision bf16`, and `auto`, the default): the same pretraining run in f32
//! and on every bf16 kernel this CPU has follows the same loss curve, and auto takes AVX512-BF16
//! exactly where it measured it faster than f32. Its own test binary, because
//! the precision and the `CHATFORGE_MATMUL` cap that selects a lower kernel are process-wide.
//! Beside it, the kernels' AVX2 and baseline builds train to the same bits, each in a process of
//! its own.

mod common;

use chatforge::train::pretrain::{pretrain, PretrainReport};
use chatforge::train::Precision;
use std::path::Path;

fn run(shards: &Path, cfg: &Path, out: &Path, precision: Precision) -> PretrainReport {
    let mut opts = common::tiny_pretrain(shards, cfg, out, 80);
    opts.train.checkpoint_every = 1000;
    opts.train.precision = precision;
    pretrain(&opts).unwrap()
}

fn kernel_recorded(run: &Path) -> (String, String) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("chatforge.json")).unwrap())
            .unwrap();
    (
        manifest["matmul_kernel"].as_str().unwrap().to_string(),
        manifest["hyperparameters"]["loop"]["precision"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[test]
fn every_bf16_kernel_follows_the_f32_loss_curve() {
    use chatforge::model::bf16::{best_available, Kernel, KERNEL_ENV};
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let refused = |what: &str| {
        let mut opts = common::tiny_pretrain(&shards, &cfg, &dir.path().join(what), 2);
        opts.train.precision = Precision::Bf16;
        // Refused with an error that says why, not a panic and not a silent f32 run.
        format!(
            "{:#}",
            pretrain(&opts).expect_err("bf16 without a kernel must be an error")
        )
    };
    // A cap at f32 stands for a CPU without a bf16 kernel: bf16 is refused and names the cap.
    std::env::set_var(KERNEL_ENV, "f32");
    let err = refused("capped");
    assert!(err.contains("bf16") && err.contains(KERNEL_ENV), "{err}");
    std::env::set_var(KERNEL_ENV, "avx2-bf16");
    let err = refused("unknown");
    assert!(
        err.contains("avx512-bf16") && err.contains("amx-bf16"),
        "{err}"
    );
    std::env::remove_var(KERNEL_ENV);
    let kernels: Vec<Kernel> = [Kernel::Avx512Bf16, Kernel::AmxBf16]
        .into_iter()
        .filter(|&k| k <= best_available())
        .collect();
    if kernels.is_empty() {
        let err = refused("none");
        assert!(err.contains("AMX") && err.contains("AVX512-BF16"), "{err}");
        eprintln!("skipped the loss curves: this CPU has neither AMX nor AVX512-BF16");
        return;
    }
    let f32_run = run(&shards, &cfg, &dir.path().join("f32"), Precision::F32);
    assert_eq!(kernel_recorded(&dir.path().join("f32")).1, "f32");
    for kernel in kernels {
        // The cap selects each kernel in turn, as on a CPU whose best it is.
        std::env::set_var(KERNEL_ENV, kernel.name());
        let out = dir.path().join(kernel.name());
        let bf16_run = run(&shards, &cfg, &out, Precision::Bf16);
        std::env::remove_var(KERNEL_ENV);
        assert_eq!(
            kernel_recorded(&out),
            (kernel.name().to_string(), "bf16".to_string())
        );
        assert_eq!(f32_run.losses.len(), bf16_run.losses.len());
        let mut differs = false;
        for ((step, a), (_, b)) in f32_run.losses.iter().zip(&bf16_run.losses) {
            // Same shape: within a few percent at every logged step.
            assert!(
                (a - b).abs() < 0.05 * a + 0.05,
                "{kernel:?} step {step}: f32 loss {a}, bf16 {b}"
            );
            differs |= (a - b).abs() > 1e-6;
        }
        assert!(
            differs,
            "{kernel:?} gave f32's losses exactly: the switch did nothing"
        );
        let first = bf16_run.losses[0].1;
        assert!(
            bf16_run.val_loss < first - 1.5,
            "{kernel:?} did not learn: {first} -> {}",
            bf16_run.val_loss
        );
        assert!(
            (bf16_run.val_loss - f32_run.val_loss).abs() < 0.05 * f32_run.val_loss,
            "{kernel:?}: held-out loss f32 {} vs bf16 {}",
            f32_run.val_loss,
            bf16_run.val_loss
        );
        // The switch is off again once the run ends.
        assert!(!chatforge::model::kernels::matmul_kernel().is_bf16());
    }
    if best_available() >= Kernel::Avx512Bf16 {
        // Auto, capped at AVX512-BF16, takes it only where it beat f32 by the margin (it is
        // slower than f32 on Intel's server cores, faster on AMD Zen 4), and says so.
        std::env::set_var(KERNEL_ENV, Kernel::Avx512Bf16.name());
        let out = dir.path().join("auto");
        let mut opts = common::tiny_pretrain(&shards, &cfg, &out, 2);
        opts.train.precision = Precision::Auto;
        pretrain(&opts).unwrap();
        std::env::remove_var(KERNEL_ENV);
        let speedup = chatforge::model::kernels::measured_speedup(Kernel::Avx512Bf16)
            .expect("auto measured the bf16 kernel");
        let (kernel, precision) = kernel_recorded(&out);
        eprintln!("auto: avx512-bf16 measured {speedup:.2}x f32; ran {kernel}");
        assert_eq!(
            (kernel.starts_with("f32"), precision.as_str()),
            if chatforge::train::avx512_bf16_pays() {
                (false, "bf16")
            } else {
                (true, "f32")
            }
        );
    }
}

/// The kernels' loops compiled for AVX2 (where the CPU has it) and for the SSE2 baseline
/// (`CHATFORGE_SIMD=baseline`) train to the same bits: three f32 steps, forward, backward and
/// update, give identical losses. Each path runs in its own process (the choice is read once).
#[test]
fn both_simd_builds_of_the_kernels_train_to_the_same_bits() {
    let losses = |simd: &str| -> Vec<f64> {
        let args = "bench train --layers 2 --width 128 --heads 4 --kv-heads 2 --ffn 256 \
                    --context 64 --vocab 512 --batch 4 --steps 3 --warmup 0 --precision f32 --json";
        let out = common::run_ok(
            std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
                .args(args.split_whitespace())
                .env("CHATFORGE_SIMD", simd),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["losses"].clone()).unwrap()
    };
    let (baseline, wide) = (losses("baseline"), losses("avx2"));
    assert_eq!(baseline.len(), 3);
    assert_eq!(baseline, wide);
}
