//! Data parallelism: several processes (ranks) train one model together.
//!
//! Every rank holds the whole model and draws the same global batch from the same seeded RNG;
//! each computes the loss of its own slice of rows ([`Part`]), the gradients are summed across
//! ranks, and every rank takes the same optimizer step, so the weights never drift apart. A
//! command therefore gives the same run on 1 or N ranks (to rounding), and a checkpoint written
//! by one rank count resumes under another. Rank 0 alone evaluates and writes.
//!
//! The collective library is MPI (the `mpi` cargo feature, through rsmpi over the system's Open
//! MPI or MPICH), so `mpirun` starts, places and tears down the ranks, across hosts too: a rank
//! that dies ends the job, and mpirun names it. Without the feature, or started without a
//! launcher, the process is alone and nothing here costs anything.

#[cfg(feature = "mpi")]
mod mpi_world;

use anyhow::Result;
use candle_core::Tensor;
use std::ops::Range;
use std::sync::OnceLock;

/// The ranks of one job and the collective operations the training loop needs.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their element-wise sum over all ranks.
    fn sum_f32(&self, values: &mut [f32]);
    fn sum_f64(&self, values: &mut [f64]);
    /// Every rank's `mine`, in rank order, on every rank.
    fn gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// Ends every rank of the job with `code` (one rank failing would leave the others waiting
    /// in a collective forever).
    fn abort(&self, code: i32) -> !;
    /// What carries the collectives, for logs.
    fn backend(&self) -> String;
}

/// One process: sums are the values themselves.
struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) {}
    fn sum_f64(&self, _: &mut [f64]) {}
    fn gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn backend(&self) -> String {
        "one process".into()
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// This process's job: set up by [`join`], one process otherwise.
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(Alone)).as_ref()
}

/// Whether this rank writes checkpoints, metrics, reports and the finished run.
pub fn is_leader() -> bool {
    world().rank() == 0
}

/// Keeps the collective library up while it lives (MPI is finalized when it drops).
pub struct Membership {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// The job size a launcher (Open MPI's or MPICH's mpirun, srun with PMI) announced, if any.
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// How many ranks share this host, from the launcher.
fn ranks_on_this_host() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(1)
}

/// Joins the job a launcher started this process in, before any thread starts; alone otherwise.
/// A `command` that does not run across ranks (`runs_distributed` false) is refused under a
/// launcher with more than one rank. The ranks on one host share its cores: each gets
/// `cores / ranks` compute threads unless `RAYON_NUM_THREADS` says otherwise (mpirun's default
/// binding to a core already gives 1).
pub fn join(command: &str, runs_distributed: bool) -> Result<Membership> {
    let alone = || Membership {
        #[cfg(feature = "mpi")]
        _universe: None,
    };
    let Some(size) = launched_size() else {
        return Ok(alone());
    };
    if !runs_distributed {
        if size > 1 {
            anyhow::bail!(
                "`chatforge {command}` runs in one process, but mpirun started {size}; run it without mpirun (pretrain, sft, reward, rlhf and data prepare run across ranks)"
            );
        }
        return Ok(alone());
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / ranks_on_this_host()).max(1);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    #[cfg(feature = "mpi")]
    {
        let _ = size;
        let (universe, world) = mpi_world::init()?;
        if WORLD.set(Box::new(world)).is_err() {
            // Something asked for the world before joining: it would act alone on every rank.
            anyhow::bail!("internal error: MPI was joined after the process had acted alone");
        }
        Ok(Membership {
            _universe: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        if size > 1 {
            anyhow::bail!(
                "started by mpirun with {size} ranks, but this chatforge was built without MPI; rebuild it with `cargo install --path . --features mpi` (needs Open MPI or MPICH with its -dev package, and libclang)"
            );
        }
        Ok(Membership {})
    }
}

/// A rank's share of a batch: part `index` of `count` equal slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl Part {
    /// The whole batch (one process).
    pub const WHOLE: Part = Part { index: 0, count: 1 };

    /// This rank's part.
    pub fn of_world() -> Part {
        let w = world();
        Part {
            index: w.rank(),
            count: w.size(),
        }
    }

    /// This part's rows of a batch of `n` (contiguous; sizes differ by at most one).
    pub fn rows(self, n: usize) -> Range<usize> {
        n * self.index / self.count..n * (self.index + 1) / self.count
    }

    /// The fraction of a batch of `n` rows this part holds.
    pub fn share(self, n: usize) -> f64 {
        self.rows(n).len() as f64 / n.max(1) as f64
    }
}

/// Refuses a global batch of `n` rows that `ranks` cannot split evenly, naming the flag, so every
/// rank does the same work and the run matches a single process's.
pub fn check_divides(flag: &str, n: usize, ranks: usize) -> Result<()> {
    if !n.is_multiple_of(ranks) {
        anyhow::bail!(
            "{flag} {n} is the global batch and must split evenly over the {ranks} ranks; use a multiple of {ranks}"
        );
    }
    Ok(())
}

/// Every rank's `mine`, in rank order, on every rank (as JSON: what is gathered is small, a
/// rollout's samples).
pub fn gather<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &dyn Collective,
    mine: &T,
) -> Result<Vec<T>> {
    let bytes = serde_json::to_vec(mine)?;
    world
        .gather_bytes(&bytes)
        .iter()
        .map(|b| Ok(serde_json::from_slice(b)?))
        .collect()
}

/// The element-wise sums of f32 tensors over all ranks, in their shapes (one collective call).
pub fn sum_tensors(world: &dyn Collective, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if world.size() == 1 {
        return Ok(tensors.to_vec());
    }
    let mut flat: Vec<f32> = Vec::with_capacity(tensors.iter().map(|t| t.elem_count()).sum());
    for t in tensors {
        flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    world.sum_f32(&mut flat);
    let mut at = 0;
    tensors
        .iter()
        .map(|t| {
            let n = t.elem_count();
            let part = Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?;
            at += n;
            Ok(part)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_a_batch_once_in_order() {
        for n in [1usize, 7, 8, 33] {
            for count in 1..=4usize {
                let ranges: Vec<Range<usize>> = (0..count)
                    .map(|index| Part { index, count }.rows(n))
                    .collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().unwrap().end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{n} rows, {count} parts");
                }
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{sizes:?}");
                let shares: f64 = (0..count).map(|index| Part { index, count }.share(n)).sum();
                assert!((shares - 1.0).abs() < 1e-12);
            }
        }
        assert!(check_divides("--batch-size", 6, 4).is_err());
        assert!(check_divides("--batch-size", 8, 4).is_ok());
    }

    #[test]
    fn gathered_floats_keep_their_bits() {
        // What ranks exchange (scores, log-probabilities) must decide the same on every rank.
        let mut rng = crate::util::Rng::new(3);
        let wide: Vec<f64> = (0..20_000)
            .map(|_| rng.normal() * 10f64.powi((rng.below(40) as i32) - 20))
            .collect();
        let narrow: Vec<f32> = wide.iter().map(|&x| x as f32).collect();
        let got = gather(&Alone, &(wide.clone(), narrow.clone())).unwrap();
        assert_eq!(got.len(), 1);
        let (w, n) = &got[0];
        assert!(w.iter().zip(&wide).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(n
            .iter()
            .zip(&narrow)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
