//! The AVX512-BF16 kernel: `vdpbf16ps` adds, in each of 16 f32 lanes, the products of one pair of
//! bf16 values, so one instruction is 32 multiply-adds, twice an fp32 FMA's 16. The packed right
//! tile is already in its pair order: a 64-byte row holds depth pair p of 16 columns. The left
//! operand's pair (row r, depths 2p and 2p+1) is one 32-bit word, broadcast to every lane; the
//! left tiles may hold their words in row or pair order (`LeftOrder`), whichever was cheaper to
//! pack.
//!
//! A kernel call computes 8 rows × up to 3 column tiles (48 columns): 24 accumulators, 3 loads of
//! the right operand and 8 broadcasts per 24 dot products, in the 32 vector registers.

use super::{LeftOrder, DEPTH, TILE, TILE_VALUES};
use crate::model::kernels::SharedOut;
use rayon::prelude::*;

/// Rows of the result a kernel call computes (half a left tile).
const ROWS: usize = 8;
/// Column tiles of the result a kernel call computes at most.
const COLUMN_TILES: usize = 3;
/// Column tiles one task computes, so that its packed right operand stays in L2 (1 MB on Zen 4)
/// for every k up to 2,048.
const TILES_PER_TASK: usize = 12;

/// `left · right` (packed by `pack_left` and `pack_right` from `[m, k]` and `[k, n]`) as a new
/// row-major `[m, n]` matrix. Tasks take column chunks, and row parts when there are few chunks.
pub(super) fn product(
    left: &[u16],
    order: LeftOrder,
    right: &[u16],
    (m, n, k): (usize, usize, usize),
) -> Vec<f32> {
    let (row_words, pair_words) = order.word_strides();
    let kblocks = k.div_ceil(DEPTH).max(1);
    let (row_tiles, column_tiles) = (m.div_ceil(TILE), n.div_ceil(TILE));
    assert!(left.len() >= row_tiles * kblocks * TILE_VALUES);
    assert!(right.len() >= column_tiles * kblocks * TILE_VALUES);
    // Every element is stored by exactly one kernel call below, so no zeroing first.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let chunks = column_tiles.div_ceil(TILES_PER_TASK);
    let row_halves = m.div_ceil(ROWS);
    let row_split = rayon::current_num_threads()
        .div_ceil(chunks)
        .min(row_halves)
        .max(1);
    let dst = SharedOut(out.as_mut_ptr());
    (0..chunks * row_split).into_par_iter().for_each(|task| {
        let (chunk, part) = (task / row_split, task % row_split);
        let tiles = chunk * TILES_PER_TASK..((chunk + 1) * TILES_PER_TASK).min(column_tiles);
        let halves = part * row_halves / row_split..(part + 1) * row_halves / row_split;
        for half in halves {
            let r0 = half * ROWS;
            let rows = ROWS.min(m - r0);
            // Row r0 is row r0 % 16 of left tile r0 / 16; its depth blocks follow one another.
            let a = &left[(r0 / TILE) * kblocks * TILE_VALUES + (r0 % TILE) * 2 * row_words..];
            for t0 in tiles.clone().step_by(COLUMN_TILES) {
                let count = COLUMN_TILES.min(tiles.end - t0);
                let b = &right[t0 * kblocks * TILE_VALUES..];
                let cols = (n - t0 * TILE).min(count * TILE);
                // SAFETY: `vector_packing` (checked by `super::matmul`) means AVX512-BF16 is
                // there; `a` holds `kblocks` tiles from row r0 on and `b` `count · kblocks`
                // tiles (the asserts above); the call writes rows r0.. r0+rows and columns
                // t0·16.. t0·16+cols of `out`, which no other call writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let c = dst.at(r0 * n + t0 * TILE);
                    let strides = (row_words, pair_words);
                    match count {
                        3 => kernel::<3>(a, strides, b, kblocks, (rows, cols), c, n),
                        2 => kernel::<2>(a, strides, b, kblocks, (rows, cols), c, n),
                        _ => kernel::<1>(a, strides, b, kblocks, (rows, cols), c, n),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("AVX512-BF16 exists only on x86_64 ({a:?}, {b:?}, {cols})");
            }
        }
    });
    // SAFETY: the kernel calls above wrote all m × n values.
    unsafe { out.set_len(m * n) };
    out
}

/// `ROWS × 16·T` of the result from left rows `a` (the word of row r and pair p at
/// `r · row_words + p · pair_words` within a tile, tiles `TILE_VALUES` apart) and `T` consecutive
/// right column tiles `b` (each `kblocks` tiles long),
/// stored to `c` (row stride `ld`) for the first `rows` rows and `cols` columns.
///
/// SAFETY: AVX512-F, -BW and -BF16 must be present; `a` must hold `kblocks` tiles from its start
/// (less the rows above it), `b` `T · kblocks` tiles, and `c` room for `rows` rows of `cols`
/// columns with row stride `ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const T: usize>(
    a: &[u16],
    (row_words, pair_words): (usize, usize),
    b: &[u16],
    kblocks: usize,
    (rows, cols): (usize, usize),
    c: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(T <= COLUMN_TILES && rows <= ROWS && cols <= T * TILE);
    let mut acc = [[_mm512_setzero_ps(); T]; ROWS];
    let (a, b) = (a.as_ptr().cast::<i32>(), b.as_ptr());
    let column_stride = kblocks * TILE_VALUES;
    for kb in 0..kblocks {
        let a_tile = a.add(kb * TILE_VALUES / 2);
        let b_tile = b.add(kb * TILE_VALUES);
        for pair in 0..DEPTH / 2 {
            let mut right = [_mm512_setzero_si512(); T];
            for (t, r) in right.iter_mut().enumerate() {
                *r = _mm512_loadu_si512(b_tile.add(t * column_stride + pair * DEPTH).cast());
            }
            for (row, acc_row) in acc.iter_mut().enumerate() {
                let word = a_tile
                    .add(row * row_words + pair * pair_words)
                    .read_unaligned();
                let left: __m512bh = std::mem::transmute(_mm512_set1_epi32(word));
                for (acc, r) in acc_row.iter_mut().zip(&right) {
                    *acc =
                        _mm512_dpbf16_ps(*acc, left, std::mem::transmute::<__m512i, __m512bh>(*r));
                }
            }
        }
    }
    for (row, acc_row) in acc.iter().enumerate().take(rows) {
        let dst = c.add(row * ld);
        for (t, acc) in acc_row.iter().enumerate() {
            let left_over = cols.saturating_sub(t * TILE);
            if left_over >= TILE {
                _mm512_storeu_ps(dst.add(t * TILE), *acc);
            } else if left_over > 0 {
                let mask = ((1u32 << left_over) - 1) as __mmask16;
                _mm512_mask_storeu_ps(dst.add(t * TILE), mask, *acc);
            }
        }
    }
}
