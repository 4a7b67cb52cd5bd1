//! The MPI world communicator (rsmpi) behind [`Collective`].

use super::Collective;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::Mutex;

/// MPI counts are C ints: larger buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

pub(super) struct MpiWorld {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    library: String,
}

// SAFETY: MPI is initialized with `Threading::Serialized` (checked in `init`), which lets any
// thread call it as long as calls never overlap; every call goes through the mutex.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Initializes MPI; training runs on a compute-pool thread, not the main one, hence Serialized.
pub(super) fn init() -> Result<(Universe, MpiWorld)> {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI was already initialized in this process");
    };
    if threading < Threading::Serialized {
        bail!(
            "this MPI library gives thread level {threading:?}; chatforge needs Serialized (rebuild Open MPI or MPICH with thread support)"
        );
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    let library = mpi::environment::library_version()
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("MPI")
        .split(',')
        .next()
        .unwrap_or("MPI")
        .trim()
        .to_string();
    Ok((
        universe,
        MpiWorld {
            comm: Mutex::new(comm),
            rank,
            size,
            library,
        },
    ))
}

impl MpiWorld {
    fn sum<T: Equivalence + Copy>(&self, values: &mut [T]) {
        let comm = self.comm.lock().expect("MPI lock");
        for chunk in values.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            comm.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, values: &mut [f32]) {
        self.sum(values)
    }
    fn sum_f64(&self, values: &mut [f64]) {
        self.sum(values)
    }
    fn gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let comm = self.comm.lock().expect("MPI lock");
        let len = i32::try_from(mine.len()).expect("a gathered part under 2 GB");
        let mut counts = vec![0i32; self.size];
        comm.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, &n| {
                let start = *at;
                *at += n;
                Some(start)
            })
            .collect();
        let mut all = vec![0u8; counts.iter().map(|&n| n as usize).sum()];
        {
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(mine, &mut parts);
        }
        counts
            .iter()
            .zip(&displs)
            .map(|(&n, &d)| all[d as usize..(d + n) as usize].to_vec())
            .collect()
    }
    fn abort(&self, code: i32) -> ! {
        // Not through the mutex: a thread may hold it, blocked in a collective.
        SimpleCommunicator::world().abort(code)
    }
    fn backend(&self) -> String {
        format!("MPI ({}), {} ranks", self.library, self.size)
    }
}
