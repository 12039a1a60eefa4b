//! Seeds: which ones to run, and printing the seed of any failure.
//!
//! - `SEED=n`: run exactly seed `n` (replays a failure).
//! - `SEEDS=k`: run `k` seeds (a swarm), starting from the test's own base seed.
//! - neither: the test's default count, starting from a base seed derived from its name, so
//!   CI runs are reproducible.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// A stable 64-bit hash of a name (FNV-1a), used as a test's base seed.
pub fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn env_u64(key: &str) -> Option<u64> {
    let v = std::env::var(key).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{key}={v:?} is not a whole number"),
    }
}

/// The seeds to run for test `name`, `default_count` of them unless the environment says otherwise.
pub fn seeds_for(name: &str, default_count: u64) -> Vec<u64> {
    if let Some(s) = env_u64("SEED") {
        return vec![s];
    }
    let count = env_u64("SEEDS").unwrap_or(default_count);
    let base = name_seed(name) % 1_000_000_000;
    (0..count).map(|i| base + i).collect()
}

/// Runs `run(seed)` for each seed of [`seeds_for`]; if one panics, prints how to replay it and
/// re-raises the panic.
pub fn run_seeds(name: &str, default_count: u64, mut run: impl FnMut(u64)) {
    for seed in seeds_for(name, default_count) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(seed))) {
            eprintln!("\n{name} FAILED with SEED={seed}\n  replay: SEED={seed} cargo test -- {name} --exact\n");
            resume_unwind(panic);
        }
    }
}
