//! SwiGLU.

use super::*;

/// silu(gate) · up, the Llama MLP's gated activation.
struct SwiGlu;
/// (gate, up, dy) -> d gate or d up.
struct SwiGluBackward {
    wrt_gate: bool,
}

#[inline(always)]
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
            wide! {
                for i in 0..yc.len() {
                    yc[i] = gc[i] * sigmoid(gc[i]) * uc[i];
                }
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
        wide! {
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
