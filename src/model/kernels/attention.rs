//! Rotary embedding, scaling and causal attention over grouped heads as one node.

use super::*;

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
#[inline(always)]
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
    #[inline(always)]
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
    #[inline(always)]
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
    #[inline(always)]
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
            .map(|bg| wide! { self.rotated(k, kvh, (bg / kvh, bg % kvh), (t, d), 1.0) })
            .collect();
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedOut(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|bh| {
            wide! {
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
            }
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
            wide! {
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
                    // dS = P ∘ (dP − Σ_j P·dP), row by row; hidden keys have P = 0, so
                    // row i's sum stops at key i.
                    for (i, (pr, dr)) in p.chunks(t).zip(dp.chunks_mut(t)).enumerate() {
                        let dot = row_dot(&pr[..=i], &dr[..=i]);
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
            }
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
