//! Fused CPU kernels with their backward passes, for the operations that dominate a training step
//! when composed from candle primitives (each primitive is a separate, often single-threaded,
//! broadcasting pass over memory): causal softmax, RMSNorm, rotary embedding and cross-entropy.
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
}
impl Real for f32 {}
impl Real for f64 {}

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
            let max = xr[..visible]
                .iter()
                .fold(T::neg_infinity(), |m, &v| Float::max(m, v));
            let mut sum = T::zero();
            for j in 0..visible {
                let e = (xr[j] - max).exp();
                yr[j] = e;
                sum += e;
            }
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
    fn name(&self) -> &'static str {
        "causal_softmax_backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1.dtype(), self.name(), softmax_bwd(s1, l1, s2, l2))
    }
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
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1.dtype(), self.name(), rms_fwd(s1, l1, s2, l2, self.eps))
    }
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
            let max = row.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x));
            let sum = row.iter().fold(T::zero(), |a, &x| a + (x - max).exp());
            Ok(sum.ln() + max - row[t])
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
            let max = row.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x));
            let sum = row.iter().fold(T::zero(), |a, &x| a + (x - max).exp());
            let scale = g[i] / sum;
            for j in 0..v {
                dr[j] = (row[j] - max).exp() * scale;
            }
            let t = targets[i] as usize;
            dr[t] -= g[i];
        });
    Ok((T::to_cpu_storage_owned(d), ll.shape().clone()))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1.dtype(), self.name(), ce_fwd(s1, l1, s2, l2))
    }
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
    T::one() / (T::one() + (-x).exp())
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
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1.dtype(), self.name(), swiglu_fwd(s1, l1, s2, l2))
    }
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

// ---------------------------------------------------------------- causal attention

/// Causal attention `softmax(Q·Kᵀ)·V` for q `[B, H, T, D]` (already scaled) and k, v
/// `[B, KVH, T, D]` (query head h reads key/value head h / (H / KVH)), as one autograd node.
/// Composed, the scores and probabilities (`B·H·T²` each, the largest tensors of a training
/// step after the logits) are stored for the backward pass and each gets a zeroed gradient
/// buffer; here the backward pass recomputes the probabilities per head instead.
struct CausalAttention;

/// `dst (m×n, rows of n) [+]= a·b`, with `a` (m×k) and `b` (k×n) given by row and column strides.
#[allow(clippy::too_many_arguments)]
unsafe fn small_matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
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
        dst.as_mut_ptr(),
        1,
        n as isize,
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
        let max = row[..=i]
            .iter()
            .fold(T::neg_infinity(), |m, &v| Float::max(m, v));
        let mut sum = T::zero();
        for v in row[..=i].iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = T::one() / sum;
        row[..=i].iter_mut().for_each(|v| *v *= inv);
        row[i + 1..].iter_mut().for_each(|v| *v = T::zero());
    }
}

struct AttentionDims {
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
}

fn attention_dims(ql: &Layout, kl: &Layout) -> Result<AttentionDims> {
    let (q, k) = (ql.dims(), kl.dims());
    if q.len() != 4 || k.len() != 4 || q[0] != k[0] || q[2] != k[2] || q[3] != k[3] {
        return Err(Error::Msg(format!(
            "causal_attention: q {q:?} and k/v {k:?} do not fit"
        )));
    }
    if k[1] == 0 || q[1] % k[1] != 0 {
        return Err(Error::Msg(format!(
            "causal_attention: {} query heads do not group over {} key/value heads",
            q[1], k[1]
        )));
    }
    Ok(AttentionDims {
        heads: q[1],
        kv_heads: k[1],
        t: q[2],
        d: q[3],
    })
}

/// Scores of query head block `qh` against key block `kh` (both `t × d`), softmaxed, into `p`.
fn head_probs<T: Real>(qh: &[T], kh: &[T], p: &mut [T], t: usize, d: usize) {
    // SAFETY: qh and kh hold t·d values, p holds t·t.
    unsafe {
        small_matmul(
            (t, t, d),
            p,
            false,
            qh.as_ptr(),
            (d, 1),
            kh.as_ptr(),
            (1, d),
        )
    };
    causal_softmax_rows(p, t);
}

fn attention_fwd<T: Real>(
    qs: &CpuStorage,
    ql: &Layout,
    ks: &CpuStorage,
    kl: &Layout,
    vs: &CpuStorage,
    vl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (q, k, v) = (
        data::<T>(qs, ql, "causal_attention")?,
        data::<T>(ks, kl, "causal_attention")?,
        data::<T>(vs, vl, "causal_attention")?,
    );
    let AttentionDims {
        heads,
        kv_heads,
        t,
        d,
    } = attention_dims(ql, kl)?;
    let rep = heads / kv_heads;
    let mut out = vec![T::zero(); q.len()];
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
        let kv = (bh / heads * kv_heads + bh % heads / rep) * t * d;
        let mut p = vec![T::zero(); t * t];
        head_probs(
            &q[bh * t * d..(bh + 1) * t * d],
            &k[kv..kv + t * d],
            &mut p,
            t,
            d,
        );
        // SAFETY: p is t×t, v's block t×d, o t×d.
        unsafe {
            small_matmul(
                (t, d, t),
                o,
                false,
                p.as_ptr(),
                (t, 1),
                v[kv..].as_ptr(),
                (d, 1),
            )
        };
    });
    Ok((T::to_cpu_storage_owned(out), ql.shape().clone()))
}

/// Gradients of q, k and v (selected by `which`: 0, 1, 2) given dO.
#[allow(clippy::too_many_arguments)]
fn attention_bwd<T: Real>(
    (qs, ql): (&CpuStorage, &Layout),
    (ks, kl): (&CpuStorage, &Layout),
    (vs, vl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (q, k, v, dout) = (
        data::<T>(qs, ql, "causal_attention_backward")?,
        data::<T>(ks, kl, "causal_attention_backward")?,
        data::<T>(vs, vl, "causal_attention_backward")?,
        data::<T>(gs, gl, "causal_attention_backward")?,
    );
    let AttentionDims {
        heads,
        kv_heads,
        t,
        d,
    } = attention_dims(ql, kl)?;
    let rep = heads / kv_heads;
    let (mut dq, mut dk, mut dv) = (
        vec![T::zero(); q.len()],
        vec![T::zero(); k.len()],
        vec![T::zero(); v.len()],
    );
    // One task per key/value head: it owns that head's dK and dV and its query heads' dQ.
    dq.par_chunks_mut(rep * t * d)
        .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
        .enumerate()
        .for_each(|(bg, (dq_group, (dkh, dvh)))| {
            let kv = bg * t * d;
            let (kh, vh) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
            let mut p = vec![T::zero(); t * t];
            let mut dp = vec![T::zero(); t * t];
            for (r, dqh) in dq_group.chunks_mut(t * d).enumerate() {
                let at = (bg * rep + r) * t * d;
                let (qh, doh) = (&q[at..at + t * d], &dout[at..at + t * d]);
                head_probs(qh, kh, &mut p, t, d);
                // SAFETY (all products): every block is t×d or t×t as the strides say.
                unsafe {
                    // dV += Pᵀ·dO
                    small_matmul(
                        (t, d, t),
                        dvh,
                        true,
                        p.as_ptr(),
                        (1, t),
                        doh.as_ptr(),
                        (d, 1),
                    );
                    // dP = dO·Vᵀ
                    small_matmul(
                        (t, t, d),
                        &mut dp,
                        false,
                        doh.as_ptr(),
                        (d, 1),
                        vh.as_ptr(),
                        (1, d),
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
                    // dQ = dS·K, dK += dSᵀ·Q
                    small_matmul(
                        (t, d, t),
                        dqh,
                        false,
                        dp.as_ptr(),
                        (t, 1),
                        kh.as_ptr(),
                        (d, 1),
                    );
                    small_matmul(
                        (t, d, t),
                        dkh,
                        true,
                        dp.as_ptr(),
                        (1, t),
                        qh.as_ptr(),
                        (d, 1),
                    );
                }
            }
        });
    Ok((dq, dk, dv))
}

/// The backward pass as an op of (q, k, v) holding dO: returns `[3, max(|q|, |k|)]` with dQ, dK
/// and dV in its rows (zero-padded).
struct CausalAttentionBackwardAll {
    dout: Tensor,
}

fn attention_grads_packed<T: Real>(
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
    dout: &Tensor,
) -> Result<(CpuStorage, Shape)> {
    let (gs, gl) = dout.storage_and_layout();
    let candle_core::Storage::Cpu(gs) = &*gs else {
        return Err(Error::Msg("causal_attention: dO is not on the CPU".into()));
    };
    let (dq, dk, dv) = attention_bwd::<T>(q, k, v, (gs, gl))?;
    let n = dq.len().max(dk.len());
    let mut packed = vec![T::zero(); 3 * n];
    packed[..dq.len()].copy_from_slice(&dq);
    packed[n..n + dk.len()].copy_from_slice(&dk);
    packed[2 * n..2 * n + dv.len()].copy_from_slice(&dv);
    Ok((T::to_cpu_storage_owned(packed), Shape::from((3, n))))
}

impl CustomOp3 for CausalAttentionBackwardAll {
    fn name(&self) -> &'static str {
        "causal_attention_backward"
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
            attention_grads_packed((s1, l1), (s2, l2), (s3, l3), &self.dout)
        )
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal_attention"
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
            attention_fwd(s1, l1, s2, l2, s3, l3)
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
        let dout = dout.contiguous()?;
        // dQ, dK and dV come out of one pass; candle's ops return one tensor each, so the pass
        // is packed into a tensor [3, n] with n the largest and split here.
        let grads = q.apply_op3_no_bwd(k, v, &CausalAttentionBackwardAll { dout })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let flat = |i: usize, n: usize, like: &Tensor| -> Result<Tensor> {
            grads.get(i)?.narrow(0, 0, n)?.reshape(like.shape())
        };
        Ok((
            Some(flat(0, nq, q)?),
            Some(flat(1, nk, k)?),
            Some(flat(2, nk, v)?),
        ))
    }
}

/// Causal self-attention of q `[B, H, T, D]` (scaled) over k, v `[B, KVH, T, D]`; the output is
/// `[B, H, T, D]`. Fused on the CPU, composed elsewhere.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused_ok(q) {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention)
    } else {
        causal_attention_composed(q, k, v)
    }
}

pub fn causal_attention_composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let qg = q.reshape((b, kvh, (h / kvh) * t, d))?;
    // Grouped heads stacked along time: row r·t + i of a group is query i of head r.
    let scores = qg.matmul(&k.t()?)?.reshape((b, h, t, t))?;
    let probs = causal_softmax_composed(&scores)?;
    probs
        .reshape((b, kvh, (h / kvh) * t, t))?
        .matmul(v)?
        .reshape((b, h, t, d))
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

    #[test]
    fn causal_attention_matches_composed_with_grouped_heads() {
        for (h, kvh) in [(2, 2), (4, 2), (3, 1)] {
            let q = randn(&[2, h, 6, 4], 10);
            let k = randn(&[2, kvh, 6, 4], 11);
            let v = randn(&[2, kvh, 6, 4], 12);
            agree(
                &[&q, &k, &v],
                || causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap(),
                || causal_attention_composed(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap(),
            );
        }
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
