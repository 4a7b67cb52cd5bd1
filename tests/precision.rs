//! Mixed precision (`--precision bf16`): the same pretraining run in f32 and in bf16 follows the
//! same loss curve. Its own test binary, because the precision is process-wide.

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

#[test]
fn bf16_training_follows_the_f32_loss_curve() {
    if !chatforge::model::amx::available() {
        eprintln!("skipped: this CPU has no AMX, so --precision bf16 is refused");
        let dir = tempfile::tempdir().unwrap();
        let (shards, cfg) = common::tiny_shards(dir.path());
        let mut opts = common::tiny_pretrain(&shards, &cfg, &dir.path().join("bf16"), 2);
        opts.train.precision = Precision::Bf16;
        // Refused with an error that says why, not a panic and not a silent f32 run.
        let err = format!(
            "{:#}",
            pretrain(&opts).expect_err("bf16 without AMX must be an error")
        );
        assert!(err.contains("AMX") && err.contains("bf16"), "{err}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let f32_run = run(&shards, &cfg, &dir.path().join("f32"), Precision::F32);
    let bf16_run = run(&shards, &cfg, &dir.path().join("bf16"), Precision::Bf16);
    assert_eq!(f32_run.losses.len(), bf16_run.losses.len());
    let mut differs = false;
    for ((step, a), (_, b)) in f32_run.losses.iter().zip(&bf16_run.losses) {
        // Same shape: within a few percent at every logged step.
        assert!(
            (a - b).abs() < 0.05 * a + 0.05,
            "step {step}: f32 loss {a}, bf16 {b}"
        );
        differs |= (a - b).abs() > 1e-6;
    }
    assert!(
        differs,
        "bf16 gave f32's losses exactly: the switch did nothing"
    );
    let first = bf16_run.losses[0].1;
    assert!(
        bf16_run.val_loss < first - 1.5,
        "bf16 did not learn: {first} -> {}",
        bf16_run.val_loss
    );
    assert!(
        (bf16_run.val_loss - f32_run.val_loss).abs() < 0.05 * f32_run.val_loss,
        "held-out loss f32 {} vs bf16 {}",
        f32_run.val_loss,
        bf16_run.val_loss
    );
    // The switch is off again once the run ends.
    assert!(!chatforge::model::kernels::bf16_matmuls());
}
