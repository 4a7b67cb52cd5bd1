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
//!
//! Speed comes without changing that arithmetic: the AVX2 build computes eight keys' scores at
//! once and keeps the output's sums in registers, and a task takes 16 queries of one head and
//! reads keys and values a tile at a time for all of them (a query alone was bound by the L2
//! cache's bandwidth).

use super::*;

/// Queries `[B, H, T, D]` (rotated and scaled), keys and values `[B, KVH, S, D]`; query `i` of row
/// `b` sees keys `visible[b·T + i]` (a range of the S positions).
struct CachedAttention {
    heads: usize,
    kv_heads: usize,
    visible: Vec<std::ops::Range<usize>>,
}

/// Queries of one head a task computes together, so that they share each key's reads.
const QUERY_BLOCK: usize = 16;

/// Values summed into the output this many at a time, so that their sums stay in registers.
const OUT_CHUNK: usize = 32;

/// A query's softmax over its scores, in place.
#[inline(always)]
fn softmax_in_place<T: Real>(scores: &mut [T]) {
    let max = row_max(scores);
    for sc in scores.iter_mut() {
        *sc = (*sc - max).fast_exp();
    }
    let inv = T::one() / row_sum(scores);
    for sc in scores.iter_mut() {
        *sc *= inv;
    }
}

/// One query's attention: `query` against keys `range` of the head at `k[kv..]` and `v[kv..]`
/// (rows of `d`), into `o`; `scores` is scratch of at least `range.len()`. This build defines
/// the arithmetic; [`avx2::one_query`] does the same operations in the same order.
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
        *sc = row_dot(query, &k[kv + j * d..][..d]);
    }
    softmax_in_place(scores);
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

/// [`one_query`] in AVX2 intrinsics for f32: the same multiplies and adds in the same order (none
/// fused), so the same bits, with the sums held in registers. The compiler alone kept the output's
/// sums on the stack and folded each score's lanes one by one; a 2,000-token prompt spent 56% of
/// its prefill there.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `k[j·d..]` for key j, checked against the slice once per key.
    #[inline(always)]
    fn key(k: &[f32], j: usize, d: usize) -> *const f32 {
        k[j * d..][..d].as_ptr()
    }

    /// Rows become columns: `out[i]` holds lane i of `rows[0..8]`.
    #[inline(always)]
    unsafe fn transpose(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// `scores[n] = row_dot(q, key range.start + n)`, eight keys at a time: each key's lane sums
    /// are built as `row_dot` builds them, then transposed, so that one vector add folds lane i
    /// of eight keys, in `row_dot`'s order.
    #[inline(always)]
    unsafe fn key_scores(q: &[f32], k: &[f32], d: usize, range: Range<usize>, scores: &mut [f32]) {
        let whole = d / 8 * 8;
        let mut blocks = scores.chunks_exact_mut(8);
        let mut j = range.start;
        for block in &mut blocks {
            let keys: [*const f32; 8] = std::array::from_fn(|n| key(k, j + n, d));
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..whole).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for n in 0..8 {
                    let kv = _mm256_loadu_ps(keys[n].add(c));
                    acc[n] = _mm256_add_ps(acc[n], _mm256_mul_ps(qv, kv));
                }
            }
            let tails: [f32; 8] = std::array::from_fn(|n| {
                super::tail_dot(&q[whole..d], &k[(j + n) * d + whole..(j + n + 1) * d])
            });
            let mut sum = _mm256_loadu_ps(tails.as_ptr());
            for lane in transpose(acc) {
                sum = _mm256_add_ps(sum, lane);
            }
            _mm256_storeu_ps(block.as_mut_ptr(), sum);
            j += 8;
        }
        for (sc, j) in blocks.into_remainder().iter_mut().zip(j..) {
            *sc = super::row_dot(q, &k[j * d..][..d]);
        }
    }

    /// `o[c0..c0 + 8R] += Σ_n p[n]·v[start + n][c0..]`, key by key, in R registers.
    #[inline(always)]
    unsafe fn values_chunk<const R: usize>(
        p: &[f32],
        v: &[f32],
        (d, start, c0): (usize, usize, usize),
        o: &mut [f32],
    ) {
        let o = &mut o[c0..c0 + 8 * R];
        let mut acc: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(o.as_ptr().add(8 * r)));
        for (n, &pn) in p.iter().enumerate() {
            let row = key(v, start + n, d).add(c0);
            let pv = _mm256_set1_ps(pn);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, _mm256_loadu_ps(row.add(8 * r))));
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * r), *a);
        }
    }

    /// `o += Σ_n p[n]·v[start + n]`, key by key.
    #[inline(always)]
    unsafe fn add_values(p: &[f32], v: &[f32], (d, start): (usize, usize), o: &mut [f32]) {
        let mut c0 = 0;
        while c0 + 64 <= d {
            values_chunk::<8>(p, v, (d, start, c0), o);
            c0 += 64;
        }
        while c0 + 8 <= d {
            values_chunk::<1>(p, v, (d, start, c0), o);
            c0 += 8;
        }
        for c in c0..d {
            o[c] = p
                .iter()
                .zip(start..)
                .fold(o[c], |a, (&pn, j)| a + pn * v[j * d + c]);
        }
    }

    /// Keys in a tile: about 16 KiB of keys (then of values), which stay in the L1 cache while
    /// every query of a block reads them.
    fn tile_keys(d: usize) -> usize {
        (4096 / d.max(1)).max(8) / 8 * 8
    }

    /// Runs `f(n, keys)` for each query n and the keys of its range in each tile, tile by tile.
    #[inline(always)]
    fn by_tiles(ranges: &[Range<usize>], d: usize, mut f: impl FnMut(usize, Range<usize>)) {
        let first = ranges.iter().map(|r| r.start).min().unwrap_or(0);
        let last = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        for t0 in (first..last).step_by(tile_keys(d)) {
            let t1 = (t0 + tile_keys(d)).min(last);
            for (n, r) in ranges.iter().enumerate() {
                let keys = r.start.max(t0)..r.end.min(t1);
                if !keys.is_empty() {
                    f(n, keys);
                }
            }
        }
    }

    /// [`super::one_query`] for a block of queries of one head (rows of `d` in `queries`, query
    /// n seeing keys `ranges[n]` and writing `outputs[n]`), f32, on a CPU with AVX2. `scores` is
    /// scratch of `ranges.len()` rows that reach past every range. Keys and values are read a
    /// tile at a time for the whole block, from the L1 cache: one query at a time was bound by
    /// the L2 cache's bandwidth. Each output still sums its keys in order; its sums are stored
    /// and reloaded between tiles, which is exact.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn queries(
        queries: &[f32],
        (k, v, kv, d): (&[f32], &[f32], usize, usize),
        ranges: &[Range<usize>],
        scores: &mut [f32],
        outputs: &mut [&mut [f32]],
    ) {
        let (k, v) = (&k[kv..], &v[kv..]);
        let s = scores.len() / ranges.len().max(1);
        by_tiles(ranges, d, |n, keys| {
            let row = &mut scores[n * s..][keys.clone()];
            key_scores(&queries[n * d..][..d], k, d, keys, row);
        });
        for (n, r) in ranges.iter().enumerate() {
            super::softmax_in_place(&mut scores[n * s..][r.clone()]);
            outputs[n][..d].fill(0.0);
        }
        by_tiles(ranges, d, |n, keys| {
            let p = &scores[n * s..][keys.clone()];
            add_values(p, v, (d, keys.start), outputs[n]);
        });
    }
}

/// `x` as f32s when `T` is f32.
fn f32s<T: Real>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32, so the slice's layout is that of [f32].
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { &*(x as *const [T] as *const [f32]) })
}

/// `x` as f32s when `T` is f32.
fn f32s_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32, so the slice's layout is that of [f32].
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { &mut *(x as *mut [T] as *mut [f32]) })
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
        let blocks = t.div_ceil(QUERY_BLOCK);
        (0..b * h * blocks).into_par_iter().for_each_init(
            || vec![T::zero(); QUERY_BLOCK * s],
            |scores, task| {
                let (bh, block) = (task / blocks, task % blocks);
                let (bi, head) = (bh / h, bh % h);
                let kv = (bi * kvh + head / rep) * s * d;
                let positions = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(t);
                let queries = &q[(bh * t + positions.start) * d..(bh * t + positions.end) * d];
                let ranges = &self.visible[bi * t + positions.start..bi * t + positions.end];
                // SAFETY: task (bi, head, block) alone writes these d-wide slices of the output.
                let mut outputs: Vec<&mut [T]> = positions
                    .map(|i| unsafe {
                        std::slice::from_raw_parts_mut(dst.at(((bi * t + i) * h + head) * d), d)
                    })
                    .collect();
                #[cfg(target_arch = "x86_64")]
                if let (true, Some(q), Some(k), Some(v)) = (avx2, f32s(queries), f32s(k), f32s(v)) {
                    let scores = f32s_mut(&mut scores[..ranges.len() * s]).unwrap();
                    let mut outputs: Vec<&mut [f32]> =
                        outputs.iter_mut().filter_map(|o| f32s_mut(o)).collect();
                    // SAFETY: the CPU has AVX2 (checked above).
                    return unsafe {
                        avx2::queries(q, (k, v, kv, d), ranges, scores, &mut outputs)
                    };
                }
                for ((query, range), o) in queries.chunks(d).zip(ranges).zip(outputs) {
                    one_query(query, (k, v, kv, d), range.clone(), scores, o);
                }
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

    /// The AVX2 build gives the baseline's bits for a block of queries: head sizes with whole
    /// and partial output chunks and a remainder past the last eight lanes (68); ranges that
    /// span several tiles, fit in one, start mid-tile and hold fewer than eight keys; a head
    /// that starts inside the cache.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_build_gives_the_same_bits() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let rand =
            |n: usize| -> Vec<f32> { values(&Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap()) };
        let s = 150;
        let ranges = [3..37, 0..5, 1..150, 70..71, 64..129];
        for d in [64, 68, 80, 256] {
            let (q, k, v) = (rand(ranges.len() * d), rand(2 * s * d), rand(2 * s * d));
            for kv in [0, s * d] {
                let mut scores = vec![0f32; ranges.len() * s];
                let mut ours = vec![vec![f32::NAN; d]; ranges.len()];
                let mut outputs: Vec<&mut [f32]> = ours.iter_mut().map(|o| &mut o[..]).collect();
                // SAFETY: checked above.
                unsafe { avx2::queries(&q, (&k, &v, kv, d), &ranges, &mut scores, &mut outputs) };
                for (n, range) in ranges.iter().enumerate() {
                    let mut baseline = vec![0f32; d];
                    let query = &q[n * d..][..d];
                    one_query(
                        query,
                        (&k, &v, kv, d),
                        range.clone(),
                        &mut scores,
                        &mut baseline,
                    );
                    assert_eq!(ours[n], baseline, "d {d}, keys {range:?}");
                    assert!(baseline.iter().any(|&x| x != 0.0));
                }
            }
        }
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
