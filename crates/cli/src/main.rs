//! `sixfive`: the command line of the sixfive distributed-systems stack.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use sixfive_raft_sim::swarm::{self, SwarmReport};
use sixfive_sim::SEC;

/// The allocator: glibc's malloc and free took a tenth of the CPU of a loaded cluster; jemalloc
/// (TiKV's choice) gave 7-14% more writes/s and 10-23% more reads/s in `bench kv`. mimalloc
/// was tried and rejected: it hands a free made on another thread back to the allocating
/// thread, so the node's loop paid again for what the free-on-a-thread helpers took off it,
/// and writes' p99 doubled.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod bench_kv;
mod kv;
mod shardkv;

#[derive(Parser)]
#[command(name = "sixfive", version, about = "Raft, replicated KV, sharded KV and MapReduce, made real")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs clusters inside the deterministic simulator.
    Sim {
        #[command(subcommand)]
        what: SimCommand,
    },
    /// MapReduce: coordinator, workers, the sequential reference, and whole local jobs.
    Mr {
        #[command(subcommand)]
        what: sixfive_mapreduce::cli::MrCommand,
    },
    /// The replicated key/value service as real processes: servers, a local cluster, a client.
    Kv {
        #[command(subcommand)]
        what: kv::KvCommand,
    },
    /// The sharded key/value service as real processes: controller and group servers, a local
    /// deployment, administration, a client.
    Shardkv {
        #[command(subcommand)]
        what: shardkv::ShardCommand,
    },
    /// Measures; prints figures.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The replicated KV on a fresh local three-member cluster (data on disk): writes/s and
    /// linearizable reads/s with latency percentiles, fsyncs per write, peak RSS.
    Kv(bench_kv::Options),
    /// CPU cost of consensus: three in-process nodes with no IO replicate and commit entries.
    RaftCore {
        /// Entries to commit.
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        /// Bytes per entry.
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Proposals between two Ready rounds (the batch the leader sends in one Append).
        #[arg(long, default_value_t = 64)]
        batch: u64,
    },
    /// Fsyncs per committed write on each node of a simulated three-node cluster (counted,
    /// not timed), writes waited for one at a time and in groups.
    Fsyncs {
        /// Writes to commit.
        #[arg(long, default_value_t = 1000)]
        writes: u64,
    },
    /// One snapshot of a large etcd-API state (`check perf`'s shape), phase by phase: the
    /// copy on the node's loop, the serialisation and write off it, the install, a restart.
    Snapshot {
        /// Distinct keys, each written once.
        #[arg(long, default_value_t = 300_000)]
        keys: u64,
        /// Key size in bytes (at least 8).
        #[arg(long, default_value_t = 256)]
        key_bytes: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 1024)]
        value_bytes: usize,
        /// Where the node keeps its log and snapshot (must not exist; removed afterwards).
        #[arg(long, default_value = "sixfive-bench-snapshot")]
        dir: std::path::PathBuf,
    },
    /// Word count on a generated corpus: a plain single-threaded Rust count vs MapReduce.
    Mr {
        /// Corpus size in MiB.
        #[arg(long, default_value_t = 128)]
        size_mib: u64,
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Directory of texts to draw lines from (default: the eight Gutenberg texts built
        /// into sixfive, so it runs from any directory).
        #[arg(long)]
        texts: Option<std::path::PathBuf>,
        /// Skip the Apache Spark run (it runs when python3 with pyspark and java are found).
        #[arg(long)]
        no_spark: bool,
        /// Keep the corpus and output.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// A Raft cluster under random crashes, partitions, message loss and torn writes, with every
    /// safety property checked after every event, then healed and required to make progress.
    Raft {
        /// How many seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed (runs `seed`, `seed + 1`, ...). A failure names the seed to replay.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Virtual seconds of faults per seed, before the healing phase.
        #[arg(long, default_value_t = 20)]
        fault_secs: u64,
        /// Print one line per seed.
        #[arg(long)]
        verbose: bool,
    },
    /// The fault-tolerant key/value service (Raft-replicated, exactly-once sessions, ReadIndex
    /// reads) under random partitions, crashes, loss and reordering; every history is checked
    /// for linearizability and every acknowledged write must survive.
    Kv {
        /// How many seeds to run.
        #[arg(long, default_value_t = 50)]
        seeds: u64,
        /// First seed (runs `seed`, `seed + 1`, ...). A failure names the seed to replay.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one line per seed.
        #[arg(long)]
        verbose: bool,
    },
    /// The sharded key/value service (a Raft-replicated shard controller and 2-4 replica groups
    /// of 3 servers) under random joins, leaves and moves, crashes, partitions, loss and
    /// reordering; no shard may be served by two groups in one configuration, every history
    /// must be linearizable and every acknowledged write must survive.
    Shardkv {
        /// How many seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed (runs `seed`, `seed + 1`, ...). A failure names the seed to replay.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one line per seed.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim { what: SimCommand::Raft { seeds, seed, fault_secs, verbose } } => {
            sim_raft(seeds, seed, fault_secs, verbose)
        }
        Command::Sim { what: SimCommand::Kv { seeds, seed, verbose } } => sim_kv(seeds, seed, verbose),
        Command::Sim { what: SimCommand::Shardkv { seeds, seed, verbose } } => sim_shardkv(seeds, seed, verbose),
        Command::Bench { what: BenchCommand::RaftCore { entries, size, batch } } => {
            bench::raft_core(entries, size, batch)
        }
        Command::Bench { what: BenchCommand::Fsyncs { writes } } => bench::fsyncs(writes),
        Command::Bench { what: BenchCommand::Snapshot { keys, key_bytes, value_bytes, dir } } => {
            bench::snapshot(keys, key_bytes, value_bytes, &dir)
        }
        Command::Bench { what: BenchCommand::Kv(o) } => bench_kv::run(o),
        Command::Bench { what: BenchCommand::Mr { size_mib, workers, texts, no_spark, keep } } => {
            bench::mapreduce(size_mib, workers, texts.as_deref(), !no_spark, keep)
        }
        Command::Kv { what } => kv::main(what),
        Command::Shardkv { what } => shardkv::main(what),
        Command::Mr { what } => {
            sixfive_mapreduce::cli::main(what, &sixfive_mapreduce::app::Registry::builtins(), &["mr"])
        }
    }
}

fn sim_raft(seeds: u64, first: u64, fault_secs: u64, verbose: bool) -> ExitCode {
    if seeds == 0 || fault_secs == 0 {
        eprintln!("error: --seeds and --fault-secs must be at least 1");
        return ExitCode::from(2);
    }
    // Keep the default panic message quiet: we print the seed ourselves.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut total = SwarmReport::default();
    let replay = format!("--fault-secs {fault_secs}");
    let passed = each_seed(
        "raft",
        first,
        seeds,
        &replay,
        |seed| swarm::run(seed, fault_secs * SEC),
        |r| {
            if verbose {
                println!(
                    "seed {:>6}: {} nodes, {:>4} proposed, {:>4} applied, {:>2} leaders, {:>2} crashes, {:>2} partitions, {:>3} reads, {:>6} events",
                    r.seed, r.nodes, r.proposed, r.applied, r.leaders, r.crashes, r.partitions, r.reads, r.events
                );
            }
            total.merge(&r);
        },
    );
    if !passed {
        return ExitCode::FAILURE;
    }
    let wall = started.elapsed().as_secs_f64();
    println!("{seeds} seeds passed: every safety check held after every event, and every healed cluster made progress");
    println!(
        "  {} commands proposed, {} entries applied, {} leaders elected, {} crashes, {} partitions, {} ReadIndex reads",
        total.proposed, total.applied, total.leaders, total.crashes, total.partitions, total.reads
    );
    println!(
        "  {} events over {:.0} virtual seconds in {:.1} s of wall time ({:.0}x real time)",
        total.events,
        total.virtual_micros as f64 / 1e6,
        wall,
        total.virtual_micros as f64 / 1e6 / wall.max(1e-9)
    );
    ExitCode::SUCCESS
}

/// Runs `run(seed)` for each seed and hands each report to `ok`. A panic (a violated check)
/// stops the loop with the seed and the command that replays it; returns whether all passed.
fn each_seed<R>(
    what: &str,
    first: u64,
    seeds: u64,
    replay_args: &str,
    run: impl Fn(u64) -> R,
    mut ok: impl FnMut(R),
) -> bool {
    for seed in first..first + seeds {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed))) {
            Ok(r) => ok(r),
            Err(e) => {
                eprintln!("seed {seed} FAILED: {}", panic_message(e.as_ref()));
                eprintln!("replay: sixfive sim {what} --seed {seed} --seeds 1 {replay_args}");
                return false;
            }
        }
    }
    true
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn sim_kv(seeds: u64, first: u64, verbose: bool) -> ExitCode {
    if seeds == 0 {
        eprintln!("error: --seeds must be at least 1");
        return ExitCode::from(2);
    }
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut total = sixfive_kv::swarm::KvSwarmReport::default();
    let passed = each_seed("kv", first, seeds, "", sixfive_kv::swarm::run, |r| {
        if verbose {
            println!(
                "seed {:>6}: {} servers, {} clients, {:>4} ops checked, {:>3} Puts and {:>3} Appends acknowledged, {:>2} crashes, {:>2} partitions",
                r.seed, r.servers, r.clients, r.ops, r.acked_puts, r.acked_appends, r.crashes, r.partitions
            );
        }
        total.merge(&r);
    });
    if !passed {
        return ExitCode::FAILURE;
    }
    println!("{seeds} seeds passed: every history linearizable, every acknowledged write present exactly once");
    println!(
        "  {} operations checked, {} Puts and {} Appends acknowledged, {} server crashes, {} partitions, {} events in {:.1} s",
        total.ops,
        total.acked_puts,
        total.acked_appends,
        total.crashes,
        total.partitions,
        total.events,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn sim_shardkv(seeds: u64, first: u64, verbose: bool) -> ExitCode {
    if seeds == 0 {
        eprintln!("error: --seeds must be at least 1");
        return ExitCode::from(2);
    }
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut total = sixfive_shardkv::swarm::ShardSwarmReport::default();
    let passed = each_seed("shardkv", first, seeds, "", sixfive_shardkv::swarm::run, |r| {
        if verbose {
            println!(
                "seed {:>6}: {} groups, {} clients, {:>4} ops checked, {:>3} Puts and {:>3} Appends acknowledged, {:>2} reconfigurations, {:>2} crashes, {:>2} partitions",
                r.seed, r.groups, r.clients, r.ops, r.acked_puts, r.acked_appends, r.reconfigs, r.crashes, r.partitions
            );
        }
        total.merge(&r);
    });
    if !passed {
        return ExitCode::FAILURE;
    }
    println!(
        "{seeds} seeds passed: no shard served by two groups in one configuration, every history linearizable, every acknowledged write present exactly once"
    );
    println!(
        "  {} operations checked, {} Puts and {} Appends acknowledged, {} reconfigurations, {} server crashes, {} partitions, {} events in {:.1} s",
        total.ops,
        total.acked_puts,
        total.acked_appends,
        total.reconfigs,
        total.crashes,
        total.partitions,
        total.events,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
