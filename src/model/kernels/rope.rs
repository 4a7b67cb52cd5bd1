//! Rotary embedding (rotate-half layout).

use super::*;

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
            wide! {
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
