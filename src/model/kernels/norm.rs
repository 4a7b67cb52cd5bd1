//! RMSNorm.

use super::*;

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

#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let ms = row_dot(row, row) / T::from(row.len()).expect("len");
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
            wide! {
                let r = inv_rms(xr, eps);
                for j in 0..n {
                    yr[j] = xr[j] * r * w[j];
                }
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
            wide! {
                let r = inv_rms(xr, eps);
                // g·w first, so that the mean of g·w·x is an eight-lane dot product.
                for j in 0..n {
                    d[j] = gr[j] * w[j];
                }
                let dot = row_dot(d, xr) / nf;
                let r3 = r * r * r;
                for j in 0..n {
                    d[j] = r * d[j] - xr[j] * r3 * dot;
                }
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
