//! Quantized matrix multiplication for GGUF weights in Q4_1 and Q8_0, ggml's arithmetic in AVX2:
//! activations quantized to 8 bits per 32-value block, integer dot products, one scale (and for
//! Q4_1 one offset) per block, output rows in parallel. candle multiplies Q4_1 in a portable
//! scalar loop (80% of SmolLM2's decode time) and converts each block's f16 scale through a
//! function call; here the scales are converted to f32 once, when the model loads.

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// From this many tokens in one product on, the weights are dequantized for an fp32 matmul.
const DENSE_FROM_TOKENS: usize = 32;

/// The block layouts this module multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale, f16 minimum, 16 bytes of nibbles: `w = d·q + m`.
    Q4_1,
    /// f16 scale, 32 signed bytes: `w = d·q`.
    Q8_0,
}

impl BlockFormat {
    /// The format blocks of `dtype` are multiplied in: Q4_0 and Q5_0 as Q8_0, since their
    /// values (-8..7, -16..15) are bytes exactly ([`as_q8_0`]).
    pub fn of(dtype: GgmlDType) -> Option<BlockFormat> {
        match dtype {
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 => Some(BlockFormat::Q8_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    /// Bytes of a block before its quantized values.
    fn header(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 4,
            BlockFormat::Q8_0 => 2,
        }
    }
}

/// Q4_0 or Q5_0 blocks rewritten as Q8_0 blocks with the same scale and values, so that the
/// Q8_0 kernel multiplies them (candle's Q5_0 product is a scalar loop: 69% of Gemma 3 270M's
/// prefill). Other types come back unchanged.
pub fn as_q8_0(dtype: GgmlDType, data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let (block, offset) = match dtype {
        GgmlDType::Q4_0 => (18, 8i16),
        GgmlDType::Q5_0 => (22, 16i16),
        _ => return std::borrow::Cow::Borrowed(data),
    };
    let mut out = Vec::with_capacity(data.len() / block * 34);
    for b in data.chunks_exact(block) {
        out.extend_from_slice(&b[..2]);
        // Q5_0: 32 fifth bits after the scale, then the nibbles; Q4_0: the nibbles.
        let (high, nibbles) = match dtype {
            GgmlDType::Q5_0 => (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]),
            _ => (0, &b[2..18]),
        };
        let value = |j: usize, nibble: u8| {
            let fifth = ((high >> j) & 1) as u8;
            ((nibble | fifth << 4) as i16 - offset) as i8 as u8
        };
        out.extend((0..16).map(|j| value(j, nibbles[j] & 0x0F)));
        out.extend((0..16).map(|j| value(j + 16, nibbles[j] >> 4)));
    }
    std::borrow::Cow::Owned(out)
}

/// A quantized weight matrix `[rows, cols]`: the value bytes of each block (scales stripped) and
/// each block's scale and minimum as f32.
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    values: Vec<u8>,
    scales: Vec<[f32; 2]>,
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

/// Weight value `j` (0..32) of a Q4_1 block's 16 nibble bytes: low nibbles first.
#[inline(always)]
fn nibble(v: &[u8], j: usize) -> u8 {
    if j < 16 {
        v[j] & 0x0F
    } else {
        v[j - 16] >> 4
    }
}

fn dot_portable(format: BlockFormat, values: &[u8], scales: &[[f32; 2]], x: &[Q8Block]) -> f32 {
    let n = values.len() / scales.len().max(1);
    let mut acc = 0f32;
    for ((v, &[d, m]), q8) in values.chunks_exact(n).zip(scales).zip(x) {
        let isum: i32 = (0..BLOCK)
            .map(|j| {
                let w = match format {
                    BlockFormat::Q4_1 => nibble(v, j) as i32,
                    BlockFormat::Q8_0 => v[j] as i8 as i32,
                };
                w * q8.q[j] as i32
            })
            .sum();
        acc += d * q8.d * isum as f32 + m * q8.s;
    }
    acc
}

/// The AVX2 dot product; `$sum(u8s, i8s)` adds up adjacent groups of u8 × i8 products into i32
/// lanes. (A VNNI `vpdpbusd` variant measured no faster: decode is bound by memory, not these
/// instructions.)
macro_rules! block_dot {
    ($name:ident, $features:literal, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            format: BlockFormat,
            values: &[u8],
            scales: &[[f32; 2]],
            x: &[Q8Block],
        ) -> f32 {
            use std::arch::x86_64::*;
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_ps();
            let mut offset = 0f32;
            let n = match format {
                BlockFormat::Q4_1 => 16,
                BlockFormat::Q8_0 => 32,
            };
            for ((v, &[d, m]), q8) in values.chunks_exact(n).zip(scales).zip(x) {
                let q8v = _mm256_loadu_si256(q8.q.as_ptr() as *const __m256i);
                let sums = match format {
                    BlockFormat::Q4_1 => {
                        // Low nibbles are values 0..16, high nibbles 16..32: the Q8 block's order.
                        let packed = _mm_loadu_si128(v.as_ptr() as *const __m128i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                        $sum(_mm256_and_si256(both, mask), q8v)
                    }
                    BlockFormat::Q8_0 => {
                        // One operand must be unsigned: |w| times x carrying w's sign.
                        let w = _mm256_loadu_si256(v.as_ptr() as *const __m256i);
                        $sum(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q8v, w))
                    }
                };
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
    };
}

block_dot!(dot_avx2, "avx2,fma", |u, i| {
    // u8 × i8 pairs summed to i16 (at most 2·127·127, as |w| ≤ 127), then pairs of those to i32.
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, i), _mm256_set1_epi16(1))
});

/// Which dot product this CPU runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    Avx2,
}

/// The block dot product this CPU runs, for benchmark output.
pub fn kernel_name() -> &'static str {
    match kernel() {
        Kernel::Avx2 => "avx2",
        Kernel::Portable => "portable",
    }
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
    }
    Kernel::Portable
}

fn dot(
    kernel: Kernel,
    format: BlockFormat,
    values: &[u8],
    scales: &[[f32; 2]],
    x: &[Q8Block],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: `kernel()` checked that the CPU has these features.
        Kernel::Avx2 => return unsafe { dot_avx2(format, values, scales, x) },
        Kernel::Portable => {}
    }
    let _ = kernel;
    dot_portable(format, values, scales, x)
}

impl QuantMatrix {
    /// Wraps raw ggml blocks (`rows × cols/32` of them, row after row).
    pub fn new(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> Result<QuantMatrix> {
        let bb = format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * cols / BLOCK * bb {
            candle_core::bail!(
                "{format:?} data of {} bytes does not fit {rows}×{cols}",
                data.len()
            );
        }
        let scale = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut values = Vec::with_capacity(data.len());
        let mut scales = Vec::with_capacity(data.len() / bb);
        for b in data.chunks_exact(bb) {
            values.extend_from_slice(&b[format.header()..]);
            scales.push(match format {
                BlockFormat::Q4_1 => [scale(b, 0), scale(b, 2)],
                BlockFormat::Q8_0 => [scale(b, 0), 0.0],
            });
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            values,
            scales,
        })
    }

    /// The weights as an f32 matrix `[rows, cols]` (for export and fine-tuning).
    pub fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        let n = self.values.len() / self.scales.len().max(1);
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(BLOCK * 256)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, o) in chunk.chunks_mut(BLOCK).enumerate() {
                    let b = c * 256 + i;
                    let (v, [d, m]) = (&self.values[b * n..(b + 1) * n], self.scales[b]);
                    for (j, w) in o.iter_mut().enumerate() {
                        *w = match self.format {
                            BlockFormat::Q4_1 => d * nibble(v, j) as f32 + m,
                            BlockFormat::Q8_0 => d * v[j] as i8 as f32,
                        };
                    }
                }
            });
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// Rows `ids` as f32 `[ids, cols]` (an embedding lookup in a tied head's matrix).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let blocks = self.cols / BLOCK;
        let n = self.values.len() / self.scales.len().max(1);
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let r = id as usize;
            if r >= self.rows {
                candle_core::bail!("token id {r} is outside the embedding's {} rows", self.rows);
            }
            for b in r * blocks..(r + 1) * blocks {
                let (v, [d, m]) = (&self.values[b * n..(b + 1) * n], self.scales[b]);
                out.extend((0..BLOCK).map(|j| match self.format {
                    BlockFormat::Q4_1 => d * nibble(v, j) as f32 + m,
                    BlockFormat::Q8_0 => d * v[j] as i8 as f32,
                }));
            }
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.cols {
            candle_core::bail!(
                "input has {cols} features, the quantized matrix {}",
                self.cols
            );
        }
        let n = x.elem_count() / cols;
        if n >= DENSE_FROM_TOKENS {
            // A long prompt: f32 weights for one product through the blocked fp32 matmul beat
            // block-by-block dot products (SmolLM2 prefill of 128 tokens 250 → 420 tokens/s).
            let w = self.dequantize(x.device())?;
            return x
                .to_dtype(candle_core::DType::F32)?
                .broadcast_matmul(&w.t()?);
        }
        let flat: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let quantized: Vec<Vec<Q8Block>> = flat.chunks_exact(cols).map(quantize_row).collect();
        let blocks = self.cols / BLOCK;
        let row_bytes = self.values.len() / self.rows;
        let kernel = kernel();
        // Output rows (of W) in parallel; each reads its weights once for all tokens.
        let mut out_t = vec![0f32; self.rows * n];
        let work = |(chunk, out): (usize, &mut [f32])| {
            for (k, o) in out.chunks_mut(n).enumerate() {
                let r = chunk * 64 + k;
                let v = &self.values[r * row_bytes..(r + 1) * row_bytes];
                let s = &self.scales[r * blocks..(r + 1) * blocks];
                for (t, q) in quantized.iter().enumerate() {
                    o[t] = dot(kernel, self.format, v, s, q);
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
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module};

    /// Every format (Q4_0 and Q5_0 rewritten as Q8_0) gives candle's quantized product (the same arithmetic), stay close to the exact
    /// product, dequantize to candle's values, and the AVX2 and portable dots agree.
    #[test]
    fn matches_candles_quantized_matmul() {
        let dev = Device::Cpu;
        let values = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
        ] {
            let format = BlockFormat::of(dtype).unwrap();
            let w = Tensor::randn(0f32, 1.0, (96, 128), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let blocks = as_q8_0(dtype, &q.data().unwrap()).into_owned();
            let ours = QuantMatrix::new(format, 96, 128, &blocks).unwrap();
            assert_eq!(
                values(ours.dequantize(&dev).unwrap()),
                values(q.dequantize(&dev).unwrap())
            );
            // Looked-up rows are those rows of the whole matrix.
            let dense = ours.dequantize(&dev).unwrap();
            let picked = dense.index_select(&Tensor::new(&[7u32, 0, 95], &dev).unwrap(), 0);
            assert_eq!(
                values(ours.rows(&[7, 0, 95]).unwrap()),
                values(picked.unwrap())
            );
            let reference = QMatMul::from_qtensor(q).unwrap();
            for n in [1usize, 5] {
                let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
                let a = values(ours.forward(&x).unwrap());
                let b = values(reference.forward(&x).unwrap());
                assert_eq!(a.len(), b.len());
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 2e-3 * scale.max(1.0),
                        "{format:?}: {x} vs {y}"
                    );
                }
                let exact = values(x.broadcast_matmul(&w.t().unwrap()).unwrap());
                let err = a
                    .iter()
                    .zip(&exact)
                    .map(|(p, e)| (p - e).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 0.2 * scale,
                    "{format:?}: quantization error {err} of {scale}"
                );
            }
            // A long prompt (dequantized weights, fp32 matmul) agrees with the same tokens one at
            // a time (8-bit activations) to within the activations' rounding.
            let x = Tensor::randn(0f32, 1.0, (DENSE_FROM_TOKENS + 3, 128), &dev).unwrap();
            let together = values(ours.forward(&x).unwrap());
            let scale = together.iter().fold(0f32, |m, v| m.max(v.abs()));
            for t in 0..DENSE_FROM_TOKENS + 3 {
                let alone = values(ours.forward(&x.narrow(0, t, 1).unwrap()).unwrap());
                for (i, a) in alone.iter().enumerate() {
                    let b = together[t * 96 + i];
                    assert!(
                        (a - b).abs() <= 2e-2 * scale,
                        "{format:?} token {t}: {a} vs {b}"
                    );
                }
            }
            let x = Tensor::randn(0f32, 1.0, (2, 128), &dev).unwrap();
            let row = quantize_row(&x.get(0).unwrap().to_vec1::<f32>().unwrap());
            let (v, s) = (&ours.values[..ours.values.len() / 96], &ours.scales[..4]);
            let p = dot_portable(format, v, s, &row);
            let fast = dot(kernel(), format, v, s, &row);
            assert!(
                (fast - p).abs() <= 1e-3 * p.abs().max(1.0),
                "{format:?}: {fast} vs {p}"
            );
        }
    }
}
