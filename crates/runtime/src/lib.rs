//! # sixfive-runtime: the production driver of the seams in `sixfive-rpc`
//!
//! The simulator's `World` drives [`sixfive_rpc::Node`]s in virtual time; this crate drives the
//! same nodes with tokio, TCP and files, so the server code the simulator proves is the code
//! that runs:
//!
//! - [`driver`]: one event loop per server, on its own thread, delivering timers, peer messages
//!   and client requests to the node exactly as `World` does, in batches (group commit);
//! - [`frame`] and [`proto`]: length-prefixed, checksummed frames and the messages in them;
//! - [`peer`]: one TCP connection per pair of members, a cluster-id handshake, bounded queues,
//!   reconnection with backoff;
//! - [`client`]: [`client::TcpTransport`], a [`sixfive_rpc::Transport`] over TCP for the clerks;
//! - [`server`]: the replicated key/value server (etcd-style configuration, locked data
//!   directory, graceful stop on SIGTERM, `/metrics` and `/health`);
//! - [`etcd`]: etcd's v3 API on the client port (`--api etcd`), over the same server, with
//!   requests forwarded from followers to the leader over the peer connections;
//! - [`metrics`]: Prometheus metrics and the storage wrapper that times each sync;
//! - [`shard`]: the sharded service's servers (controller and replica-group members), their
//!   address-named peer links and the clerks' [`shard::ShardTransport`].
#![deny(missing_docs)]

pub mod client;
pub mod driver;
pub mod etcd;
pub mod frame;
pub mod members;
pub mod metrics;
pub mod outbox;
pub mod peer;
pub mod proto;
pub mod server;
pub mod shard;

/// A loopback port nothing listens on and this process has not given out yet, taken below the
/// kernel's ephemeral range (32768-60999 by default): a port picked by binding port 0 is in
/// that range, and between the pick and the server's bind an outgoing connection of another
/// process may take it ("Address already in use"). For tests and benchmarks that start
/// servers on ports of their own.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes started one after another (test binaries of one `cargo test`) start at
    // different places in the span, so that a server left over from an earlier one is not in
    // the way.
    let start = (std::process::id() * 97) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left in {LOW}..{}", LOW + SPAN);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Sends `tracing` logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
