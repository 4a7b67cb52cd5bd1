//! Fused CPU kernels with their backward passes, for the operations that dominate a training step
//! when composed from candle primitives (each primitive is a separate, often single-threaded,
//! broadcasting pass over memory): causal softmax, RMSNorm, rotary embedding, cross-entropy,
//! SwiGLU, causal attention and the projections themselves.
//!
//! Each kernel has a composed twin built from differentiable candle ops; the model uses the twin on
//! devices other than the CPU, and the tests check that both agree in value and gradient.
//!
//! One file per operation: `softmax`, `norm` (RMSNorm), `rope`, `gated` (SwiGLU, ReLU²), `linear` (the
//! projections), `loss` (cross-entropy and the output head fused with it) and `attention`
//! (rotary embedding, scaling and causal attention as one node), and `cached_attention`
//! (inference over a KV cache, no backward). This file holds what they share:
//! the element trait, the vectorisable exponential and row helpers, the matmul kernel switch,
//! and [`SharedOut`], the pointer parallel tasks write disjoint parts of one buffer through (the
//! bf16 GEMMs use it too).

use crate::model::bf16::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor,
    WithDType, D,
};
use num_traits::Float;
use rayon::prelude::*;

trait Real:
    WithDType + Float + std::ops::AddAssign + std::ops::SubAssign + std::ops::MulAssign + Send + Sync
{
    /// e^self, inlined and branch-free for f32 so that loops over it vectorise.
    fn fast_exp(self) -> Self;
    /// `a · b` with bf16 operands when the projections run in bf16 ([`set_matmul_kernel`]);
    /// `None` otherwise.
    fn bf16_matmul(
        _a: crate::model::bf16::Strided<Self>,
        _b: crate::model::bf16::Strided<Self>,
    ) -> Option<Vec<Self>> {
        None
    }
}
impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
    fn bf16_matmul(
        a: crate::model::bf16::Strided<f32>,
        b: crate::model::bf16::Strided<f32>,
    ) -> Option<Vec<f32>> {
        let kernel = matmul_kernel();
        kernel
            .is_bf16()
            .then(|| crate::model::bf16::matmul(kernel, a, b))
    }
}
impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

thread_local! {
    /// The kernel the projections of ops run from this thread use (a training loop builds and
    /// runs its forward and backward passes on one thread). Per thread, not per process, so that
    /// two trainings in one process (tests, a server beside a training) keep their own precision.
    static MATMUL_KERNEL: std::cell::Cell<Kernel> = const { std::cell::Cell::new(Kernel::F32) };
}

/// Runs the projections' and output head's f32 matmuls (forward and backward) of ops run from
/// this thread on `kernel`: a bf16 one rounds their operands to bf16 and sums in f32, as
/// mixed-precision training does; weights, gradients, optimizer state and every other operation
/// stay f32. A kernel this CPU lacks falls back to the best it has. Returns the kernel now in use
/// and the one before (to restore).
pub fn set_matmul_kernel(kernel: Kernel) -> (Kernel, Kernel) {
    let kernel = kernel.min(crate::model::bf16::best_available());
    (kernel, MATMUL_KERNEL.with(|k| k.replace(kernel)))
}

/// The kernel the projections of ops run from this thread use now.
pub fn matmul_kernel() -> Kernel {
    MATMUL_KERNEL.with(|k| k.get())
}

/// How many times faster `kernel` multiplies a projection-sized product (512 × 256 by 256 × 704,
/// as the small preset's MLP) than f32 gemm on this CPU, measured once per kernel and process.
/// The two are timed in turn, five rounds, best of each, so that other load slows both alike.
/// Whether bf16 dot products pay depends on the core, not the instruction set: `vdpbf16ps`
/// does twice the multiply-adds of an FMA, which doubles the rate of a core with one 512-bit
/// FMA pipe (AMD Zen 4) but not of one with two (Intel's server cores issue it on one port).
pub fn speedup_over_f32(kernel: Kernel) -> f64 {
    if let Some(r) = measured_speedup(kernel) {
        return r;
    }
    let (m, k, n) = (512, 256, 704);
    let fill = |len: usize, salt: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + salt) % 1000) as f32 * 1e-3 - 0.5)
            .collect()
    };
    let (a, b) = (fill(m * k, 1), fill(k * n, 2));
    let time_on = |on: Kernel| {
        let (_, before) = set_matmul_kernel(on);
        let t = std::time::Instant::now();
        std::hint::black_box(matmul_f32((m, n, k), &a, (k, 1), &b, (n, 1)));
        set_matmul_kernel(before);
        t.elapsed().as_secs_f64()
    };
    let (mut f32_best, mut kernel_best) = (f64::MAX, f64::MAX);
    for round in 0..6 {
        let (f, q) = (time_on(Kernel::F32), time_on(kernel));
        // The first round warms caches, packers and the thread pool.
        if round > 0 {
            f32_best = f32_best.min(f);
            kernel_best = kernel_best.min(q);
        }
    }
    let ratio = f32_best / kernel_best;
    SPEEDUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((kernel, ratio));
    ratio
}

/// What [`speedup_over_f32`] measured for `kernel` in this process, if it has run.
pub fn measured_speedup(kernel: Kernel) -> Option<f64> {
    let measured = SPEEDUPS.lock().unwrap_or_else(|e| e.into_inner());
    measured.iter().find(|(k, _)| *k == kernel).map(|(_, r)| *r)
}

static SPEEDUPS: std::sync::Mutex<Vec<(Kernel, f64)>> = std::sync::Mutex::new(Vec::new());

/// `a (m×k) · b (k×n)` as a new row-major `m×n` matrix, `a` and `b` given by (row, column)
/// strides, on this thread's matmul kernel: bf16 operands with f32 sums where a bf16 kernel is
/// set ([`set_matmul_kernel`]), gemm in f32 otherwise. For the optimizer's own products.
pub fn matmul_f32(
    dims: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) -> Vec<f32> {
    linear::matmul_new(dims, a, a_strides, b, b_strides)
}

/// e^x in f32 within two ulp (tested), without a call into libm: the softmaxes, cross-entropy and SiLU
/// of a training step take tens of millions of exponentials, and glibc's scalar `expf` was 6% of
/// the step. Cody–Waite reduction x = n·ln2 + r with |r| ≤ ln2/2, Cephes' polynomial for e^r,
/// and 2^n built in the exponent bits (in two halves, so n = 128 does not overflow early).
/// Below −87.33 (where e^x leaves the normal range) it returns 0; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to the nearest integer, held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_54;
    const HIGH: f32 = 88.722_83;
    let xc = x.clamp(LOW, HIGH);
    let t = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let k = t.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let half = k >> 1;
    let two = |e: i32| f32::from_bits(((e + 127) << 23) as u32);
    let y = er * two(half) * two(k - half);
    let y = if x < LOW { 0.0 } else { y };
    let y = if x > HIGH { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Runs `f` compiled for AVX2 where the CPU has it. The crate's baseline is SSE2, so the
/// kernels' loops (exponentials, norms, rotations, the fused backward passes) ran four lanes
/// wide; `f` is inlined here and vectorised eight wide. Rust never fuses a multiply and an add
/// on its own, so the results are the same bits on either path (`tests/precision.rs` trains on
/// both; `CHATFORGE_SIMD=baseline` forces the baseline).
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if wide_simd() {
            // SAFETY: the CPU has AVX2 (checked by `wide_simd`).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `wide(|| body)` with the closure marked `#[inline(always)]`: inlined into the AVX2 function,
/// its loops vectorise eight wide; called, they would keep the baseline's four.
macro_rules! wide {
    ($($body:tt)*) => {
        wide(
            #[inline(always)]
            || { $($body)* },
        )
    };
}

/// The build the fused kernels' loops run: `avx2` or `baseline` (SSE2 on x86-64).
pub fn simd_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if wide_simd() {
        return "avx2";
    }
    "baseline"
}

/// Whether [`wide`] runs its AVX2 build: the CPU has AVX2 and `CHATFORGE_SIMD` is not
/// `baseline`. Read once.
#[cfg(target_arch = "x86_64")]
fn wide_simd() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        std::is_x86_feature_detected!("avx2")
            && std::env::var("CHATFORGE_SIMD").map_or(true, |v| v != "baseline")
    })
}

/// Lanes the row reductions below fold in, so that they vectorise.
const LANES: usize = 8;

/// The largest element of a row (NaNs skipped, as `Float::max` does).
#[inline(always)]
fn row_max<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            if c[i] > lanes[i] {
                lanes[i] = c[i];
            }
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(T::neg_infinity(), |m, &v| Float::max(m, v))
}

/// The sum of a row.
#[inline(always)]
fn row_sum<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().chain(tail).fold(T::zero(), |a, &v| a + v)
}

/// Σ a·b over two rows, in eight lanes so that it vectorises (a fold in order is a chain of
/// dependent adds, bound by their latency); the lanes are folded onto the tail's sum in a fixed
/// order, which `cached_attention`'s AVX2 build repeats for eight keys at once.
#[inline(always)]
fn row_dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = tail_dot(ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().fold(tail, |s, &v| s + v)
}

/// The part of [`row_dot`] past its last whole group of lanes, summed in order from zero.
#[inline(always)]
fn tail_dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// Σ exp(x − max) over a row.
#[inline(always)]
fn exp_sum<T: Real>(row: &[T], max: T) -> T {
    let mut lanes = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += (c[i] - max).fast_exp();
        }
    }
    lanes
        .iter()
        .copied()
        .chain(tail.iter().map(|&x| (x - max).fast_exp()))
        .fold(T::zero(), |a, v| a + v)
}

/// Writes exp(x − max) of each element of `row` to `out` and returns their sum.
#[inline(always)]
fn exp_into<T: Real>(row: &[T], max: T, out: &mut [T]) -> T {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - max).fast_exp();
    }
    row_sum(&out[..row.len()])
}

fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `$f::<T>` for the storage's float type.
macro_rules! dispatch {
    ($dtype:expr, $op:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => Err(Error::Msg(format!("{}: unsupported dtype {dt:?}", $op))),
        }
    };
}

/// The `name` and `cpu_fwd` of a CustomOp2 whose forward pass is `$f::<T>(s1, l1, s2, l2, ...)`
/// for the storage's float type, passing the op's listed fields after them.
macro_rules! op2_forward {
    ($name:literal, $f:ident $(, $field:ident)*) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            dispatch!(s1.dtype(), $name, $f(s1, l1, s2, l2 $(, self.$field)*))
        }
    };
}

/// Implements a CustomOp3 used only inside backward passes (so it has no backward of its own):
/// `cpu_fwd` dispatches on dtype to `$f(s1, l1, s2, l2, s3, l3, self.fields...)`.
macro_rules! forward_only_op3 {
    ($ty:ty, $name:literal, $f:ident $(, $field:ident)*) => {
        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                dispatch!(s1.dtype(), $name, $f(s1, l1, s2, l2, s3, l3 $(, self.$field)*))
            }
        }
    };
}

/// Whether the fused kernels can run on this tensor.
pub fn fused_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

// ---------------------------------------------------------------- causal softmax

/// A pointer tasks write disjoint, strided parts through.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: every task writes rows no other task writes.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `offset` places in (a method, so closures capture the whole Sync wrapper).
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

mod gated;
mod linear;
mod norm;
mod rope;
mod softmax;
use linear::{linear_dims, matmul_new, times_transposed};
mod attention;
mod cached_attention;
mod loss;
#[cfg(test)]
mod tests;

pub use attention::*;
pub use cached_attention::*;
pub use gated::*;
pub use linear::*;
pub use loss::*;
pub use norm::*;
pub use rope::*;
pub use softmax::*;
