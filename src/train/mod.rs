//! Training: optimizer and schedule, checkpoints, and one file per stage.

pub mod checkpoint;
pub mod optim;
pub mod pretrain;
pub mod reward;
pub mod sft;
pub mod trainer;

/// The precision of the training step's matrix products.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 where the CPU has AMX, f32 elsewhere.
    Auto,
    /// Projection and output-head matmuls with bf16 operands and f32 sums on AMX tiles (mixed
    /// precision); weights, gradients and optimizer state stay f32.
    Bf16,
}

/// Keeps bf16 matmuls on while alive and turns them off when dropped.
pub struct PrecisionGuard;

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        crate::model::kernels::set_bf16_matmuls(false);
    }
}

impl Precision {
    /// Switches the kernels to this precision until the guard drops; bf16 on a CPU without AMX
    /// is an error that says so (auto falls back to f32).
    pub fn apply(self) -> anyhow::Result<PrecisionGuard> {
        let on = crate::model::kernels::set_bf16_matmuls(self != Precision::F32);
        if self == Precision::Bf16 && !on {
            anyhow::bail!(
                "--precision bf16 needs a CPU with AMX (Intel Sapphire Rapids or later); this one has none: use --precision f32"
            );
        }
        Ok(PrecisionGuard)
    }
}
