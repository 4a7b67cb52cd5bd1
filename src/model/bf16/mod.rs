//! bf16 matrix products for mixed-precision training (`--precision bf16`, or `auto`): operands
//! are rounded to bf16 as they are packed, products accumulate in f32, and everything outside the
//! matmuls stays f32 (PyTorch's CPU autocast does the same). The `gemm` crate has no bf16 path,
//! hence our own kernels, one per instruction set, chosen at run time:
//! - `amx`: Intel AMX tiles (Sapphire Rapids and later), 16·16·32 multiply-adds an instruction;
//! - `avx512`: AVX512-BF16's `vdpbf16ps` (AMD Zen 4 and later, Intel Cooper Lake and later),
//!   a pair of multiply-adds per f32 lane, twice the fp32 FMA rate.
//!
//! `CHATFORGE_MATMUL` (`amx-bf16`, `avx512-bf16` or `f32`) caps the choice, so that one machine's
//! tests and benchmarks cover the lower paths.
//!
//! Layout, shared by both kernels: the left operand is packed into 16-row × 32-deep tiles (64
//! bytes a row), the right operand into 16-pair × 16-column tiles in the pairwise ("VNNI") order
//! both dot-product instructions read; both are zero-padded to whole tiles, so edges need no
//! special kernel.

mod amx;
mod avx512;

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows (and columns) of a tile of the result; the depth of a tile product.
const TILE: usize = 16;
const DEPTH: usize = 32;

/// The kernel a matmul of the training step runs on, from the slowest to the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// f32 through the `gemm` crate.
    F32,
    /// bf16 with AVX512-BF16 dot products.
    Avx512Bf16,
    /// bf16 on AMX tiles.
    AmxBf16,
}

/// The environment variable that caps the kernel choice.
pub const KERNEL_ENV: &str = "CHATFORGE_MATMUL";

impl Kernel {
    const ALL: [Kernel; 3] = [Kernel::F32, Kernel::Avx512Bf16, Kernel::AmxBf16];

    /// Its name in flags, logs, `chatforge.json` and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::F32 => "f32",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::AmxBf16 => "amx-bf16",
        }
    }

    /// Whether it multiplies bf16 operands.
    pub fn is_bf16(self) -> bool {
        self != Kernel::F32
    }

    /// The name with the SIMD level gemm dispatches to for f32 (gemm chooses at run time too).
    pub fn describe(self) -> String {
        match self {
            Kernel::F32 => format!("f32 ({})", f32_simd_level()),
            other => other.name().to_string(),
        }
    }

    /// The fastest kernel this CPU runs, under the `CHATFORGE_MATMUL` cap when it is set; an
    /// unknown value is an error that lists the known ones.
    pub fn best() -> Result<Kernel> {
        let best = best_available();
        match std::env::var(KERNEL_ENV) {
            Err(_) => Ok(best),
            Ok(v) if v.trim().is_empty() => Ok(best),
            Ok(v) => match Kernel::ALL.iter().find(|k| k.name() == v.trim()) {
                Some(&cap) => Ok(best.min(cap)),
                None => bail!(
                    "{KERNEL_ENV}={v:?} is not a matmul kernel; use one of {} (or unset it)",
                    Kernel::ALL.map(Kernel::name).join(", ")
                ),
            },
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The fastest kernel this CPU has, ignoring the cap.
pub fn best_available() -> Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        if amx::detect() {
            Kernel::AmxBf16
        } else if vector_packing() {
            Kernel::Avx512Bf16
        } else {
            Kernel::F32
        }
    })
}

/// Whether the AVX-512 packers and the `vdpbf16ps` kernel can run.
fn vector_packing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instruction set gemm's f32 kernels use here (it is built with `x86-v4`).
fn f32_simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "sse2"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// `a [m, k] · b [k, n]` as a new row-major `[m, n]` f32 matrix, with the operands rounded to
/// bf16 and the products summed in f32, on `kernel` (a bf16 one this CPU has).
pub fn matmul(kernel: Kernel, a: Strided, b: Strided) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "bf16::matmul: inner dimensions differ");
    assert!(
        kernel.is_bf16() && kernel <= best_available(),
        "bf16::matmul: this CPU has no {} kernel",
        kernel.name()
    );
    // The vector packers read whole runs through raw pointers: every element must exist.
    for (x, side) in [(&a, "left"), (&b, "right")] {
        assert!(
            x.rows == 0 || x.cols == 0 || (x.rows - 1) * x.rs + (x.cols - 1) * x.cs < x.data.len(),
            "bf16::matmul: the {side} operand is shorter than its shape"
        );
    }
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let order = if kernel == Kernel::Avx512Bf16 && a.cs != 1 {
        LeftOrder::Pairs
    } else {
        LeftOrder::Rows
    };
    let (left, right) = rayon::join(|| pack_left(a, order), || pack_right(b));
    match kernel {
        Kernel::AmxBf16 => amx::product(&left, &right, (m, n, k)),
        _ => avx512::product(&left, order, &right, (m, n, k)),
    }
}

/// f32 to bf16, rounding to nearest even (NaN stays NaN); branch-free so packing loops vectorise.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    // A NaN keeps its sign and gains a quiet bit, so rounding cannot turn it into infinity.
    let bits = if x.is_nan() { b | 0x40_0000 } else { rounded };
    (bits >> 16) as u16
}

/// A strided f32 matrix: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_, f32> {
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }

    /// `len` consecutive elements from (r, c) along the rows (`down`) or along the columns.
    #[inline(always)]
    fn run(&self, r: usize, c: usize, len: usize, down: bool) -> &[f32] {
        let start = r * self.rs + c * self.cs;
        let step = if down { self.rs } else { self.cs };
        debug_assert_eq!(step, 1);
        &self.data[start..start + len]
    }
}

/// Values of one tile: 16 rows of 32 bf16.
const TILE_VALUES: usize = TILE * DEPTH;

/// Fills one tile of `a` (tile rows r0.., depth k0..) in row order: `tile[r·32 + j] = a[r0+r, k0+j]`,
/// zero beyond the edges.
fn left_tile(a: &Strided, r0: usize, k0: usize, tile: &mut [u16]) {
    let (rows, depth) = (TILE.min(a.rows - r0), DEPTH.min(a.cols - k0));
    #[cfg(target_arch = "x86_64")]
    if rows == TILE && depth == DEPTH && (a.cs == 1 || a.rs == 1) && vector_packing() {
        // SAFETY: `vector_packing` checked the AVX-512 features; the tile is whole, so every load
        // below stays inside the operand.
        return unsafe { fast::left_tile(a, r0, k0, tile) };
    }
    if rows < TILE || depth < DEPTH {
        tile.fill(0);
    }
    if a.cs == 1 {
        for r in 0..rows {
            let src = a.run(r0 + r, k0, depth, false);
            for (d, &x) in tile[r * DEPTH..r * DEPTH + depth].iter_mut().zip(src) {
                *d = bf16_bits(x);
            }
        }
    } else if a.rs == 1 {
        for j in 0..depth {
            let src = a.run(r0, k0 + j, rows, true);
            for (r, &x) in src.iter().enumerate() {
                tile[r * DEPTH + j] = bf16_bits(x);
            }
        }
    } else {
        for r in 0..rows {
            for j in 0..depth {
                tile[r * DEPTH + j] = bf16_bits(a.at(r0 + r, k0 + j));
            }
        }
    }
}

/// Fills one tile of `b` (depth k0.., columns c0..) in pair order:
/// `tile[(j/2)·32 + c·2 + j%2] = b[k0+j, c0+c]`, zero beyond the edges.
fn right_tile(b: &Strided, k0: usize, c0: usize, tile: &mut [u16]) {
    let (depth, cols) = (DEPTH.min(b.rows - k0), TILE.min(b.cols - c0));
    #[cfg(target_arch = "x86_64")]
    if depth == DEPTH && cols == TILE && (b.cs == 1 || b.rs == 1) && vector_packing() {
        // SAFETY: as in `left_tile`.
        return unsafe { fast::right_tile(b, k0, c0, tile) };
    }
    if depth < DEPTH || cols < TILE {
        tile.fill(0);
    }
    let slot = |j: usize, c: usize| (j / 2) * DEPTH + c * 2 + j % 2;
    if b.rs == 1 {
        for c in 0..cols {
            let src = b.run(k0, c0 + c, depth, true);
            for (j, &x) in src.iter().enumerate() {
                tile[slot(j, c)] = bf16_bits(x);
            }
        }
    } else if b.cs == 1 {
        for j in 0..depth {
            let src = b.run(k0 + j, c0, cols, false);
            for (c, &x) in src.iter().enumerate() {
                tile[slot(j, c)] = bf16_bits(x);
            }
        }
    } else {
        for j in 0..depth {
            for c in 0..cols {
                tile[slot(j, c)] = bf16_bits(b.at(k0 + j, c0 + c));
            }
        }
    }
}

/// Whole tiles packed with AVX-512: sixteen conversions to bf16 per instruction, and the
/// transposes through a small buffer in L1. The scalar loops above are the reference (and handle
/// the edges); the tests check that both pack the same bits.
#[cfg(target_arch = "x86_64")]
mod fast {
    use super::{Strided, DEPTH, TILE};
    use std::arch::x86_64::*;

    /// 32 bf16 from 16 floats at `lo` and 16 at `hi` (in that order).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_32(lo: *const f32, hi: *const f32) -> __m512i {
        std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(hi),
            _mm512_loadu_ps(lo),
        ))
    }

    /// 16 bf16 from 16 floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_16(p: *const f32) -> [u16; 16] {
        std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(p)))
    }

    /// See `super::left_tile`; whole tiles of an operand with unit row or column stride.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn left_tile(a: &Strided, r0: usize, k0: usize, tile: &mut [u16]) {
        let base = a.data.as_ptr();
        if a.cs == 1 {
            for r in 0..TILE {
                let p = base.add((r0 + r) * a.rs + k0);
                _mm512_storeu_si512(
                    tile[r * DEPTH..].as_mut_ptr().cast(),
                    convert_32(p, p.add(16)),
                );
            }
        } else {
            // Columns are contiguous: convert each of the 32 columns' 16 rows, then transpose.
            let mut columns = [[0u16; TILE]; DEPTH];
            for (j, col) in columns.iter_mut().enumerate() {
                *col = convert_16(base.add(r0 + (k0 + j) * a.cs));
            }
            for r in 0..TILE {
                for (j, col) in columns.iter().enumerate() {
                    tile[r * DEPTH + j] = col[r];
                }
            }
        }
    }

    /// See `super::right_tile`; whole tiles of an operand with unit row or column stride.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn right_tile(b: &Strided, k0: usize, c0: usize, tile: &mut [u16]) {
        let base = b.data.as_ptr();
        if b.cs == 1 {
            // Rows (depths) are contiguous: convert two depths at once and interleave them.
            let order: [i16; 32] = std::array::from_fn(|i| ((i % 2) * 16 + i / 2) as i16);
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            for pair in 0..DEPTH / 2 {
                let even = base.add((k0 + 2 * pair) * b.rs + c0);
                let both = convert_32(even, even.add(b.rs));
                let interleaved = _mm512_permutexvar_epi16(order, both);
                _mm512_storeu_si512(tile[pair * DEPTH..].as_mut_ptr().cast(), interleaved);
            }
        } else {
            // Depths are contiguous: each column's 32 depths are 16 pairs, one 32-bit word per
            // tile row; convert per column, then transpose the words.
            let mut columns = [[0u32; TILE]; TILE];
            for (c, col) in columns.iter_mut().enumerate() {
                let p = base.add(k0 + (c0 + c) * b.cs);
                *col = std::mem::transmute::<__m512i, [u32; 16]>(convert_32(p, p.add(16)));
            }
            let words: &mut [u32] =
                std::slice::from_raw_parts_mut(tile.as_mut_ptr().cast(), TILE * TILE);
            for pair in 0..TILE {
                for (c, col) in columns.iter().enumerate() {
                    words[pair * TILE + c] = col[pair];
                }
            }
        }
    }
}

/// How a packed left tile holds its 16 rows × 16 depth pairs (each pair a 32-bit word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeftOrder {
    /// Row after row, 32 depths each: the AMX tile layout, and the cheap one to pack from an
    /// operand whose rows are contiguous.
    Rows,
    /// Pair after pair, the 16 rows' words side by side: the right tile layout of the transposed
    /// operand, and the cheap one to pack from an operand whose columns are contiguous (the
    /// gradient `dyᵀ` of the weight gradient). The AVX512-BF16 kernel reads either.
    Pairs,
}

impl LeftOrder {
    /// The offsets, in 32-bit words, of the next row and of the next depth pair.
    fn word_strides(self) -> (usize, usize) {
        match self {
            LeftOrder::Rows => (DEPTH / 2, 1),
            LeftOrder::Pairs => (1, TILE),
        }
    }
}

/// The left operand `[m, k]` as tiles in `order`: tile (row block rb, depth block kb) at
/// `(rb · kblocks + kb) · 512`.
fn pack_left(a: Strided, order: LeftOrder) -> Vec<u16> {
    let (rblocks, kblocks) = (a.rows.div_ceil(TILE), a.cols.div_ceil(DEPTH));
    let mut out = vec![0u16; rblocks * kblocks * TILE_VALUES];
    let transposed = Strided {
        rows: a.cols,
        cols: a.rows,
        rs: a.cs,
        cs: a.rs,
        ..a
    };
    out.par_chunks_mut(TILE_VALUES)
        .enumerate()
        .for_each(|(t, tile)| {
            let (r0, k0) = ((t / kblocks) * TILE, (t % kblocks) * DEPTH);
            match order {
                LeftOrder::Rows => left_tile(&a, r0, k0, tile),
                LeftOrder::Pairs => right_tile(&transposed, k0, r0, tile),
            }
        });
    out
}

/// The right operand `[k, n]` as tiles: tile (column block cb, depth block kb) at
/// `(cb · kblocks + kb) · 512`.
fn pack_right(b: Strided) -> Vec<u16> {
    let (cblocks, kblocks) = (b.cols.div_ceil(TILE), b.rows.div_ceil(DEPTH));
    let mut out = vec![0u16; cblocks * kblocks * TILE_VALUES];
    out.par_chunks_mut(TILE_VALUES)
        .enumerate()
        .for_each(|(t, tile)| right_tile(&b, (t % kblocks) * DEPTH, (t / kblocks) * TILE, tile));
    out
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounded(x: f32) -> f32 {
        f32::from_bits((bf16_bits(x) as u32) << 16)
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(rounded(1.0), 1.0);
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(rounded(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(rounded(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert!(rounded(f32::NAN).is_nan());
        assert_eq!(rounded(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn vector_packers_pack_the_same_bits_as_the_scalar_ones() {
        if !vector_packing() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = crate::util::Rng::new(9);
        let data: Vec<f32> = (0..64 * 80).map(|_| rng.normal() as f32).collect();
        for (rs, cs) in [(80, 1), (1, 64)] {
            let m = Strided {
                data: &data,
                rows: 64,
                cols: 80,
                rs,
                cs,
            };
            let scalar = |tile: &mut [u16], f: &dyn Fn(usize, usize) -> f32, right: bool| {
                for i in 0..TILE {
                    for j in 0..DEPTH {
                        let slot = if right {
                            (j / 2) * DEPTH + i * 2 + j % 2
                        } else {
                            i * DEPTH + j
                        };
                        tile[slot] = bf16_bits(f(i, j));
                    }
                }
            };
            let (mut fast, mut plain) = ([0u16; TILE_VALUES], [0u16; TILE_VALUES]);
            left_tile(&m, 16, 32, &mut fast);
            scalar(&mut plain, &|r, j| m.at(16 + r, 32 + j), false);
            assert_eq!(fast, plain, "left tile, strides ({rs}, {cs})");
            right_tile(&m, 32, 48, &mut fast);
            scalar(&mut plain, &|c, j| m.at(32 + j, 48 + c), true);
            assert_eq!(fast, plain, "right tile, strides ({rs}, {cs})");
        }
    }

    #[test]
    fn every_kernel_matches_a_plain_product_of_the_rounded_operands() {
        let kernels: Vec<Kernel> = [Kernel::Avx512Bf16, Kernel::AmxBf16]
            .into_iter()
            .filter(|&k| k <= best_available())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has no bf16 kernel");
            return;
        }
        let mut rng = crate::util::Rng::new(5);
        // Edges in every dimension, either operand transposed, one single row, several row
        // parts and column chunks, and the AVX-512 kernel's column-tile remainders (1-3 tiles).
        for (m, n, k, transpose_a, transpose_b) in [
            (37, 45, 70, false, false),
            (64, 64, 64, false, true),
            (1, 300, 33, false, true),
            (33, 1, 5, false, false),
            (9, 208, 40, true, false),
            (40, 230, 96, true, true),
            (200, 20, 64, true, false),
            (3, 17, 31, true, true),
        ] {
            let av: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let matrix = |data, rows, cols, transposed| Strided {
                data,
                rows,
                cols,
                rs: if transposed { 1 } else { cols },
                cs: if transposed { rows } else { 1 },
            };
            let (a, b) = (
                matrix(&av, m, k, transpose_a),
                matrix(&bv, k, n, transpose_b),
            );
            for &kernel in &kernels {
                let c = matmul(kernel, a, b);
                assert_eq!(c.len(), m * n);
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|p| rounded(a.at(i, p)) as f64 * rounded(b.at(p, j)) as f64)
                            .sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                            "{kernel:?} ({m},{n},{k}) [{i},{j}]: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
