//! Fused CPU kernels with their backward passes, for the operations that dominate a training step
//! when composed from candle primitives (each primitive is a separate, often single-threaded,
//! broadcasting pass over memory): causal softmax, RMSNorm, rotary embedding, cross-entropy,
//! SwiGLU, causal attention and the projections themselves.
//!
//! Each kernel has a composed twin built from differentiable candle ops; the model uses the twin on
//! devices other than the CPU, and the tests check that both agree in value and gradient.

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
    /// `a · b` in bf16 on AMX tiles when the projections run in bf16 ([`set_bf16_matmuls`]);
    /// `None` otherwise.
    fn bf16_matmul(
        _a: super::amx::Strided<Self>,
        _b: super::amx::Strided<Self>,
    ) -> Option<Vec<Self>> {
        None
    }
}
impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
    fn bf16_matmul(a: super::amx::Strided<f32>, b: super::amx::Strided<f32>) -> Option<Vec<f32>> {
        bf16_matmuls().then(|| super::amx::matmul(a, b))
    }
}
impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

static BF16_MATMULS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the projections' and output head's f32 matmuls (forward and backward) with bf16 operands
/// and f32 sums on AMX tiles, as mixed-precision training does; weights, gradients, optimizer
/// state and every other operation stay f32. Returns whether that is now on: false where the CPU
/// has no AMX. Process-wide, like the thread count.
pub fn set_bf16_matmuls(on: bool) -> bool {
    let on = on && super::amx::available();
    BF16_MATMULS.store(on, std::sync::atomic::Ordering::Relaxed);
    on
}

/// Whether the projections run in bf16 now.
pub fn bf16_matmuls() -> bool {
    BF16_MATMULS.load(std::sync::atomic::Ordering::Relaxed)
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

/// Lanes the row reductions below fold in, so that they vectorise.
const LANES: usize = 8;

/// The largest element of a row (NaNs skipped, as `Float::max` does).
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

/// Σ exp(x − max) over a row.
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

/// Softmax over the last axis of [.., T, S] scores where query row i sees keys 0..=i+(S-T)
/// (the rows are the last T positions of an S-long sequence); hidden keys get probability 0.
struct CausalSoftmax;
struct CausalSoftmaxBackward;

fn causal_softmax_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "causal_softmax")?;
    let dims = l.dims();
    let (t, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(r, (yr, xr))| {
            let visible = (r % t) + (n - t) + 1;
            let max = row_max(&xr[..visible]);
            let sum = exp_into(&xr[..visible], max, yr);
            let inv = T::one() / sum;
            yr[..visible].iter_mut().for_each(|v| *v *= inv);
        });
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

/// dx = y * (dy - sum(dy * y)) per row.
fn softmax_bwd<T: Real>(
    ys: &CpuStorage,
    yl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let y = data::<T>(ys, yl, "softmax_backward")?;
    let g = data::<T>(gs, gl, "softmax_backward")?;
    let n = yl.dims()[yl.dims().len() - 1];
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(g.par_chunks(n)))
        .for_each(|(d, (yr, gr))| {
            let dot = yr.iter().zip(gr).fold(T::zero(), |a, (&p, &q)| a + p * q);
            for j in 0..n {
                d[j] = yr[j] * (gr[j] - dot);
            }
        });
    Ok((T::to_cpu_storage_owned(dx), yl.shape().clone()))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal_softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s.dtype(), self.name(), causal_softmax_fwd(s, l))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &dy.contiguous()?,
            &CausalSoftmaxBackward,
        )?))
    }
}

impl CustomOp2 for CausalSoftmaxBackward {
    op2_forward!("causal_softmax_backward", softmax_bwd);
}

/// Causal softmax of attention scores [.., T, S].
pub fn causal_softmax(scores: &Tensor) -> Result<Tensor> {
    if fused_ok(scores) {
        scores.contiguous()?.apply_op1(CausalSoftmax)
    } else {
        causal_softmax_composed(scores)
    }
}

pub fn causal_softmax_composed(scores: &Tensor) -> Result<Tensor> {
    let (t, s) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= i + (s - t) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), scores.device())?.to_dtype(scores.dtype())?;
    candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f64,
}
/// Gradient with respect to x, from (x, w, dy).
struct RmsNormBackwardX {
    eps: f64,
}
/// Gradient with respect to w, from (x, w, dy).
struct RmsNormBackwardW {
    eps: f64,
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let ms = row.iter().fold(T::zero(), |a, &v| a + v * v) / T::from(row.len()).expect("len");
    T::one() / (ms + T::from(eps).expect("eps")).sqrt()
}

fn rms_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(xs, xl, "rms_norm")?;
    let w = data::<T>(ws, wl, "rms_norm")?;
    let n = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yr, xr)| {
            let r = inv_rms(xr, eps);
            for j in 0..n {
                yr[j] = xr[j] * r * w[j];
            }
        });
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

/// dx = r·g − x·r³·mean(g·x) with g = dy·w.
fn rms_bwd_x<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(xs, xl, "rms_norm_backward")?;
    let w = data::<T>(ws, wl, "rms_norm_backward")?;
    let dy = data::<T>(gs, gl, "rms_norm_backward")?;
    let n = w.len();
    let nf = T::from(n).expect("len");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(d, (xr, gr))| {
            let r = inv_rms(xr, eps);
            let dot = (0..n).fold(T::zero(), |a, j| a + gr[j] * w[j] * xr[j]) / nf;
            let r3 = r * r * r;
            for j in 0..n {
                d[j] = r * gr[j] * w[j] - xr[j] * r3 * dot;
            }
        });
    Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
}

/// dw = Σ_rows dy·x·r, summed per chunk of rows in parallel.
fn rms_bwd_w<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(xs, xl, "rms_norm_backward")?;
    let dy = data::<T>(gs, gl, "rms_norm_backward")?;
    let n = wl.shape().elem_count();
    let _ = ws;
    let rows_per_chunk = 64;
    let dw = x
        .par_chunks(n * rows_per_chunk)
        .zip(dy.par_chunks(n * rows_per_chunk))
        .map(|(xc, gc)| {
            let mut acc = vec![T::zero(); n];
            for (xr, gr) in xc.chunks(n).zip(gc.chunks(n)) {
                let r = inv_rms(xr, eps);
                for j in 0..n {
                    acc[j] += gr[j] * xr[j] * r;
                }
            }
            acc
        })
        .reduce(
            || vec![T::zero(); n],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(p, q)| *p += q);
                a
            },
        );
    Ok((T::to_cpu_storage_owned(dw), wl.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    op2_forward!("rms_norm", rms_fwd, eps);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackwardX { eps: self.eps })?;
        let dw = x.apply_op3_no_bwd(w, &dy, &RmsNormBackwardW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

forward_only_op3!(RmsNormBackwardX, "rms_norm_backward_x", rms_bwd_x, eps);

forward_only_op3!(RmsNormBackwardW, "rms_norm_backward_w", rms_bwd_w, eps);

/// x / sqrt(mean(x²) + eps) · w over the last axis.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        rms_norm_composed(x, w, eps)
    }
}

pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

// ---------------------------------------------------------------- rotary embedding

/// Rotate-half rotary embedding of x [B, H, T, D] by cos/sin [R, 1, T, D/2] (R is 1 or B).
/// The backward pass is the inverse rotation.
struct Rope {
    inverse: bool,
}

fn rope_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    cs: &CpuStorage,
    cl: &Layout,
    ss: &CpuStorage,
    sl: &Layout,
    inverse: bool,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(xs, xl, "rope")?;
    let cos = data::<T>(cs, cl, "rope")?;
    let sin = data::<T>(ss, sl, "rope")?;
    let dims = xl.dims();
    if dims.len() != 4 {
        return Err(Error::Msg("rope: expected x of shape [B, H, T, D]".into()));
    }
    let (h, t, d) = (dims[1], dims[2], dims[3]);
    let half = d / 2;
    let rows = cl.dims()[0];
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(i, (yr, xr))| {
            let b = i / (h * t);
            let pos = i % t;
            let base = ((if rows == 1 { 0 } else { b }) * t + pos) * half;
            for k in 0..half {
                let c = cos[base + k];
                let s = if inverse {
                    -sin[base + k]
                } else {
                    sin[base + k]
                };
                let (x1, x2) = (xr[k], xr[k + half]);
                yr[k] = x1 * c - x2 * s;
                yr[k + half] = x2 * c + x1 * s;
            }
        });
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
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
        dispatch!(
            s1.dtype(),
            self.name(),
            rope_fwd(s1, l1, s2, l2, s3, l3, self.inverse)
        )
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding in Hugging Face's rotate-half layout.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { inverse: false },
        )
    } else {
        rope_composed(x, cos, sin)
    }
}

pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

// ---------------------------------------------------------------- cross-entropy

/// Per-row negative log-likelihood of u32 targets under logits [N, V].
struct CrossEntropy;
/// (logits, targets, dloss) -> dlogits = dloss · (softmax(logits) − onehot(target)).
struct CrossEntropyBackward;

fn ce_fwd<T: Real>(
    ls: &CpuStorage,
    ll: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let logits = data::<T>(ls, ll, "cross_entropy")?;
    let targets = data::<u32>(ts, tl, "cross_entropy")?;
    let v = ll.dims()[1];
    let out: Result<Vec<T>> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let t = t as usize;
            if t >= v {
                return Err(Error::Msg(format!(
                    "cross_entropy: target {t} outside vocabulary {v}"
                )));
            }
            let max = row_max(row);
            Ok(exp_sum(row, max).ln() + max - row[t])
        })
        .collect();
    Ok((T::to_cpu_storage_owned(out?), Shape::from(ll.dims()[0])))
}

fn ce_bwd<T: Real>(
    ls: &CpuStorage,
    ll: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let logits = data::<T>(ls, ll, "cross_entropy_backward")?;
    let targets = data::<u32>(ts, tl, "cross_entropy_backward")?;
    let g = data::<T>(gs, gl, "cross_entropy_backward")?;
    let v = ll.dims()[1];
    let mut d = vec![T::zero(); logits.len()];
    d.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .enumerate()
        .for_each(|(i, (dr, row))| {
            let max = row_max(row);
            let scale = g[i] / exp_into(row, max, dr);
            dr.iter_mut().for_each(|d| *d *= scale);
            let t = targets[i] as usize;
            dr[t] -= g[i];
        });
    Ok((T::to_cpu_storage_owned(d), ll.shape().clone()))
}

impl CustomOp2 for CrossEntropy {
    op2_forward!("cross_entropy", ce_fwd);
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op3_no_bwd(targets, &dy.contiguous()?, &CrossEntropyBackward)?;
        Ok((Some(d), None))
    }
}

forward_only_op3!(CrossEntropyBackward, "cross_entropy_backward", ce_bwd);

/// Negative log-likelihood of each target under logits [N, V] -> [N].
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, CrossEntropy)
    } else {
        token_nll_composed(logits, targets)
    }
}

pub fn token_nll_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    logp.gather(&targets.reshape((n, 1))?, 1)?.neg()?.reshape(n)
}

// ---------------------------------------------------------------- SwiGLU

/// silu(gate) · up, the Llama MLP's gated activation.
struct SwiGlu;
/// (gate, up, dy) -> d gate or d up.
struct SwiGluBackward {
    wrt_gate: bool,
}

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).fast_exp())
}

fn swiglu_fwd<T: Real>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(gs, gl, "swiglu")?;
    let u = data::<T>(us, ul, "swiglu")?;
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(yc, (gc, uc))| {
            for i in 0..yc.len() {
                yc[i] = gc[i] * sigmoid(gc[i]) * uc[i];
            }
        });
    Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
}

fn swiglu_bwd<T: Real>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
    wrt_gate: bool,
) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(gs, gl, "swiglu_backward")?;
    let u = data::<T>(us, ul, "swiglu_backward")?;
    let dy = data::<T>(ds, dl, "swiglu_backward")?;
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(4096).enumerate().for_each(|(c, oc)| {
        let base = c * 4096;
        for (i, o) in oc.iter_mut().enumerate() {
            let (x, up, d) = (g[base + i], u[base + i], dy[base + i]);
            let s = sigmoid(x);
            *o = if wrt_gate {
                // d/dx [x·s(x)] = s(x)·(1 + x·(1 − s(x)))
                d * up * s * (T::one() + x * (T::one() - s))
            } else {
                d * x * s
            };
        }
    });
    Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
}

impl CustomOp2 for SwiGlu {
    op2_forward!("swiglu", swiglu_fwd);
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dg = gate.apply_op3_no_bwd(up, &dy, &SwiGluBackward { wrt_gate: true })?;
        let du = gate.apply_op3_no_bwd(up, &dy, &SwiGluBackward { wrt_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

forward_only_op3!(SwiGluBackward, "swiglu_backward", swiglu_bwd, wrt_gate);

/// silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        swiglu_composed(gate, up)
    }
}

pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

// ---------------------------------------------------------------- linear projection

/// `x · wᵀ` for x `[.., K]` and a weight `w` `[M, K]`, as one autograd node. candle_nn's Linear
/// is four nodes (reshape, transpose, matmul, reshape), and candle's backward gives every node's
/// input a zeroed gradient to add into: three extra passes over the activations per projection and
/// a transposed add over the weight. As a broadcast matmul, the tied output head also built a
/// `[B, hidden, vocab]` weight gradient and summed it over the batch.
struct LinearProj;

/// One of the two products of the projection's backward pass, given `dy` `[N, M]` and the other
/// operand.
struct LinearGrad {
    of: GradOf,
}

#[derive(Clone, Copy)]
enum GradOf {
    /// `dx = dy · w`, with `w` `[M, K]`.
    Input,
    /// `dw = dyᵀ · x`, with `x` `[N, K]`.
    Weight,
}

/// `a (m×k) · b (k×n)` as a new row-major `m×n` matrix, on all of rayon's threads; `a` and `b`
/// are given by (row, column) strides.
fn matmul_new<T: Real>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
) -> Vec<T> {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(
        m * k == 0 || last(a_rs, a_cs, m, k) < a.len(),
        "matmul_new: lhs too short"
    );
    assert!(
        n * k == 0 || last(b_rs, b_cs, k, n) < b.len(),
        "matmul_new: rhs too short"
    );
    if k == 0 {
        return vec![T::zero(); m * n];
    }
    let strided = |data, rows, cols, (rs, cs)| super::amx::Strided {
        data,
        rows,
        cols,
        rs,
        cs,
    };
    if let Some(c) = T::bf16_matmul(
        strided(a, m, k, (a_rs, a_cs)),
        strided(b, k, n, (b_rs, b_cs)),
    ) {
        return c;
    }
    // Left uninitialised: gemm writes every element when it does not read the destination, and
    // zeroing first was a tenth of the step's memory traffic.
    let mut dst = Vec::with_capacity(m * n);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every read inside `a` and `b`; `dst` has room for m×n
    // values, all of which gemm writes (k > 0, read_dst false) before the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
        dst.set_len(m * n);
    };
    dst
}

/// (rows N, weight rows M, inner K) of `x` `[.., K]` against `w` `[M, K]`.
fn linear_dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let k = xl.dims().last().copied().unwrap_or(0);
    let (m, wk) = wl.shape().dims2()?;
    if wk != k {
        return Err(Error::Msg(format!(
            "linear: input width {k} does not match weight {:?}",
            wl.dims()
        )));
    }
    Ok((xl.shape().elem_count() / k.max(1), m, k))
}

/// `x · wᵀ` as row-major values `[N, M]`, for x `[.., K]` and w `[M, K]`.
fn times_transposed<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<Vec<T>> {
    let (n, m, k) = linear_dims(xl, wl)?;
    let x = data::<T>(xs, xl, "linear")?;
    let w = data::<T>(ws, wl, "linear")?;
    Ok(matmul_new((n, m, k), x, (k, 1), w, (1, k)))
}

fn linear_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let y = times_transposed::<T>(xs, xl, ws, wl)?;
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("linear_dims checked the rank") = wl.dims()[0];
    Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
}

fn linear_bwd<T: Real>(
    ds: &CpuStorage,
    dl: &Layout,
    os: &CpuStorage,
    ol: &Layout,
    of: GradOf,
) -> Result<(CpuStorage, Shape)> {
    let dy = data::<T>(ds, dl, "linear_backward")?;
    let other = data::<T>(os, ol, "linear_backward")?;
    let m = dl.dims().last().copied().unwrap_or(0);
    let n = dl.shape().elem_count() / m.max(1);
    Ok(match of {
        GradOf::Input => {
            let (wm, k) = ol.shape().dims2()?;
            debug_assert_eq!(wm, m);
            let dx = matmul_new((n, k, m), dy, (m, 1), other, (k, 1));
            let mut dims = dl.dims().to_vec();
            *dims.last_mut().expect("dy has a last axis") = k;
            (T::to_cpu_storage_owned(dx), Shape::from(dims))
        }
        GradOf::Weight => {
            let k = ol.dims().last().copied().unwrap_or(0);
            let dw = matmul_new((m, k, n), dy, (1, m), other, (k, 1));
            (T::to_cpu_storage_owned(dw), Shape::from((m, k)))
        }
    })
}

impl CustomOp2 for LinearGrad {
    op2_forward!("linear_backward", linear_bwd, of);
}

impl CustomOp2 for LinearProj {
    op2_forward!("linear", linear_fwd);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &LinearGrad { of: GradOf::Input })?;
        let dw = dy.apply_op2_no_bwd(x, &LinearGrad { of: GradOf::Weight })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x · wᵀ` for x `[.., K]` and w `[M, K]` (a projection without bias). Fused on the CPU,
/// candle_nn's Linear elsewhere.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && x.dtype() == w.dtype() {
        x.contiguous()?.apply_op2(&w.contiguous()?, LinearProj)
    } else {
        linear_composed(x, w)
    }
}

pub fn linear_composed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    candle_nn::Linear::new(w.clone(), None).forward(x)
}

// ---------------------------------------------------------------- output head with cross-entropy

/// The output projection and cross-entropy as one node: hidden `[N, C]`, head weight `[V, C]` and
/// u32 targets `[N]` give each row's negative log-likelihood `[N]`. Separately, the logits
/// (`N·V`, 64 MB in the benchmark step) were a node of their own: cross-entropy's backward
/// allocated their gradient zeroed, candle allocated another zeroed one to add it into, and
/// the projection's backward read it again. Here the backward pass turns the logits the forward
/// pass kept into their gradient in place and multiplies straight from it.
struct HeadNll {
    /// The forward pass's logits, taken by the backward pass (recomputed if already taken).
    logits: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// (rows N, vocabulary V, width C) of hidden `[.., C]` against the head `[V, C]`.
fn head_dims(hl: &Layout, wl: &Layout, tl: &Layout) -> Result<(usize, usize, usize)> {
    let (n, v, c) = linear_dims(hl, wl)?;
    if tl.shape().elem_count() != n {
        return Err(Error::Msg(format!(
            "head_nll: {} targets for {n} hidden rows",
            tl.shape().elem_count()
        )));
    }
    Ok((n, v, c))
}

fn head_nll_fwd<T: Real>(
    op: &HeadNll,
    hs: &CpuStorage,
    hl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, v, _) = head_dims(hl, wl, tl)?;
    let targets = data::<u32>(ts, tl, "head_nll")?;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(Error::Msg(format!(
            "head_nll: target {t} outside vocabulary {v}"
        )));
    }
    let logits = times_transposed::<T>(hs, hl, ws, wl)?;
    let nll: Vec<T> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row_max(row);
            exp_sum(row, max).ln() + max - row[t as usize]
        })
        .collect();
    let nll = T::to_cpu_storage_owned(nll);
    *op.logits.lock().expect("head_nll cache") = Some(Box::new(logits));
    Ok((nll, Shape::from(n)))
}

/// (hidden, head weight) gradients from `dnll` `[N]`.
fn head_nll_bwd<T: Real>(
    op: &HeadNll,
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    dnll: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (hs, hl) = h.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (ts, tl) = targets.storage_and_layout();
    let (
        candle_core::Storage::Cpu(hs),
        candle_core::Storage::Cpu(ws),
        candle_core::Storage::Cpu(ts),
    ) = (&*hs, &*ws, &*ts)
    else {
        return Err(Error::Msg("head_nll: operands must be on the CPU".into()));
    };
    let (n, v, c) = head_dims(hl, wl, tl)?;
    let g = dnll.contiguous()?.to_vec1::<T>()?;
    let targets = data::<u32>(ts, tl, "head_nll")?;
    let cached = op.logits.lock().expect("head_nll cache").take();
    let mut d: Vec<T> = match cached.and_then(|c| c.downcast::<Vec<T>>().ok()) {
        Some(logits) => *logits,
        None => times_transposed::<T>(hs, hl, ws, wl)?,
    };
    // dlogits = g · (softmax(logits) − onehot(target)), row by row in place.
    d.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let max = row_max(row);
        row.iter_mut().for_each(|x| *x = (*x - max).fast_exp());
        let scale = g[i] / row_sum(row);
        row.iter_mut().for_each(|x| *x *= scale);
        row[targets[i] as usize] -= g[i];
    });
    let hd = data::<T>(hs, hl, "head_nll")?;
    let wd = data::<T>(ws, wl, "head_nll")?;
    let dh = matmul_new((n, c, v), &d, (v, 1), wd, (c, 1));
    let dw = matmul_new((v, c, n), &d, (1, v), hd, (c, 1));
    let dev = h.device();
    Ok((
        Tensor::from_vec(dh, h.shape(), dev)?,
        Tensor::from_vec(dw, w.shape(), dev)?,
    ))
}

impl CustomOp3 for HeadNll {
    fn name(&self) -> &'static str {
        "head_nll"
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
        dispatch!(
            s1.dtype(),
            self.name(),
            head_nll_fwd(self, s1, l1, s2, l2, s3, l3)
        )
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _nll: &Tensor,
        dnll: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, dw) = dispatch!(
            h.dtype(),
            self.name(),
            head_nll_bwd(self, h, w, targets, dnll)
        )?;
        Ok((Some(dh), Some(dw), None))
    }
}

/// Negative log-likelihood `[N]` of u32-convertible `targets` `[N]` under the logits
/// `hidden · headᵀ` (hidden `[.., C]` with N rows, head `[V, C]`), without a logits node on the
/// CPU.
pub fn head_nll(hidden: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(hidden) && hidden.dtype() == head.dtype() {
        let op = HeadNll {
            logits: std::sync::Mutex::new(None),
        };
        hidden.contiguous()?.apply_op3(
            &head.contiguous()?,
            &targets.to_dtype(DType::U32)?.flatten_all()?.contiguous()?,
            op,
        )
    } else {
        head_nll_composed(hidden, head, targets)
    }
}

pub fn head_nll_composed(hidden: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let c = hidden.dim(D::Minus1)?;
    let logits = linear_composed(&hidden.reshape(((), c))?, head)?;
    token_nll_composed(&logits, &targets.flatten_all()?)
}

// ---------------------------------------------------------------- causal attention

/// Rotary embedding, scaling and causal attention as one autograd node, on the projections'
/// own layout: q `[B, T, H·D]`, k and v `[B, T, KVH·D]` (query head h reads key/value head
/// h / (H / KVH)); the output is `[B, T, H·D]`, ready for the output projection. Composed, the
/// head reshapes, transposes, copies, rotations, the scores and the probabilities are each a
/// node whose gradient candle allocates as zeros and then adds into (and the scores and
/// probabilities, `B·H·T²` each, are kept for the backward pass); here the backward pass
/// recomputes each head's probabilities instead.
struct RopeAttention {
    heads: usize,
    kv_heads: usize,
    scale: f64,
    /// Rotary tables `[T, D/2]`.
    cos: Vec<f64>,
    sin: Vec<f64>,
}

/// A pointer tasks write disjoint, strided parts through.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: every task writes rows no other task writes.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `offset` places in (a method, so closures capture the whole Sync wrapper).
    unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// `dst (m×n, row stride dst_rs) [+]= a·b`, with `a` (m×k) and `b` (k×n) given by row and
/// column strides.
#[allow(clippy::too_many_arguments)]
unsafe fn small_matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Row-wise causal softmax of a `t × t` score block in place (row i sees columns 0..=i).
fn causal_softmax_rows<T: Real>(p: &mut [T], t: usize) {
    for (i, row) in p.chunks_mut(t).enumerate() {
        let max = row_max(&row[..=i]);
        for v in row[..=i].iter_mut() {
            *v = (*v - max).fast_exp();
        }
        let sum = row_sum(&row[..=i]);
        let inv = T::one() / sum;
        row[..=i].iter_mut().for_each(|v| *v *= inv);
        row[i + 1..].iter_mut().for_each(|v| *v = T::zero());
    }
}

impl RopeAttention {
    fn dims(&self, ql: &Layout, kl: &Layout) -> Result<(usize, usize, usize)> {
        let (q, k) = (ql.dims(), kl.dims());
        let (h, kvh) = (self.heads, self.kv_heads);
        if q.len() != 3 || k.len() != 3 || q[0] != k[0] || q[1] != k[1] || h == 0 || kvh == 0 {
            return Err(Error::Msg(format!(
                "rope_attention: q {q:?} and k/v {k:?} do not fit"
            )));
        }
        let d = q[2] / h;
        if d * h != q[2] || d * kvh != k[2] || h % kvh != 0 || d % 2 != 0 {
            return Err(Error::Msg(format!(
                "rope_attention: widths {} and {} do not split into {h} and {kvh} heads",
                q[2], k[2]
            )));
        }
        if self.cos.len() != q[1] * d / 2 {
            return Err(Error::Msg(
                "rope_attention: rotary tables do not fit".into(),
            ));
        }
        Ok((q[0], q[1], d))
    }

    /// Head `head` of batch row `b` of `x` (`heads` heads per position), rotated and scaled,
    /// as a contiguous `t × d` block.
    fn rotated<T: Real>(
        &self,
        x: &[T],
        heads: usize,
        (b, head): (usize, usize),
        (t, d): (usize, usize),
        scale: f64,
    ) -> Vec<T> {
        let half = d / 2;
        let mut out = vec![T::zero(); t * d];
        for i in 0..t {
            let src = &x[((b * t + i) * heads + head) * d..][..d];
            let dst = &mut out[i * d..(i + 1) * d];
            for j in 0..half {
                let (c, s) = (
                    self.cos[i * half + j] * scale,
                    self.sin[i * half + j] * scale,
                );
                let (c, s) = (T::from(c).unwrap(), T::from(s).unwrap());
                let (x1, x2) = (src[j], src[j + half]);
                dst[j] = x1 * c - x2 * s;
                dst[j + half] = x2 * c + x1 * s;
            }
        }
        out
    }

    /// The transposed rotation of a `t × d` gradient block, scaled, written into head `head` of
    /// batch row `b` of a `[B, T, heads·D]` gradient.
    #[allow(clippy::too_many_arguments)]
    unsafe fn unrotate_into<T: Real>(
        &self,
        g: &[T],
        out: SharedOut<T>,
        heads: usize,
        b: usize,
        head: usize,
        t: usize,
        d: usize,
        scale: f64,
    ) {
        let half = d / 2;
        for i in 0..t {
            let dst = out.at(((b * t + i) * heads + head) * d);
            for j in 0..half {
                let (c, s) = (
                    self.cos[i * half + j] * scale,
                    self.sin[i * half + j] * scale,
                );
                let (c, s) = (T::from(c).unwrap(), T::from(s).unwrap());
                let (g1, g2) = (g[i * d + j], g[i * d + j + half]);
                *dst.add(j) = g1 * c + g2 * s;
                *dst.add(j + half) = g2 * c - g1 * s;
            }
        }
    }

    /// `softmax(qr·krᵀ)` of rotated blocks into `p` (`t × t`).
    fn probs<T: Real>(qr: &[T], kr: &[T], p: &mut [T], t: usize, d: usize) {
        // SAFETY: qr and kr hold t·d values, p holds t·t.
        unsafe {
            small_matmul(
                (t, t, d),
                p.as_mut_ptr(),
                t,
                false,
                qr.as_ptr(),
                (d, 1),
                kr.as_ptr(),
                (1, d),
            )
        };
        causal_softmax_rows(p, t);
    }

    fn forward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, t, d): (usize, usize, usize),
    ) -> Vec<T> {
        let (h, kvh) = (self.heads, self.kv_heads);
        let rep = h / kvh;
        let kr: Vec<Vec<T>> = (0..b * kvh)
            .into_par_iter()
            .map(|bg| self.rotated(k, kvh, (bg / kvh, bg % kvh), (t, d), 1.0))
            .collect();
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedOut(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|bh| {
            let (bi, head) = (bh / h, bh % h);
            let g = head / rep;
            let qr = self.rotated(q, h, (bi, head), (t, d), self.scale);
            let mut p = vec![T::zero(); t * t];
            Self::probs(&qr, &kr[bi * kvh + g], &mut p, t, d);
            // SAFETY: this task alone writes head `head` of row `bi`; v's head g is read with its
            // row stride.
            unsafe {
                small_matmul(
                    (t, d, t),
                    dst.at((bi * t * h + head) * d),
                    h * d,
                    false,
                    p.as_ptr(),
                    (t, 1),
                    v.as_ptr().add((bi * t * kvh + g) * d),
                    (kvh * d, 1),
                )
            };
        });
        out
    }

    /// dQ, dK and dV given dO (all in the projections' layout).
    fn backward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dout: &[T],
        (b, t, d): (usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (h, kvh) = (self.heads, self.kv_heads);
        let rep = h / kvh;
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); q.len()],
            vec![T::zero(); k.len()],
            vec![T::zero(); v.len()],
        );
        let (dq_out, dk_out, dv_out) = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        // One task per key/value head: it alone writes that head's dK and dV and its query
        // heads' dQ.
        (0..b * kvh).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kvh, bg % kvh);
            let kr = self.rotated(k, kvh, (bi, g), (t, d), 1.0);
            let vg = unsafe { v.as_ptr().add((bi * t * kvh + g) * d) };
            let (mut dkr, mut p, mut dp, mut dqr) = (
                vec![T::zero(); t * d],
                vec![T::zero(); t * t],
                vec![T::zero(); t * t],
                vec![T::zero(); t * d],
            );
            for r in 0..rep {
                let head = g * rep + r;
                let qr = self.rotated(q, h, (bi, head), (t, d), self.scale);
                Self::probs(&qr, &kr, &mut p, t, d);
                let doh = unsafe { dout.as_ptr().add((bi * t * h + head) * d) };
                // SAFETY (all products): blocks are t×d or t×t with the strides given; dV's head
                // is this task's alone.
                unsafe {
                    // dV += Pᵀ·dO
                    small_matmul(
                        (t, d, t),
                        dv_out.at((bi * t * kvh + g) * d),
                        kvh * d,
                        true,
                        p.as_ptr(),
                        (1, t),
                        doh,
                        (h * d, 1),
                    );
                    // dP = dO·Vᵀ
                    small_matmul(
                        (t, t, d),
                        dp.as_mut_ptr(),
                        t,
                        false,
                        doh,
                        (h * d, 1),
                        vg,
                        (1, kvh * d),
                    );
                }
                // dS = P ∘ (dP − Σ_j P·dP), row by row; hidden keys have P = 0.
                for (pr, dr) in p.chunks(t).zip(dp.chunks_mut(t)) {
                    let dot = pr
                        .iter()
                        .zip(dr.iter())
                        .fold(T::zero(), |a, (&x, &y)| a + x * y);
                    for (x, y) in pr.iter().zip(dr.iter_mut()) {
                        *y = *x * (*y - dot);
                    }
                }
                unsafe {
                    // dQr = dS·Kr, dKr += dSᵀ·Qr
                    small_matmul(
                        (t, d, t),
                        dqr.as_mut_ptr(),
                        d,
                        false,
                        dp.as_ptr(),
                        (t, 1),
                        kr.as_ptr(),
                        (d, 1),
                    );
                    small_matmul(
                        (t, d, t),
                        dkr.as_mut_ptr(),
                        d,
                        true,
                        dp.as_ptr(),
                        (1, t),
                        qr.as_ptr(),
                        (d, 1),
                    );
                    self.unrotate_into(&dqr, dq_out, h, bi, head, t, d, self.scale);
                }
            }
            unsafe { self.unrotate_into(&dkr, dk_out, kvh, bi, g, t, d, 1.0) };
        });
        (dq, dk, dv)
    }
}

impl CustomOp3 for RopeAttention {
    fn name(&self) -> &'static str {
        "rope_attention"
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
        fn run<T: Real>(
            op: &RopeAttention,
            args: [(&CpuStorage, &Layout); 3],
        ) -> Result<(CpuStorage, Shape)> {
            let dims = op.dims(args[0].1, args[1].1)?;
            let q = data::<T>(args[0].0, args[0].1, "rope_attention")?;
            let k = data::<T>(args[1].0, args[1].1, "rope_attention")?;
            let v = data::<T>(args[2].0, args[2].1, "rope_attention")?;
            Ok((
                T::to_cpu_storage_owned(op.forward(q, k, v, dims)),
                args[0].1.shape().clone(),
            ))
        }
        dispatch!(
            s1.dtype(),
            self.name(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)])
        )
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real + candle_core::WithDType>(
            op: &RopeAttention,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            dout: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let dims = op.dims(q.layout(), k.layout())?;
            let flat = |x: &Tensor| -> Result<Vec<T>> { x.flatten_all()?.to_vec1::<T>() };
            let (dq, dk, dv) = op.backward(
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                &flat(&dout.contiguous()?)?,
                dims,
            );
            let dev = q.device();
            Ok((
                Tensor::from_vec(dq, q.shape(), dev)?,
                Tensor::from_vec(dk, k.shape(), dev)?,
                Tensor::from_vec(dv, v.shape(), dev)?,
            ))
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run::<f32>(self, q, k, v, dout)?,
            DType::F64 => run::<f64>(self, q, k, v, dout)?,
            dt => {
                return Err(Error::Msg(format!(
                    "rope_attention: unsupported dtype {dt:?}"
                )))
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Rotary embedding (tables `[1, 1, T, D/2]`), scaling by `scale` and causal self-attention for
/// projections q `[B, T, H·D]` and k, v `[B, T, KVH·D]`; the output is `[B, T, H·D]`. Fused on
/// the CPU, composed elsewhere.
pub fn rope_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    if !fused_ok(q) || cos.dim(0)? != 1 {
        return rope_attention_composed(q, k, v, (cos, sin), (heads, kv_heads), scale);
    }
    let table =
        |x: &Tensor| -> Result<Vec<f64>> { x.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
    let op = RopeAttention {
        heads,
        kv_heads,
        scale,
        cos: table(cos)?,
        sin: table(sin)?,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

pub fn rope_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (h, kvh): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let (b, t, w) = q.dims3()?;
    let d = w / h;
    let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
        x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
    };
    let q = (rope_composed(&heads(q, h)?, cos, sin)? * scale)?;
    let k = rope_composed(&heads(k, kvh)?, cos, sin)?;
    let v = heads(v, kvh)?;
    // Grouped heads stacked along time: row r·t + i of a group is query i of head r.
    let scores = q
        .reshape((b, kvh, (h / kvh) * t, d))?
        .matmul(&k.t()?)?
        .reshape((b, h, t, t))?;
    let probs = causal_softmax_composed(&scores)?;
    probs
        .reshape((b, kvh, (h / kvh) * t, t))?
        .matmul(&v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::util::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Checks that fused and composed versions agree in value and in the gradient of a weighted sum.
    fn agree(inputs: &[&Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor) {
        let (yf, yc) = (fused(), composed());
        assert!(
            max_diff(&yf, &yc) < 1e-9,
            "values differ by {}",
            max_diff(&yf, &yc)
        );
        let weights = randn(yf.dims(), 99);
        let gf = (yf * weights.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (yc * weights.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < 1e-9,
                "gradient {i} differs by {}",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn causal_softmax_matches_composed_with_and_without_offset() {
        for (t, s) in [(5, 5), (3, 7), (1, 4)] {
            let x = randn(&[2, 3, t, s], 1);
            agree(
                &[&x],
                || causal_softmax(x.as_tensor()).unwrap(),
                || causal_softmax_composed(x.as_tensor()).unwrap(),
            );
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let x = randn(&[3, 4, 8], 2);
        let w = randn(&[8], 3);
        agree(
            &[&x, &w],
            || rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            || rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
        );
    }

    #[test]
    fn rope_matches_composed_for_shared_and_per_row_tables() {
        let x = randn(&[2, 3, 5, 8], 4);
        for rows in [1, 2] {
            let c = randn(&[rows, 1, 5, 4], 5).as_tensor().detach();
            let s = randn(&[rows, 1, 5, 4], 6).as_tensor().detach();
            agree(
                &[&x],
                || rope(x.as_tensor(), &c, &s).unwrap(),
                || rope_composed(x.as_tensor(), &c, &s).unwrap(),
            );
        }
    }

    #[test]
    fn cross_entropy_matches_composed_and_rejects_bad_targets() {
        let logits = randn(&[6, 11], 7);
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
        agree(
            &[&logits],
            || token_nll(logits.as_tensor(), &targets).unwrap(),
            || token_nll_composed(logits.as_tensor(), &targets).unwrap(),
        );
        let bad = Tensor::new(&[0u32, 3, 11, 5, 5, 1], &Device::Cpu).unwrap();
        assert!(token_nll(logits.as_tensor(), &bad).is_err());
    }

    type AttentionFn =
        fn(&Tensor, &Tensor, &Tensor, (&Tensor, &Tensor), (usize, usize), f64) -> Result<Tensor>;

    #[test]
    fn rope_attention_matches_composed_with_grouped_heads() {
        let (t, d) = (6, 4);
        let c = randn(&[1, 1, t, d / 2], 13).as_tensor().detach();
        let s = randn(&[1, 1, t, d / 2], 14).as_tensor().detach();
        for (h, kvh) in [(2, 2), (4, 2), (3, 1)] {
            let q = randn(&[2, t, h * d], 10);
            let k = randn(&[2, t, kvh * d], 11);
            let v = randn(&[2, t, kvh * d], 12);
            let run = |f: AttentionFn| {
                f(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    (&c, &s),
                    (h, kvh),
                    0.5,
                )
                .unwrap()
            };
            agree(
                &[&q, &k, &v],
                || run(rope_attention),
                || run(rope_attention_composed),
            );
        }
    }

    #[test]
    fn linear_matches_composed_for_any_leading_shape() {
        let w = randn(&[5, 7], 20);
        for dims in [vec![3, 7], vec![2, 3, 7]] {
            let x = randn(&dims, 21);
            agree(
                &[&x, &w],
                || linear(x.as_tensor(), w.as_tensor()).unwrap(),
                || linear_composed(x.as_tensor(), w.as_tensor()).unwrap(),
            );
        }
        // One output row and one output column take gemm's vector paths.
        let (x1, w1) = (randn(&[1, 7], 26), randn(&[1, 7], 27));
        agree(
            &[&x1, &w1],
            || linear(x1.as_tensor(), w1.as_tensor()).unwrap(),
            || linear_composed(x1.as_tensor(), w1.as_tensor()).unwrap(),
        );
        let wrong = randn(&[5, 6], 22);
        assert!(linear(randn(&[3, 7], 23).as_tensor(), wrong.as_tensor()).is_err());
    }

    #[test]
    fn head_nll_matches_composed_and_rejects_bad_targets() {
        let h = randn(&[2, 3, 6], 24);
        let w = randn(&[11, 6], 25);
        let targets = Tensor::new(&[[0u32, 3, 10], [5, 5, 1]], &Device::Cpu).unwrap();
        agree(
            &[&h, &w],
            || head_nll(h.as_tensor(), w.as_tensor(), &targets).unwrap(),
            || head_nll_composed(h.as_tensor(), w.as_tensor(), &targets).unwrap(),
        );
        let bad = Tensor::new(&[[0u32, 3, 11], [5, 5, 1]], &Device::Cpu).unwrap();
        assert!(head_nll(h.as_tensor(), w.as_tensor(), &bad).is_err());
        let short = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        assert!(head_nll(h.as_tensor(), w.as_tensor(), &short).is_err());
    }

    #[test]
    fn exp_f32_is_within_two_ulp_and_keeps_the_edge_cases() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.7 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        // The lane-folded reductions agree with the plain ones, remainders included.
        let row: Vec<f32> = (0..21)
            .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row_max(&row), max);
        let plain: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        assert!((exp_sum(&row, max) - plain).abs() < 1e-5 * plain);
        let mut out = vec![0.0f32; row.len()];
        assert!((exp_into(&row, max, &mut out) - plain).abs() < 1e-5 * plain);
    }

    #[test]
    fn swiglu_matches_composed() {
        let g = randn(&[4, 9], 8);
        let u = randn(&[4, 9], 9);
        agree(
            &[&g, &u],
            || swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            || swiglu_composed(g.as_tensor(), u.as_tensor()).unwrap(),
        );
    }
}
