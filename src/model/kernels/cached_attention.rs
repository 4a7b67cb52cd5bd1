//! Attention for inference over a KV cache, one query at a time.
//!
//! Each query's output is computed alone, in an order fixed by its visible keys: scores as
//! eight-lane dot products, the softmax's sum counted from the first visible key, the values
//! summed key by key. So a token's attention gives the same bits whether it is decoded alone,
//! prefilled with its prompt, scored with a whole sequence, or batched beside rows with other
//! padding. A matmul gives no such promise: candle's chose another summation from 17 queries on,
//! and with 8-bit activations (quantized models) that noise moved single log-probabilities by up
//! to 0.9 nats between decoding and scoring. No backward pass: training uses
//! [`super::rope_attention`].

use super::*;

/// Queries `[B, H, T, D]` (rotated and scaled), keys and values `[B, KVH, S, D]`; query `i` of row
/// `b` sees keys `visible[b·T + i]` (a range of the S positions).
struct CachedAttention {
    heads: usize,
    kv_heads: usize,
    visible: Vec<std::ops::Range<usize>>,
}

/// `q · k` in eight lanes, folded in a fixed order.
#[inline(always)]
fn dot<T: Real>(q: &[T], k: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let tail: T = qc
        .remainder()
        .iter()
        .zip(kc.remainder())
        .fold(T::zero(), |a, (&x, &y)| a + x * y);
    for (a, b) in qc.zip(kc) {
        for i in 0..LANES {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().fold(tail, |a, &v| a + v)
}

/// Values summed into the output this many at a time, so that their sums stay in registers.
const OUT_CHUNK: usize = 32;

/// One query's attention: `query` against keys `range` of the head at `k[kv..]` and `v[kv..]`
/// (rows of `d`), into `o`; `scores` is scratch of at least `range.len()`.
#[inline(always)]
fn one_query<T: Real>(
    query: &[T],
    (k, v, kv, d): (&[T], &[T], usize, usize),
    range: std::ops::Range<usize>,
    scores: &mut [T],
    o: &mut [T],
) {
    let scores = &mut scores[..range.len()];
    for (sc, j) in scores.iter_mut().zip(range.clone()) {
        *sc = dot(query, &k[kv + j * d..][..d]);
    }
    let max = scores
        .iter()
        .fold(T::neg_infinity(), |m, &x| Float::max(m, x));
    for sc in scores.iter_mut() {
        *sc = (*sc - max).fast_exp();
    }
    let inv = T::one() / row_sum(scores);
    for sc in scores.iter_mut() {
        *sc *= inv;
    }
    // o[c] = Σ_j p_j·v_j[c], key by key, a chunk of the output at a time.
    for (c0, oc) in (0..d).step_by(OUT_CHUNK).zip(o.chunks_mut(OUT_CHUNK)) {
        let mut acc = [T::zero(); OUT_CHUNK];
        let acc = &mut acc[..oc.len()];
        for (&p, j) in scores.iter().zip(range.clone()) {
            let vj = &v[kv + j * d + c0..][..acc.len()];
            for (a, &x) in acc.iter_mut().zip(vj) {
                *a += p * x;
            }
        }
        oc.copy_from_slice(acc);
    }
}

/// [`one_query`] compiled for AVX2 (the crate's baseline is SSE2). The same operations in the
/// same order, only wider: no multiply and add is fused, so the bits are those of the baseline.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn one_query_avx2<T: Real>(
    query: &[T],
    head: (&[T], &[T], usize, usize),
    range: std::ops::Range<usize>,
    scores: &mut [T],
    o: &mut [T],
) {
    one_query(query, head, range, scores, o)
}

impl CachedAttention {
    fn forward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Vec<T> {
        let (b, t, s, d) = dims;
        let (h, kvh) = (self.heads, self.kv_heads);
        let rep = h / kvh;
        let mut out = vec![T::zero(); b * t * h * d];
        let dst = SharedOut(out.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2");
        (0..b * h * t).into_par_iter().for_each_init(
            || vec![T::zero(); s],
            |scores, task| {
                let (bh, i) = (task / t, task % t);
                let (bi, head) = (bh / h, bh % h);
                let kv = (bi * kvh + head / rep) * s * d;
                let query = &q[(bh * t + i) * d..][..d];
                let range = self.visible[bi * t + i].clone();
                // SAFETY: task (bi, head, i) alone writes this d-wide slice of the output.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.at(((bi * t + i) * h + head) * d), d)
                };
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 (checked above).
                    return unsafe { one_query_avx2(query, (k, v, kv, d), range, scores, o) };
                }
                one_query(query, (k, v, kv, d), range, scores, o)
            },
        );
        out
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached_attention"
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
            op: &CachedAttention,
            args: [(&CpuStorage, &Layout); 3],
        ) -> Result<(CpuStorage, Shape)> {
            let (qd, kd) = (args[0].1.dims(), args[1].1.dims());
            let (b, h, t, d) = (qd[0], qd[1], qd[2], qd[3]);
            let s = kd[2];
            let q = data::<T>(args[0].0, args[0].1, "cached_attention")?;
            let k = data::<T>(args[1].0, args[1].1, "cached_attention")?;
            let v = data::<T>(args[2].0, args[2].1, "cached_attention")?;
            Ok((
                T::to_cpu_storage_owned(op.forward(q, k, v, (b, t, s, d))),
                Shape::from((b, t, h * d)),
            ))
        }
        dispatch!(
            s1.dtype(),
            self.name(),
            run(self, [(s1, l1), (s2, l2), (s3, l3)])
        )
    }
}

/// Attention of queries `[B, H, T, D]` (rotated and scaled) over keys and values
/// `[B, KVH, S, D]`, query `i` of row `b` seeing the key positions `visible[b·T + i]`; the output
/// is `[B, T, H·D]`, ready for the output projection. CPU only; for inference (no backward).
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: Vec<std::ops::Range<usize>>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kvh, s, kd) = k.dims4()?;
    let ok = kb == b
        && kd == d
        && v.dims() == k.dims()
        && kvh > 0
        && h % kvh == 0
        && visible.len() == b * t
        && visible.iter().all(|r| r.start < r.end && r.end <= s);
    if !ok {
        return Err(Error::Msg(format!(
            "cached_attention: q {:?}, k {:?}, v {:?} and {} visible ranges do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            visible.len()
        )));
    }
    let op = CachedAttention {
        heads: h,
        kv_heads: kvh,
        visible,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// softmax(q·kᵀ over the visible keys)·v, composed from candle ops.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, visible: &[std::ops::Range<usize>]) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kvh, s, _) = k.dims4().unwrap();
        let mask: Vec<f32> = (0..b * t)
            .flat_map(|r| {
                let range = visible[r].clone();
                (0..s).map(move |j| {
                    if range.contains(&j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap();
        let rep = h / kvh;
        // Each key/value head repeated for the query heads that share it.
        let per_query_head = |x: &Tensor| {
            let x = x.unsqueeze(2).unwrap().repeat((1, 1, rep, 1, 1)).unwrap();
            x.reshape((b, h, s, d)).unwrap()
        };
        let (k, v) = (per_query_head(k), per_query_head(v));
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Two rows (the second left-padded by 3), 6 queries after 4 cached positions, a window of 5,
    /// 4 query heads on 2 key/value heads: the kernel gives the composed attention, and each
    /// query's output is the same bits when it is computed alone, with the padding removed.
    #[test]
    fn matches_composed_attention_and_does_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        let (b, h, kvh, t, s, d) = (2, 4, 2, 6, 10, 16);
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, kvh, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kvh, s, d), &dev).unwrap();
        let (pad, window, offset) = ([0usize, 3], 5usize, s - t);
        let visible: Vec<_> = (0..b * t)
            .map(|r| {
                let query = offset + r % t;
                let first = pad[r / t].max(query + 1 - window.min(query + 1));
                first..query + 1
            })
            .collect();
        let ours = cached_attention(&q, &k, &v, visible.clone()).unwrap();
        let reference = composed(&q, &k, &v, &visible);
        let diff = values(&(ours.clone() - reference).unwrap())
            .into_iter()
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!(diff < 1e-5, "{diff}");
        let ours = values(&ours);
        // Row 1, query 4 alone: the cache without row 1's padding, and no other row.
        let (row, i) = (1, 4);
        let query = offset + i;
        let k1 = k
            .narrow(0, row, 1)
            .unwrap()
            .narrow(2, pad[row], s - pad[row])
            .unwrap();
        let v1 = v
            .narrow(0, row, 1)
            .unwrap()
            .narrow(2, pad[row], s - pad[row])
            .unwrap();
        let q1 = q.narrow(0, row, 1).unwrap().narrow(2, i, 1).unwrap();
        let range = visible[row * t + i].start - pad[row]..query + 1 - pad[row];
        let alone = values(&cached_attention(&q1, &k1, &v1, vec![range]).unwrap());
        let at = (row * t + i) * h * d;
        assert_eq!(alone, ours[at..at + h * d]);
    }

    /// The AVX2 build of one query's attention gives the baseline build's bits (d = 80: whole
    /// and partial output chunks).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_build_gives_the_same_bits() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let d = 80;
        let rand =
            |n: usize| -> Vec<f32> { values(&Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap()) };
        let (q, k, v) = (rand(d), rand(40 * d), rand(40 * d));
        let (mut s1, mut s2) = (vec![0f32; 40], vec![0f32; 40]);
        let (mut o1, mut o2) = (vec![0f32; d], vec![0f32; d]);
        one_query(&q, (&k, &v, 0, d), 3..37, &mut s1, &mut o1);
        // SAFETY: checked above.
        unsafe { one_query_avx2(&q, (&k, &v, 0, d), 3..37, &mut s2, &mut o2) };
        assert_eq!(o1, o2);
        assert!(o1.iter().any(|&x| x != 0.0));
    }

    /// One query's visible range.
    fn one(range: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
        std::iter::once(range).collect()
    }

    #[test]
    fn refuses_ranges_outside_the_cache() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 3, 8), DType::F32, &dev).unwrap();
        assert!(cached_attention(&q, &k, &k, one(0..4)).is_err());
        assert!(cached_attention(&q, &k, &k, one(2..2)).is_err());
        assert!(cached_attention(&q, &k, &k, one(0..3)).is_ok());
    }
}
