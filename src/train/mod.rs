//! Training: optimizer and schedule, checkpoints, and one file per stage.

pub mod checkpoint;
pub mod optim;
pub mod padding;
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
    F32,
    /// bf16 where the CPU has AMX, or AVX512-BF16 that measures faster than f32; f32 elsewhere.
    #[default]
    Auto,
    /// Projection and output-head matmuls with bf16 operands and f32 sums (mixed precision);
    /// weights, gradients and optimizer state stay f32.
    Bf16,
}

/// The speed-up `auto` asks of AVX512-BF16 over f32 before it takes it: a margin, so that a
/// CPU where the two are even keeps the exact arithmetic.
const AUTO_BF16_MIN_SPEEDUP: f64 = 1.1;

/// Whether AVX512-BF16 multiplies at least [`AUTO_BF16_MIN_SPEEDUP`] times as fast as f32 here.
pub fn avx512_bf16_pays() -> bool {
    crate::model::kernels::speedup_over_f32(crate::model::bf16::Kernel::Avx512Bf16)
        >= AUTO_BF16_MIN_SPEEDUP
}

/// Keeps the chosen matmul kernel on, for this thread, while alive; restores the one before
/// when dropped.
pub struct PrecisionGuard {
    pub kernel: crate::model::bf16::Kernel,
    previous: crate::model::bf16::Kernel,
}

impl PrecisionGuard {
    /// The kernel, and why auto passed over AVX512-BF16 where it measured it slower.
    pub fn describe(&self) -> String {
        use crate::model::bf16::Kernel;
        match crate::model::kernels::measured_speedup(Kernel::Avx512Bf16) {
            Some(r) if self.kernel == Kernel::F32 && r < AUTO_BF16_MIN_SPEEDUP => {
                format!("{}; avx512-bf16 measured {r:.2}x as fast here", self.kernel)
            }
            _ => self.kernel.describe(),
        }
    }
}

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        crate::model::kernels::set_matmul_kernel(self.previous);
    }
}

impl Precision {
    /// Switches this thread's projections to this precision's kernel until the guard drops: the
    /// fastest bf16 kernel the CPU has (under `CHATFORGE_MATMUL`) for bf16, the same for auto
    /// unless it measures slower than f32, f32 for f32. bf16 on a CPU with no bf16 kernel is an
    /// error that says so (auto falls back to f32).
    pub fn apply(self) -> anyhow::Result<PrecisionGuard> {
        use crate::model::bf16::{Kernel, KERNEL_ENV};
        let wanted = match self {
            Precision::F32 => Kernel::F32,
            Precision::Bf16 => Kernel::best()?,
            Precision::Auto => match Kernel::best()? {
                // AMX tiles do 16·16·32 multiply-adds an instruction: they always pay. bf16 dot
                // products pay only on some cores, so auto measures them.
                Kernel::Avx512Bf16 if !avx512_bf16_pays() => Kernel::F32,
                best => best,
            },
        };
        if self == Precision::Bf16 && !wanted.is_bf16() {
            let why = if crate::model::bf16::best_available().is_bf16() {
                format!("{KERNEL_ENV} caps the kernel at f32")
            } else {
                "this CPU has neither AMX nor AVX512-BF16".to_string()
            };
            anyhow::bail!("--precision bf16 needs a bf16 matmul kernel, but {why}: use --precision f32 or auto");
        }
        let (kernel, previous) = crate::model::kernels::set_matmul_kernel(wanted);
        Ok(PrecisionGuard { kernel, previous })
    }
}
