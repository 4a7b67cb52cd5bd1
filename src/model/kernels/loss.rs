//! Cross-entropy, and the output head fused with it.

use super::*;

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
            Ok(wide! {
                let max = row_max(row);
                exp_sum(row, max).ln() + max - row[t]
            })
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
            wide! {
                let max = row_max(row);
                let scale = g[i] / exp_into(row, max, dr);
                dr.iter_mut().for_each(|d| *d *= scale);
                let t = targets[i] as usize;
                dr[t] -= g[i];
            }
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

/// The output projection and cross-entropy as one node: hidden `[N, C]`, head weight `[V, C]` and
/// u32 targets `[N]` give each row's negative log-likelihood `[N]`. Separately, the logits
/// (`N·V`, 64 MB in the benchmark step) were a node of their own: cross-entropy's backward
/// allocated their gradient zeroed, candle allocated another zeroed one to add it into, and
/// the projection's backward read it again. Here the backward pass turns the logits the forward
/// pass kept into their gradient in place and multiplies straight from it.
struct HeadNll {
    /// The forward pass's logits, taken by the backward pass (recomputed if already taken).
    logits: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Soft-capping: the logits are `cap · tanh(logits / cap)` (Gemma's, and a speedrun switch).
    cap: Option<f64>,
}

/// `cap · tanh(x / cap)` over a row in place, tanh from the vectorising exponential.
#[inline(always)]
fn soft_cap<T: Real>(row: &mut [T], cap: T) {
    let two = T::one() + T::one();
    for x in row.iter_mut() {
        let e = (two * *x / cap).fast_exp();
        *x = cap * (T::one() - two / (e + T::one()));
    }
}

/// The logits of hidden rows against the head, soft-capped when the op says so.
fn capped_logits<T: Real>(
    op: &HeadNll,
    hs: &CpuStorage,
    hl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    v: usize,
) -> Result<Vec<T>> {
    let mut logits = times_transposed::<T>(hs, hl, ws, wl)?;
    if let Some(cap) = op.cap {
        let cap = T::from(cap).expect("a float");
        logits
            .par_chunks_mut(v)
            .for_each(|row| wide! { soft_cap(row, cap) });
    }
    Ok(logits)
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
    let logits = capped_logits::<T>(op, hs, hl, ws, wl, v)?;
    let nll: Vec<T> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            wide! {
                let max = row_max(row);
                exp_sum(row, max).ln() + max - row[t as usize]
            }
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
        None => capped_logits::<T>(op, hs, hl, ws, wl, v)?,
    };
    // dlogits = g · (softmax(logits) − onehot(target)), row by row in place.
    let cap = op.cap.map(|c| T::from(c).expect("a float"));
    d.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        wide! {
            let max = row_max(row);
            let t = targets[i] as usize;
            match cap {
                None => {
                    row.iter_mut().for_each(|x| *x = (*x - max).fast_exp());
                    let scale = g[i] / row_sum(row);
                    row.iter_mut().for_each(|x| *x *= scale);
                    row[t] -= g[i];
                }
                // The row holds capped logits z; through the cap, dz/dx = 1 − (z / cap)².
                Some(cap) => {
                    let scale = g[i] / exp_sum(row, max);
                    let slope = |z: T| T::one() - (z / cap) * (z / cap);
                    let target_slope = slope(row[t]);
                    row.iter_mut()
                        .for_each(|x| *x = (*x - max).fast_exp() * scale * slope(*x));
                    row[t] -= g[i] * target_slope;
                }
            }
        }
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
/// `hidden · headᵀ` (hidden `[.., C]` with N rows, head `[V, C]`), soft-capped at `cap` when
/// given, without a logits node on the CPU.
pub fn head_nll(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    cap: Option<f64>,
) -> Result<Tensor> {
    if fused_ok(hidden) && hidden.dtype() == head.dtype() {
        let op = HeadNll {
            logits: std::sync::Mutex::new(None),
            cap,
        };
        hidden.contiguous()?.apply_op3(
            &head.contiguous()?,
            &targets.to_dtype(DType::U32)?.flatten_all()?.contiguous()?,
            op,
        )
    } else {
        head_nll_composed(hidden, head, targets, cap)
    }
}

pub fn head_nll_composed(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    cap: Option<f64>,
) -> Result<Tensor> {
    let c = hidden.dim(D::Minus1)?;
    let logits = linear_composed(&hidden.reshape(((), c))?, head)?;
    token_nll_composed(&soft_cap_composed(logits, cap)?, &targets.flatten_all()?)
}

/// `cap · tanh(logits / cap)` from differentiable candle ops, or the logits when uncapped.
pub fn soft_cap_composed(logits: Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(cap) => (logits / cap)?.tanh()? * cap,
        None => Ok(logits),
    }
}

// ---------------------------------------------------------------- causal attention
