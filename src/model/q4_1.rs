//! Q4_1 matrix multiplication for GGUF weights. candle multiplies Q4_1 blocks with its portable
//! scalar loop (`vec_dot_unopt`), which was 80% of SmolLM2's decode time; this AVX2 kernel does
//! the same arithmetic as ggml (activations quantized to Q8_1 per 32-value block, integer dot
//! products, one scale and one offset per block), and rows run in parallel.

use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

/// A Q4_1 weight matrix `[rows, cols]` in ggml's block layout.
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// One block of activations quantized to 8 bits: `x ≈ d·q`, with `s = d·Σq` for the offset term.
struct Q8Block {
    d: f32,
    s: f32,
    q: [i8; BLOCK],
}

fn quantize_row(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(BLOCK)
        .map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; BLOCK];
            let mut sum = 0i32;
            for (qi, &v) in q.iter_mut().zip(b) {
                *qi = (v * inv).round() as i8;
                sum += *qi as i32;
            }
            Q8Block {
                d,
                s: d * sum as f32,
                q,
            }
        })
        .collect()
}

#[inline(always)]
fn block_scales(b: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        f16::from_le_bytes([b[2], b[3]]).to_f32(),
    )
}

fn dot_portable(row: &[u8], x: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (b, q8) in row.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, m) = block_scales(b);
        let mut isum = 0i32;
        for j in 0..16 {
            let byte = b[4 + j];
            isum +=
                (byte & 0x0F) as i32 * q8.q[j] as i32 + (byte >> 4) as i32 * q8.q[j + 16] as i32;
        }
        acc += d * q8.d * isum as f32 + m * q8.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(row: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut offset = 0f32;
    for (b, q8) in row.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, m) = block_scales(b);
        // Low nibbles are values 0..16, high nibbles 16..32: the order of the Q8 block.
        let packed = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let q4 = _mm256_and_si256(both, mask);
        let q8v = _mm256_loadu_si256(q8.q.as_ptr() as *const __m256i);
        // u8 × i8 pairs summed to i16 (at most 2·15·127), then pairs of those to i32.
        let pairs = _mm256_maddubs_epi16(q4, q8v);
        let sums = _mm256_madd_epi16(pairs, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * q8.d), _mm256_cvtepi32_ps(sums), acc);
        offset += m * q8.s;
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + offset
}

fn dot(row: &[u8], x: &[Q8Block]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { dot_avx2(row, x) };
    }
    dot_portable(row, x)
}

impl Q41Matrix {
    /// Wraps raw Q4_1 blocks (`rows × cols/32` of them, row after row).
    pub fn new(rows: usize, cols: usize, data: Vec<u8>) -> Result<Q41Matrix> {
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * cols / BLOCK * BLOCK_BYTES {
            candle_core::bail!(
                "Q4_1 data of {} bytes does not fit {rows}×{cols}",
                data.len()
            );
        }
        Ok(Q41Matrix { rows, cols, data })
    }

    /// The weights as an f32 matrix `[rows, cols]` (for export and fine-tuning).
    pub fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in self.data.chunks_exact(BLOCK_BYTES) {
            let (d, m) = block_scales(b);
            let nibbles = &b[4..];
            out.extend(nibbles.iter().map(|q| d * (q & 0x0F) as f32 + m));
            out.extend(nibbles.iter().map(|q| d * (q >> 4) as f32 + m));
        }
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.cols {
            candle_core::bail!("input has {cols} features, the Q4_1 matrix {}", self.cols);
        }
        let n = x.elem_count() / cols;
        let flat: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let quantized: Vec<Vec<Q8Block>> = flat.chunks_exact(cols).map(quantize_row).collect();
        let row_bytes = self.cols / BLOCK * BLOCK_BYTES;
        // Output rows (of W) in parallel; each reads its weights once for all tokens.
        let mut out_t = vec![0f32; self.rows * n];
        let work = |(chunk, out): (usize, &mut [f32])| {
            for (k, o) in out.chunks_mut(n).enumerate() {
                let r = chunk * 64 + k;
                let w = &self.data[r * row_bytes..(r + 1) * row_bytes];
                for (t, q) in quantized.iter().enumerate() {
                    o[t] = dot(w, q);
                }
            }
        };
        out_t.par_chunks_mut(n * 64).enumerate().for_each(work);
        let mut shape = dims;
        *shape.last_mut().expect("non-empty shape") = self.rows;
        Tensor::from_vec(out_t, (self.rows, n), x.device())?
            .t()?
            .contiguous()?
            .reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module};

    #[test]
    fn matches_candles_q4_1_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 128), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let raw = q.data().unwrap().to_vec();
        let ours = Q41Matrix::new(96, 128, raw).unwrap();
        let q_again = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let reference = QMatMul::from_qtensor(q).unwrap();
        for n in [1usize, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
            let values = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let a = values(ours.forward(&x).unwrap());
            let b = values(reference.forward(&x).unwrap());
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 2e-3 * scale.max(1.0), "{x} vs {y}");
            }
            // And both stay close to the unquantized product.
            let exact: Vec<f32> = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = a
                .iter()
                .zip(&exact)
                .map(|(p, e)| (p - e).abs())
                .fold(0f32, f32::max);
            assert!(err < 0.2 * scale, "quantization error {err} of {scale}");
        }
        let ours_dense = ours.dequantize(&dev).unwrap().flatten_all().unwrap();
        let candle_dense = q_again.dequantize(&dev).unwrap().flatten_all().unwrap();
        assert_eq!(
            ours_dense.to_vec1::<f32>().unwrap(),
            candle_dense.to_vec1::<f32>().unwrap()
        );
        let x = Tensor::randn(0f32, 1.0, (2, 128), &dev).unwrap();
        let row = quantize_row(&x.get(0).unwrap().to_vec1::<f32>().unwrap());
        let raw = &ours.data[..128 / BLOCK * BLOCK_BYTES];
        let p = dot_portable(raw, &row);
        assert!((dot(raw, &row) - p).abs() <= 1e-3 * p.abs().max(1.0));
    }
}
