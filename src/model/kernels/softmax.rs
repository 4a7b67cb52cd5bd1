//! Causal softmax (the cached and padded attention path).

use super::*;

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
            wide! {
                let visible = (r % t) + (n - t) + 1;
                let max = row_max(&xr[..visible]);
                let sum = exp_into(&xr[..visible], max, yr);
                let inv = T::one() / sum;
                yr[..visible].iter_mut().for_each(|v| *v *= inv);
            }
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
            wide! {
                let dot = yr.iter().zip(gr).fold(T::zero(), |a, (&p, &q)| a + p * q);
                for j in 0..n {
                    d[j] = yr[j] * (gr[j] - dot);
                }
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
