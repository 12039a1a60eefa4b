//! A single-member, in-memory etcd-API server on a given address (default 127.0.0.1:2379):
//! what `etcdctl` or any etcd client can talk to until `sixfive kv serve` serves the API on a
//! replicated cluster.
//!
//! `cargo run --release -p sixfive-etcd --example serve -- 127.0.0.1:2379`

use std::sync::Arc;

use sixfive_etcd::{Config, EtcdService, LocalReplica, ServiceConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:2379".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("serving etcd's v3 API on http://{}", listener.local_addr()?);
    let replica = Arc::new(LocalReplica::new(Config::default()));
    EtcdService::new(replica, ServiceConfig::default())
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
