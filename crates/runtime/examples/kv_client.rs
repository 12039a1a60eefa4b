//! Uses a running cluster from a Rust program: start one with `sixfive kv cluster`, then
//! `cargo run -p sixfive-runtime --example kv_client [endpoints]`.

use sixfive_kv::KvClient;
use sixfive_runtime::client::{Cluster, random_u64};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoints = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:2379,http://127.0.0.1:22379,http://127.0.0.1:32379".into());
    let urls: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let cluster = Cluster::connect(&urls, 1_000_000).await?;
        let mut kv = cluster.clerk(random_u64()); // the clerk the simulator tests, over TCP
        let version = kv.get("visits").await.map(|(_, v)| v).unwrap_or(0);
        let old = kv.append("visits", "+").await?; // exactly once, even if a reply is lost
        println!("visits: {old}+ (version {} before)", version);
        for (key, value, version) in kv.scan("", None, 10).await? {
            println!("{key} = {value} (version {version})");
        }
        Ok(())
    })
}
