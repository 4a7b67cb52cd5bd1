//! bf16 matrix products on Intel AMX tiles, for mixed-precision training (`--precision bf16`):
//! operands are rounded to bf16 as they are packed, products accumulate in f32, and everything
//! outside the matmuls stays f32 (PyTorch's CPU autocast does the same). On the CPUs that have it
//! an AMX tile multiply does 16·16·32 multiply-adds in one instruction, several times the fp32
//! AVX-512 rate; the `gemm` crate has no AMX path, hence our own kernel. Stable Rust has no AMX
//! intrinsics, so the tile instructions are inline assembly.
//!
//! Layout: the left operand is packed into 16-row × 32-deep tiles (64 bytes a row), the right
//! operand into 16-pair × 16-column tiles in the pairwise ("VNNI") order the dot-product
//! instruction reads; both are zero-padded to whole tiles, so edges need no special kernel.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows (and columns) of a tile of the result; the depth of a tile product.
const TILE: usize = 16;
const DEPTH: usize = 32;
/// Columns of the result one task computes, so that its packed right operand stays in L2.
const COLUMNS_PER_TASK: usize = 256;

/// Whether this CPU has AMX bf16 and the kernel allowed this process to use the tile registers.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    // The packers convert with AVX-512 BF16, which every AMX CPU so far also has.
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16"))
    {
        return false;
    }
    request_tile_permission()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Linux hands out the 8 KB of tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
/// XFEATURE_XTILEDATA); without it the first tile instruction kills the process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
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
    if rows == TILE && depth == DEPTH && (a.cs == 1 || a.rs == 1) && available() {
        // SAFETY: `available` checked the AVX-512 features; the tile is whole, so every load
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
    if depth == DEPTH && cols == TILE && (b.cs == 1 || b.rs == 1) && available() {
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

/// The left operand `[m, k]` as tiles: tile (row block rb, depth block kb) at
/// `(rb · kblocks + kb) · 512`.
fn pack_left(a: Strided) -> Vec<u16> {
    let (rblocks, kblocks) = (a.rows.div_ceil(TILE), a.cols.div_ceil(DEPTH));
    let mut out = vec![0u16; rblocks * kblocks * TILE_VALUES];
    out.par_chunks_mut(TILE_VALUES)
        .enumerate()
        .for_each(|(t, tile)| left_tile(&a, (t / kblocks) * TILE, (t % kblocks) * DEPTH, tile));
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

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
fn tile_config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        // colsb[t] (u16 at 16 + 2t) and rows[t] (u8 at 48 + t).
        c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        c[48 + t] = TILE as u8;
    }
    TileConfig(c)
}

/// `c (16·rows_out × 16·cols_out, up to 2 × 2 tiles) = a_tiles · b_tiles` over `kblocks` depth
/// blocks, stored to `out` (row stride `ld` floats). Tiles 0-3 accumulate, 4-5 hold the left
/// operand, 6-7 the right.
///
/// SAFETY: the tile configuration must be loaded; `a0`/`a1` and `b0`/`b1` must each point at
/// `kblocks` consecutive 1 KB tiles, and `out` at room for a 32 × 32 block with row stride `ld`.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_2x2(
    a: [*const u16; 2],
    b: [*const u16; 2],
    kblocks: usize,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::asm;
    const TILE_BYTES: usize = TILE * DEPTH * 2;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3"
    );
    for kb in 0..kblocks {
        let off = kb * TILE_BYTES;
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) (a[0] as *const u8).add(off),
            a1 = in(reg) (a[1] as *const u8).add(off),
            b0 = in(reg) (b[0] as *const u8).add(off),
            b1 = in(reg) (b[1] as *const u8).add(off),
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    let stride = ld * 4;
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) out,
        c01 = in(reg) out.add(TILE),
        c10 = in(reg) out.add(TILE * ld),
        c11 = in(reg) out.add(TILE * ld + TILE),
        s = in(reg) stride,
        options(nostack),
    );
}

/// `a [m, k] · b [k, n]` as a new row-major `[m, n]` f32 matrix, with the operands rounded to
/// bf16 and the products summed in f32. Call only when [`available`].
pub fn matmul(a: Strided, b: Strided) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "amx::matmul: inner dimensions differ");
    assert!(available(), "amx::matmul called without AMX");
    // The vector packers read whole runs through raw pointers: every element must exist.
    for (x, side) in [(&a, "left"), (&b, "right")] {
        assert!(
            x.rows == 0 || x.cols == 0 || (x.rows - 1) * x.rs + (x.cols - 1) * x.cs < x.data.len(),
            "amx::matmul: the {side} operand is shorter than its shape"
        );
    }
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let kblocks = k.div_ceil(DEPTH).max(1);
    let (left, right) = rayon::join(|| pack_left(a), || pack_right(b));
    // The result in whole 32 × 32 blocks; trimmed to [m, n] below when padded.
    let (mp, np) = (round_up(m, 2 * TILE), round_up(n, 2 * TILE));
    // Every 32 × 32 block is stored by exactly one task below, so no zeroing first.
    let mut padded: Vec<f32> = Vec::with_capacity(mp * np);
    let per_task = COLUMNS_PER_TASK.min(np);
    let tasks = np.div_ceil(per_task);
    let row_blocks = mp / (2 * TILE);
    // Split rows as well when there are too few column chunks to keep every thread busy.
    let row_split = rayon::current_num_threads()
        .div_ceil(tasks)
        .min(row_blocks)
        .max(1);
    let out = super::kernels::SharedOut(padded.as_mut_ptr());
    (0..tasks * row_split).into_par_iter().for_each(|task| {
        let (chunk, part) = (task / row_split, task % row_split);
        let cols = chunk * per_task..((chunk + 1) * per_task).min(np);
        let rows = part * row_blocks / row_split..(part + 1) * row_blocks / row_split;
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX exists only on x86_64 ({:?})", (&left, &right, rows, cols, out.0));
        #[cfg(target_arch = "x86_64")]
        let config = tile_config();
        // SAFETY: the configuration is a valid palette-1 layout; every tile pointer below stays
        // inside the packed operands (padded to whole blocks), and each task writes a disjoint
        // set of 32 × 32 blocks of `padded`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            for rb in rows {
                let r0 = 2 * rb;
                let a0 = left.as_ptr().add(r0 * kblocks * TILE_VALUES);
                let a1 = if (r0 + 1) * TILE < round_up(m, TILE) {
                    left.as_ptr().add((r0 + 1) * kblocks * TILE_VALUES)
                } else {
                    a0
                };
                for c0 in (cols.start..cols.end).step_by(2 * TILE) {
                    let cb = c0 / TILE;
                    let b0 = right.as_ptr().add(cb * kblocks * TILE_VALUES);
                    let b1 = if (cb + 1) * TILE < round_up(n, TILE) {
                        right.as_ptr().add((cb + 1) * kblocks * TILE_VALUES)
                    } else {
                        b0
                    };
                    let dst = out.at(r0 * TILE * np + c0);
                    kernel_2x2([a0, a1], [b0, b1], kblocks, dst, np);
                }
            }
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    });
    // SAFETY: the tasks above wrote all mp × np values.
    unsafe { padded.set_len(mp * np) };
    if mp == m && np == n {
        return padded;
    }
    let mut trimmed = Vec::with_capacity(m * n);
    for r in 0..m {
        trimmed.extend_from_slice(&padded[r * np..r * np + n]);
    }
    trimmed
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
        if !available() {
            eprintln!("skipped: this CPU has no AMX bf16");
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
    fn tile_products_match_a_plain_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX bf16");
            return;
        }
        let mut rng = crate::util::Rng::new(5);
        // Edges in every dimension, a transposed operand, and one single row.
        for (m, n, k, transpose_b) in [
            (37, 45, 70, false),
            (64, 64, 64, true),
            (1, 300, 33, true),
            (33, 1, 5, false),
        ] {
            let av: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let a = Strided {
                data: &av,
                rows: m,
                cols: k,
                rs: k,
                cs: 1,
            };
            let b = if transpose_b {
                Strided {
                    data: &bv,
                    rows: k,
                    cols: n,
                    rs: 1,
                    cs: k,
                }
            } else {
                Strided {
                    data: &bv,
                    rows: k,
                    cols: n,
                    rs: n,
                    cs: 1,
                }
            };
            let c = matmul(a, b);
            assert_eq!(c.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| rounded(a.at(i, p)) as f64 * rounded(b.at(p, j)) as f64)
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                        "({m},{n},{k}) [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
