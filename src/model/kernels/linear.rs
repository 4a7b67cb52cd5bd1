//! Dense projections `x·Wᵀ` as one node calling gemm directly.

use super::*;

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
pub(super) fn matmul_new<T: Real>(
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
    let strided = |data, rows, cols, (rs, cs)| crate::model::bf16::Strided {
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
pub(super) fn linear_dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
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
pub(super) fn times_transposed<T: Real>(
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
