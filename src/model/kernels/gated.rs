//! The gated MLP activations: SwiGLU (Llama) and squared ReLU (the speedruns' ReLU²).

use super::*;

/// The function applied to the gate before it multiplies the up projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// silu(x) = x·sigmoid(x): SwiGLU.
    Silu,
    /// relu(x)²: cheaper than SiLU and, in modded-nanogpt's runs, learns faster per step.
    Relu2,
}

/// gate_fn(gate) · up.
struct Gated {
    gate: Gate,
}
/// (gate, up, dy) -> d gate or d up.
struct GatedBackward {
    gate: Gate,
    wrt_gate: bool,
}

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).fast_exp())
}

/// gate_fn(x) and its derivative.
#[inline(always)]
fn gate_and_slope<T: Real>(gate: Gate, x: T) -> (T, T) {
    match gate {
        Gate::Silu => {
            let s = sigmoid(x);
            // d/dx [x·s(x)] = s(x)·(1 + x·(1 − s(x)))
            (x * s, s * (T::one() + x * (T::one() - s)))
        }
        Gate::Relu2 => {
            let r = if x > T::zero() { x } else { T::zero() };
            (r * r, (r + r))
        }
    }
}

fn gated_fwd<T: Real>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
    gate: Gate,
) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(gs, gl, "gated")?;
    let u = data::<T>(us, ul, "gated")?;
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(yc, (gc, uc))| {
            wide! {
                for i in 0..yc.len() {
                    yc[i] = gate_and_slope(gate, gc[i]).0 * uc[i];
                }
            }
        });
    Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
}

#[allow(clippy::too_many_arguments)]
fn gated_bwd<T: Real>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
    gate: Gate,
    wrt_gate: bool,
) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(gs, gl, "gated_backward")?;
    let u = data::<T>(us, ul, "gated_backward")?;
    let dy = data::<T>(ds, dl, "gated_backward")?;
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(4096).enumerate().for_each(|(c, oc)| {
        wide! {
            let base = c * 4096;
            for (i, o) in oc.iter_mut().enumerate() {
                let (x, up, d) = (g[base + i], u[base + i], dy[base + i]);
                let (y, slope) = gate_and_slope(gate, x);
                *o = if wrt_gate { d * up * slope } else { d * y };
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
}

impl CustomOp2 for Gated {
    op2_forward!("gated", gated_fwd, gate);
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let backward = |wrt_gate| GatedBackward {
            gate: self.gate,
            wrt_gate,
        };
        let dg = gate.apply_op3_no_bwd(up, &dy, &backward(true))?;
        let du = gate.apply_op3_no_bwd(up, &dy, &backward(false))?;
        Ok((Some(dg), Some(du)))
    }
}

forward_only_op3!(GatedBackward, "gated_backward", gated_bwd, gate, wrt_gate);

/// gate_fn(gate) · up.
pub fn gated(gate: &Tensor, up: &Tensor, gate_fn: Gate) -> Result<Tensor> {
    if fused_ok(gate) {
        gate.contiguous()?
            .apply_op2(&up.contiguous()?, Gated { gate: gate_fn })
    } else {
        gated_composed(gate, up, gate_fn)
    }
}

pub fn gated_composed(gate: &Tensor, up: &Tensor, gate_fn: Gate) -> Result<Tensor> {
    let g = match gate_fn {
        Gate::Silu => candle_nn::ops::silu(gate)?,
        Gate::Relu2 => gate.relu()?.sqr()?,
    };
    g * up
}

/// silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gated(gate, up, Gate::Silu)
}
