//! The AMX kernel: a tile multiply does 16·16·32 multiply-adds in one instruction, several times
//! the fp32 AVX-512 rate. Stable Rust has no AMX intrinsics, so the tile instructions are inline
//! assembly. It reads the packed layout `super` describes: a left tile is a 16 × 32 tile register
//! as it is, a right tile the pairwise operand `tdpbf16ps` takes.

use super::{round_up, DEPTH, TILE, TILE_VALUES};
use rayon::prelude::*;

/// Columns of the result one task computes, so that its packed right operand stays in L2.
const COLUMNS_PER_TASK: usize = 256;

/// Whether this CPU has AMX bf16 and the kernel allowed this process to use the tile registers.
#[cfg(target_arch = "x86_64")]
pub(super) fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    // The packers convert with AVX-512 BF16, which every AMX CPU so far also has.
    super::vector_packing() && request_tile_permission()
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn detect() -> bool {
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

/// `left · right` (packed by `pack_left` and `pack_right` from `[m, k]` and `[k, n]`) as a new
/// row-major `[m, n]` matrix: 2 × 2 tiles of the result per kernel call, column chunks (and row
/// parts when there are few chunks) spread over rayon's threads.
pub(super) fn product(left: &[u16], right: &[u16], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    let kblocks = k.div_ceil(DEPTH).max(1);
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
    let out = crate::model::kernels::SharedOut(padded.as_mut_ptr());
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
