//! Quantized matrix multiplication for GGUF weights in Q4_1 and Q8_0, ggml's arithmetic:
//! activations quantized to 8 bits per 32-value block, integer dot products, one scale (and for
//! Q4_1 one offset) per block, output rows in parallel. candle multiplies Q4_1 in a portable
//! scalar loop (80% of SmolLM2's decode time) and converts each block's f16 scale through a
//! function call; here the scales are converted to f32 once, when the model loads.
//!
//! A token's product is the same bits however many tokens are multiplied with it and whichever
//! kernel runs (see `dot_portable`). With 8-bit activations a difference in the last bit can
//! round a value the other way and grow through the layers: when long prompts took a dequantized
//! fp32 path, the log-probabilities `serve` reported and those `eval` computed for the same text
//! differed by up to 0.3 nats, and a reply's greedy tokens changed with the server's load.

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;

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

/// Rows (of a weight matrix) or tokens (of activations) that go side by side in one vector's
/// lanes.
const LANES: usize = 8;

/// Scales of `LANES` rows or tokens for one block: `[d; 8]` and `[m; 8]` (weights) or `[d; 8]`
/// and `[s; 8]` (activations); missing rows or tokens are zero.
type LaneScales = [[f32; LANES]; 2];

/// A quantized weight matrix `[rows, cols]`, repacked at load for the kernels.
///
/// Each block of eight rows is stored block by block (`[row / 8][block]`), with each four
/// consecutive values of the eight rows side by side: the 32 bytes a vector instruction takes.
/// Q4_1 packs values `4c..4c+4` in the low nibbles and `4c+16..4c+20` in the high nibbles of
/// the same bytes (128 bytes a block for eight rows); Q8_0 has one byte a value (256 bytes).
/// Rows past the last whole group of eight follow in ggml's order, values only. Scales and
/// minimums are f32, eight rows side by side.
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    values: Vec<u8>,
    /// `[row / 8][block]`.
    scales: Vec<LaneScales>,
    /// Q8_0: `Σw` of each block of eight rows (`[row / 8][block]`): VNNI's kernels take
    /// `128·Σw` off the products they form with activations offset by 128.
    offsets: Vec<[i16; LANES]>,
}

/// Activations quantized to 8 bits per 32-value block: `x ≈ d·q`, with `s = d·Σq` for Q4_1's
/// offset term. Token `t`'s blocks are `q[t·blocks..]`; the tokens are padded with zeros to a
/// multiple of eight, and their scales sit eight tokens side by side (`[t / 8][block]`).
struct Activations {
    blocks: usize,
    tokens: usize,
    q: Vec<[i8; BLOCK]>,
    scales: Vec<LaneScales>,
    /// `[t / 8][block]`: for each four values of the block, those of the eight tokens side by
    /// side (VNNI's tokens kernel); offset to unsigned for Q8_0 weights. Empty until needed.
    interleaved: Vec<[u8; BLOCK * LANES]>,
}

/// Where [`quantize_block`] writes one block: its bytes and (`d`, `d·Σq`).
type QuantizedBlock<'a> = (&'a mut [i8; BLOCK], &'a mut (f32, f32));

/// 32 activations to bytes `q` with one scale: `x ≈ d·q`; returns `d` and `d·Σq`.
fn quantize_block(x: &[f32], q: &mut [i8; BLOCK]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        // Rounds half away from zero, as `roundf` (ggml) does, without a call into libm:
        // adding the float just below one half rounds up exactly at the half.
        let y = v * inv;
        *qi = (y + 0.499_999_97f32.copysign(y)) as i8;
        sum += *qi as i32;
    }
    (d, d * sum as f32)
}

impl Activations {
    fn new(x: &[f32], cols: usize) -> Activations {
        let (blocks, tokens) = (cols / BLOCK, x.len() / cols);
        let padded = tokens.div_ceil(LANES) * LANES;
        let mut q = vec![[0i8; BLOCK]; padded * blocks];
        let mut per_block = vec![(0f32, 0f32); tokens * blocks];
        let quantize = |(b, (qb, ds)): (&[f32], QuantizedBlock)| *ds = quantize_block(b, qb);
        if tokens < LANES {
            // A decoding step: too little work to hand to other threads.
            x.chunks(BLOCK)
                .zip(q.iter_mut().zip(per_block.iter_mut()))
                .for_each(quantize);
        } else {
            x.par_chunks(BLOCK)
                .zip(q.par_iter_mut().zip(per_block.par_iter_mut()))
                .with_min_len(256)
                .for_each(quantize);
        }
        let mut scales = vec![[[0f32; LANES]; 2]; padded / LANES * blocks];
        for (i, &(d, s)) in per_block.iter().enumerate() {
            let (t, blk) = (i / blocks, i % blocks);
            let lane = &mut scales[t / LANES * blocks + blk];
            lane[0][t % LANES] = d;
            lane[1][t % LANES] = s;
        }
        Activations {
            blocks,
            tokens,
            q,
            scales,
            interleaved: Vec::new(),
        }
    }

    /// Fills `interleaved`; `offset` adds 128 to every value (as unsigned bytes).
    fn interleave(&mut self, offset: bool) {
        let flip = if offset { 0x80 } else { 0 };
        let groups = self.q.len() / self.blocks / LANES;
        let mut out = vec![[0u8; BLOCK * LANES]; groups * self.blocks];
        for (i, o) in out.iter_mut().enumerate() {
            let (g, b) = (i / self.blocks, i % self.blocks);
            for k in 0..LANES {
                let q = &self.q[(g * LANES + k) * self.blocks + b];
                for (c, four) in q.chunks_exact(4).enumerate() {
                    for (e, &v) in four.iter().enumerate() {
                        o[c * 32 + k * 4 + e] = v as u8 ^ flip;
                    }
                }
            }
        }
        self.interleaved = out;
    }

    /// Token `t`'s block `b`: its scale and `d·Σq`.
    fn scale(&self, t: usize, b: usize) -> (f32, f32) {
        let s = &self.scales[t / LANES * self.blocks + b];
        (s[0][t % LANES], s[1][t % LANES])
    }
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

/// What every kernel computes for weight row `r` and token `t`, written out one block at a
/// time: each block's integer sum exactly, then `acc = (d·dₓ)·Σ + acc` fused, and (Q4_1)
/// `off = off + m·s`; the product is `acc + off`. The vector kernels do the same float
/// operations in the same order, one row or token per lane, so every kernel and every way of
/// grouping rows and tokens gives the same bits.
fn dot_portable(w: &QuantMatrix, r: usize, x: &Activations, t: usize) -> f32 {
    let (mut acc, mut off) = (0f32, 0f32);
    for b in 0..x.blocks {
        let q = &x.q[t * x.blocks + b];
        let isum: i32 = (0..BLOCK).map(|j| w.value(r, b, j) * q[j] as i32).sum();
        let (d, m) = w.scale(r, b);
        let (dx, sx) = x.scale(t, b);
        acc = (d * dx).mul_add(isum as f32, acc);
        if w.format == BlockFormat::Q4_1 {
            off += m * sx;
        }
    }
    acc + off
}

/// The x86 kernels: the rows kernel multiplies eight weight rows with one token (decoding), the
/// tokens kernel one weight row with eight tokens (a prompt). Each lane holds one row or token
/// from the start: four values of the other operand are broadcast to every lane, and
/// `$dot(acc, u8s, i8s)` adds each lane's four byte products into it, so eight steps leave each
/// lane's whole block sum with nothing to reduce. AVX2's `maddubs` then `madd` and VNNI's
/// `vpdpbusd` give the same exact integers. One operand must be unsigned: Q4_1's values are;
/// for Q8_0, VNNI offsets the activations by 128 (and takes `128·Σw` off after), AVX2 (whose
/// 16-bit pair sums would overflow that way) multiplies |w| by x carrying w's sign.
macro_rules! block_kernels {
    ($rows:ident, $tokens:ident, $features:literal, $vnni:literal, $dot:expr) => {
        /// Weight rows `8·g .. 8·g + 8` times token `t`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $rows(w: &QuantMatrix, g: usize, x: &Activations, t: usize) -> [f32; LANES] {
            use std::arch::x86_64::*;
            let blocks = x.blocks;
            let (mut acc, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (nibble, flip) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(-128));
            for b in 0..blocks {
                let v = w.values.as_ptr().add(w.group_at(g, b));
                let xq = x.q[t * blocks + b].as_ptr() as *const u8;
                let four = |c: usize| broadcast4(xq.add(4 * c));
                let wv = |c: usize| _mm256_loadu_si256(v.add(32 * c) as *const __m256i);
                let mut isum = _mm256_setzero_si256();
                match w.format {
                    BlockFormat::Q4_1 => {
                        for c in 0..LANES / 2 {
                            let p = wv(c);
                            let high = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
                            isum = $dot(isum, _mm256_and_si256(p, nibble), four(c));
                            isum = $dot(isum, high, four(c + LANES / 2));
                        }
                    }
                    BlockFormat::Q8_0 => {
                        for c in 0..LANES {
                            let (wc, xc) = (wv(c), four(c));
                            isum = if $vnni {
                                $dot(isum, _mm256_xor_si256(xc, flip), wc)
                            } else {
                                $dot(isum, _mm256_sign_epi8(wc, wc), _mm256_sign_epi8(xc, wc))
                            };
                        }
                        if $vnni {
                            let o = w.offsets[g * blocks + b].as_ptr() as *const __m128i;
                            let o = _mm256_cvtepi16_epi32(_mm_loadu_si128(o));
                            isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(o, 7));
                        }
                    }
                }
                let ws = &w.scales[g * blocks + b];
                let (dx, sx) = x.scale(t, b);
                let (d, m) = (
                    _mm256_loadu_ps(ws[0].as_ptr()),
                    _mm256_loadu_ps(ws[1].as_ptr()),
                );
                let (dx, sx) = (_mm256_set1_ps(dx), _mm256_set1_ps(sx));
                scale_into(w.format, (&mut acc, &mut off), (d, dx, m, sx), isum);
            }
            lanes(acc, off)
        }

        /// Weight row `r` (in a whole group of eight) times tokens `8·g .. 8·g + 8`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $tokens(w: &QuantMatrix, r: usize, x: &Activations, g: usize) -> [f32; LANES] {
            use std::arch::x86_64::*;
            let blocks = x.blocks;
            let (mut acc, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let nibble = _mm256_set1_epi8(0x0F);
            for b in 0..blocks {
                let v = w
                    .values
                    .as_ptr()
                    .add(w.group_at(r / LANES, b) + 4 * (r % LANES));
                let xq = x.interleaved[g * blocks + b].as_ptr();
                let xv = |c: usize| _mm256_loadu_si256(xq.add(32 * c) as *const __m256i);
                let four = |c: usize| broadcast4(v.add(32 * c));
                let mut isum = _mm256_setzero_si256();
                match w.format {
                    BlockFormat::Q4_1 => {
                        for c in 0..LANES / 2 {
                            let p = four(c);
                            let high = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
                            isum = $dot(isum, _mm256_and_si256(p, nibble), xv(c));
                            isum = $dot(isum, high, xv(c + LANES / 2));
                        }
                    }
                    BlockFormat::Q8_0 => {
                        for c in 0..LANES {
                            let (wc, xc) = (four(c), xv(c));
                            isum = if $vnni {
                                $dot(isum, xc, wc)
                            } else {
                                $dot(isum, _mm256_sign_epi8(wc, wc), _mm256_sign_epi8(xc, wc))
                            };
                        }
                        if $vnni {
                            let o = w.offsets[r / LANES * blocks + b][r % LANES] as i32;
                            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * o));
                        }
                    }
                }
                let (d, m) = w.scale(r, b);
                let xs = &x.scales[g * blocks + b];
                let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let (dx, sx) = (
                    _mm256_loadu_ps(xs[0].as_ptr()),
                    _mm256_loadu_ps(xs[1].as_ptr()),
                );
                scale_into(w.format, (&mut acc, &mut off), (d, dx, m, sx), isum);
            }
            lanes(acc, off)
        }
    };
}

/// Four bytes at `p` in every 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn broadcast4(p: *const u8) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// `acc = (d·dₓ)·Σ + acc` fused and (Q4_1) `off = off + m·s`, lane by lane: the float steps of
/// [`dot_portable`] for eight rows or tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scale_into(
    format: BlockFormat,
    (acc, off): (
        &mut std::arch::x86_64::__m256,
        &mut std::arch::x86_64::__m256,
    ),
    (d, dx, m, s): (
        std::arch::x86_64::__m256,
        std::arch::x86_64::__m256,
        std::arch::x86_64::__m256,
        std::arch::x86_64::__m256,
    ),
    isum: std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum), *acc);
    if format == BlockFormat::Q4_1 {
        *off = _mm256_add_ps(*off, _mm256_mul_ps(m, s));
    }
}

/// The eight products `acc + off`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lanes(acc: std::arch::x86_64::__m256, off: std::arch::x86_64::__m256) -> [f32; LANES] {
    use std::arch::x86_64::*;
    let mut out = [0f32; LANES];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc, off));
    out
}

block_kernels!(rows_avx2, tokens_avx2, "avx2,fma", false, |acc, u, i| {
    // u8 × i8 pairs summed to i16 (at most 2·127·128), then pairs of those to i32.
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, i), _mm256_set1_epi16(1)),
    )
});

block_kernels!(
    rows_vnni,
    tokens_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    true,
    |acc, u, i| _mm256_dpbusd_epi32(acc, u, i)
);

block_kernels!(
    rows_avx_vnni,
    tokens_avx_vnni,
    "avx2,fma,avxvnni",
    true,
    |acc, u, i| _mm256_dpbusd_avx_epi32(acc, u, i)
);

/// Which kernels this CPU runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    Avx2,
    /// AVX-VNNI: Intel's client cores (Alder Lake on) without AVX-512.
    AvxVnni,
    Vnni,
}

/// The block kernels this CPU runs, for benchmark output.
pub fn kernel_name() -> &'static str {
    match kernel() {
        Kernel::Vnni => "avx512-vnni",
        Kernel::AvxVnni => "avx-vnni",
        Kernel::Avx2 => "avx2",
        Kernel::Portable => "portable",
    }
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
            {
                return Kernel::Vnni;
            }
            if std::is_x86_feature_detected!("avxvnni") {
                return Kernel::AvxVnni;
            }
            return Kernel::Avx2;
        }
    }
    Kernel::Portable
}

impl BlockFormat {
    /// Bytes of a block's quantized values.
    fn value_bytes(self) -> usize {
        self.block_bytes() - self.header()
    }
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
        let (blocks, vb) = (cols / BLOCK, format.value_bytes());
        let scale = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let groups = rows / LANES;
        let tail = groups * LANES * blocks * vb;
        let mut values = vec![0u8; rows * blocks * vb];
        let mut scales = vec![[[0f32; LANES]; 2]; rows.div_ceil(LANES) * blocks];
        let mut offsets = vec![[0i16; LANES]; groups * blocks];
        for (i, blk) in data.chunks_exact(bb).enumerate() {
            let (r, b) = (i / blocks, i % blocks);
            let (g, k) = (r / LANES, r % LANES);
            let lane = &mut scales[g * blocks + b];
            lane[0][k] = scale(blk, 0);
            if format == BlockFormat::Q4_1 {
                lane[1][k] = scale(blk, 2);
            }
            let v = &blk[format.header()..];
            if g == groups {
                let at = tail + ((r - groups * LANES) * blocks + b) * vb;
                values[at..at + vb].copy_from_slice(v);
                continue;
            }
            let at = (g * blocks + b) * vb * LANES;
            for j in 0..BLOCK {
                let (c, e) = (j / 4, j % 4);
                match format {
                    BlockFormat::Q4_1 => {
                        let shift = if c < LANES / 2 { 0 } else { 4 };
                        values[at + (c % (LANES / 2)) * 32 + k * 4 + e] |= nibble(v, j) << shift;
                    }
                    BlockFormat::Q8_0 => {
                        values[at + c * 32 + k * 4 + e] = v[j];
                        // At most 32·127 in size: an i16.
                        offsets[g * blocks + b][k] += v[j] as i8 as i16;
                    }
                }
            }
        }
        if format != BlockFormat::Q8_0 {
            offsets = Vec::new();
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            values,
            scales,
            offsets,
        })
    }

    /// Where the values of block `b` of row group `g` (a whole group of eight) start.
    fn group_at(&self, g: usize, b: usize) -> usize {
        (g * (self.cols / BLOCK) + b) * self.format.value_bytes() * LANES
    }

    /// Value `j` of row `r`'s block `b` (Q4_1: 0..16; Q8_0: signed).
    fn value(&self, r: usize, b: usize, j: usize) -> i32 {
        let (blocks, vb) = (self.cols / BLOCK, self.format.value_bytes());
        let groups = self.rows / LANES;
        if r >= groups * LANES {
            let at = groups * LANES * blocks * vb + ((r - groups * LANES) * blocks + b) * vb;
            let v = &self.values[at..at + vb];
            return match self.format {
                BlockFormat::Q4_1 => nibble(v, j) as i32,
                BlockFormat::Q8_0 => v[j] as i8 as i32,
            };
        }
        let (c, e, k) = (j / 4, j % 4, r % LANES);
        let at = self.group_at(r / LANES, b);
        match self.format {
            BlockFormat::Q4_1 => {
                let byte = self.values[at + (c % (LANES / 2)) * 32 + k * 4 + e];
                (if c < LANES / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }) as i32
            }
            BlockFormat::Q8_0 => self.values[at + c * 32 + k * 4 + e] as i8 as i32,
        }
    }

    /// Row `r`'s block `b`: its scale and minimum.
    fn scale(&self, r: usize, b: usize) -> (f32, f32) {
        let s = &self.scales[r / LANES * (self.cols / BLOCK) + b];
        (s[0][r % LANES], s[1][r % LANES])
    }

    /// Row `r` as f32 values, into `out`.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_mut(BLOCK).enumerate() {
            let (d, m) = self.scale(r, b);
            for (j, w) in o.iter_mut().enumerate() {
                *w = match self.format {
                    BlockFormat::Q4_1 => d * self.value(r, b, j) as f32 + m,
                    BlockFormat::Q8_0 => d * self.value(r, b, j) as f32,
                };
            }
        }
    }

    /// The weights as an f32 matrix `[rows, cols]` (for export and fine-tuning).
    pub fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// Rows `ids` as f32 `[ids, cols]` (an embedding lookup in a tied head's matrix).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, row) in ids.iter().zip(out.chunks_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                candle_core::bail!("token id {r} is outside the embedding's {} rows", self.rows);
            }
            self.dequantize_row(r, row);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(kernel(), x)
    }

    fn forward_with(&self, kernel: Kernel, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.cols {
            candle_core::bail!(
                "input has {cols} features, the quantized matrix {}",
                self.cols
            );
        }
        let flat: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut x_q = Activations::new(&flat, cols);
        if kernel != Kernel::Portable && x_q.tokens >= LANES / 2 {
            let offset = matches!(kernel, Kernel::Vnni | Kernel::AvxVnni);
            x_q.interleave(offset && self.format == BlockFormat::Q8_0);
        }
        let n = x_q.tokens;
        let mut out_t = vec![0f32; self.rows * n];
        if n > 0 {
            // Output rows (of W) in parallel, 64 at a time; each chunk reads its weights once
            // for all tokens.
            out_t
                .par_chunks_mut(n * 64)
                .enumerate()
                .for_each(|(c, out)| self.rows_times(kernel, c * 64, &x_q, out));
        }
        let mut shape = dims;
        *shape.last_mut().expect("non-empty shape") = self.rows;
        Tensor::from_vec(out_t, (self.rows, n), x.device())?
            .t()?
            .contiguous()?
            .reshape(shape)
    }

    /// The products of the rows from `first` on with every token, into `out` (`[row][token]`).
    /// Eight tokens or more go eight at a time per row, what is left over (and a decoding step)
    /// eight rows at a time per token; a group of four or more left-over tokens is padded to
    /// eight instead. Rows past the last whole group of eight go one by one. Every path gives
    /// the same bits (see [`dot_portable`]).
    fn rows_times(&self, kernel: Kernel, first: usize, x: &Activations, out: &mut [f32]) {
        let n = x.tokens;
        let rows = out.len() / n;
        // This chunk's rows in whole groups of eight (`first` is a multiple of eight).
        let grouped = (self.rows / LANES * LANES).saturating_sub(first).min(rows);
        let mut portable_from = 0;
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable {
            let (full, rest) = (n / LANES, n % LANES);
            let padded_groups = if rest >= LANES / 2 { full + 1 } else { full };
            for k in 0..grouped {
                for g in 0..padded_groups {
                    // SAFETY: `kernel` is one this CPU has (`kernel()` checks).
                    let lanes = unsafe {
                        match kernel {
                            Kernel::Vnni => tokens_vnni(self, first + k, x, g),
                            Kernel::AvxVnni => tokens_avx_vnni(self, first + k, x, g),
                            _ => tokens_avx2(self, first + k, x, g),
                        }
                    };
                    let end = ((g + 1) * LANES).min(n);
                    out[k * n + g * LANES..k * n + end].copy_from_slice(&lanes[..end - g * LANES]);
                }
            }
            for t in (padded_groups * LANES).min(n)..n {
                for k in (0..grouped).step_by(LANES) {
                    // SAFETY: as above.
                    let lanes = unsafe {
                        match kernel {
                            Kernel::Vnni => rows_vnni(self, (first + k) / LANES, x, t),
                            Kernel::AvxVnni => rows_avx_vnni(self, (first + k) / LANES, x, t),
                            _ => rows_avx2(self, (first + k) / LANES, x, t),
                        }
                    };
                    for (i, v) in lanes.into_iter().enumerate() {
                        out[(k + i) * n + t] = v;
                    }
                }
            }
            portable_from = grouped;
        }
        let _ = (kernel, grouped);
        for k in portable_from..rows {
            for t in 0..n {
                out[k * n + t] = dot_portable(self, first + k, x, t);
            }
        }
    }
}

/// `x · Wᵀ` through candle's quantized matmul. For one token candle multiplies Q6_K with a
/// GEMV of its own whose sums differ in the last bits from its many-token kernel, which decoding
/// then amplifies (Gemma 3's log-probabilities moved by 0.3 nats over 50 tokens); a lone token
/// goes through the many-token kernel beside a copy of itself instead, so that a token's product
/// does not depend on how many are multiplied with it.
pub fn candle_forward(weight: &candle_core::quantized::QMatMul, x: &Tensor) -> Result<Tensor> {
    use candle_core::quantized::QMatMul;
    use candle_core::Module;
    let lone = x.elem_count() == x.dim(candle_core::D::Minus1)?;
    match weight {
        QMatMul::QTensor(q) if lone && q.dtype() == GgmlDType::Q6K => {
            let twice = Tensor::cat(&[x, x], 0)?;
            weight.forward(&twice)?.narrow(0, 0, x.dim(0)?)
        }
        _ => weight.forward(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module};

    fn values(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The kernels this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx2" => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                "avxvnni" => is_x86_feature_detected!("avxvnni"),
                _ => is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"),
            };
            if has("avx2") {
                all.push(Kernel::Avx2);
                if has("avxvnni") {
                    all.push(Kernel::AvxVnni);
                }
                if has("avx512vnni") {
                    all.push(Kernel::Vnni);
                }
            }
        }
        all
    }

    /// A random matrix of `rows × 128` in `dtype`, as ours and as candle's.
    fn matrix(dtype: GgmlDType, rows: usize) -> (Tensor, QuantMatrix, QTensor) {
        let w = Tensor::randn(0f32, 1.0, (rows, 128), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let blocks = as_q8_0(dtype, &q.data().unwrap()).into_owned();
        let format = BlockFormat::of(dtype).unwrap();
        (w, QuantMatrix::new(format, rows, 128, &blocks).unwrap(), q)
    }

    /// Every format (Q4_0 and Q5_0 rewritten as Q8_0) dequantizes to candle's values, gives
    /// candle's quantized product to within float rounding (the same integer sums, scaled in
    /// another order) and stays close to the exact product.
    #[test]
    fn matches_candles_quantized_matmul() {
        let dev = Device::Cpu;
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
        ] {
            let (w, ours, q) = matrix(dtype, 96);
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
            for n in [1usize, 5, 13] {
                let x = Tensor::randn(0f32, 1.0, (1, n, 128), &dev).unwrap();
                let a = values(ours.forward(&x).unwrap());
                let b = values(reference.forward(&x).unwrap());
                assert_eq!(a.len(), b.len());
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 2e-3 * scale.max(1.0),
                        "{dtype:?}: {x} vs {y}"
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
                    "{dtype:?}: quantization error {err} of {scale}"
                );
            }
        }
    }

    /// A token's product is the same bits however many tokens are multiplied with it and
    /// whichever kernel runs: 37 tokens together (eight at a time, then five padded to eight),
    /// each alone (eight rows at a time), three together (eight rows at a time), on every kernel
    /// this CPU has. Rows: 100, so the last chunk has rows left over from groups of eight.
    #[test]
    fn a_tokens_product_does_not_depend_on_its_batch_or_kernel() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (_, ours, _) = matrix(dtype, 100);
            let x = Tensor::randn(0f32, 1.0, (37, 128), &dev).unwrap();
            let together = values(ours.forward(&x).unwrap());
            for kernel in kernels() {
                let again = values(ours.forward_with(kernel, &x).unwrap());
                assert_eq!(again, together, "{dtype:?} {kernel:?}: 37 tokens");
                for t in [0usize, 8, 33, 36] {
                    let alone = values(
                        ours.forward_with(kernel, &x.narrow(0, t, 1).unwrap())
                            .unwrap(),
                    );
                    assert_eq!(
                        alone,
                        together[t * 100..(t + 1) * 100],
                        "{dtype:?} {kernel:?}: token {t}"
                    );
                }
                let three = values(
                    ours.forward_with(kernel, &x.narrow(0, 30, 3).unwrap())
                        .unwrap(),
                );
                assert_eq!(
                    three,
                    together[3000..3300],
                    "{dtype:?} {kernel:?}: 3 tokens"
                );
            }
        }
    }
}
