//! The `chatforge` binary: sets the allocator, parses the command line and hands it to
//! `chatforge::cli`, and prints any error. Under mpirun it first joins the job (`chatforge::dist`).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    park_candle_workers();
    let cli = chatforge::cli::Cli::parse();
    // Under mpirun: join the job (and share this host's cores) before any thread starts.
    let _membership = match chatforge::dist::join(&cli.command_name(), cli.runs_distributed()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // A server's memory should go back down after a burst; training wants it kept.
    if !cli.owns_threads() {
        keep_freed_memory();
    }
    // The server keeps its own threads and runs the model on the engine's (see `Engine::start`).
    let result = if cli.owns_threads() {
        cli.run()
    } else {
        chatforge::util::on_compute_pool(|| cli.run())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let world = chatforge::dist::world();
            if world.size() > 1 {
                // The other ranks may be waiting in a collective for this one: end them all.
                eprintln!("error on rank {}: {e:#}", world.rank());
                world.abort(1);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// Training allocates and frees many large tensors per step; glibc returns them to the OS and pays
// page faults to get them back. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to hand freed memory back to the OS. By default it purges after 10 ms, and
/// a training step frees and reallocates its activations (hundreds of MB) every step: the kernel
/// then zeroed the pages again on each fault, a quarter of the step's time (measured with
/// `perf`; `bench train` went from 1.9 to 1.6 s/step, system time 6.3 to 1.5 s). The cost is
/// that the process keeps its peak memory. `MIMALLOC_PURGE_DELAY` still overrides this.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc's option enum (mimalloc.h, v2 and v3 alike), which
    // libmimalloc-sys's bindings leave out: it sits between `eager_commit_delay` (14) and
    // `use_numa_nodes` (16).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it on later frees.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// candle runs its elementwise ops on a thread pool of its own, whose workers spin 25,000 rounds
/// waiting for the next op before they sleep: on a machine with as many cores as rayon threads,
/// that spinning takes a core from the matmuls. Parking at once measured 0.60 → 0.52 s per
/// `bench train` step in bf16 and 0.79 → 0.71 in f32 on 2 cores. Before any thread starts; a
/// value the user set wins.
fn park_candle_workers() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "0");
    }
}
