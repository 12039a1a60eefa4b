//! `etcd-load --endpoints URLS --clients N --secs S --key-size K --value-size V`: the load of
//! `sixfive bench kv` against etcd: N concurrent clients, S seconds of Puts (each client on its
//! own 16 keys), then S seconds of linearizable Gets. Prints one line per phase:
//! `writes|reads OPS SECS P50_US P99_US P999_US`.

use std::time::{Duration, Instant};

use etcd_client::Client;
use hdrhistogram::Histogram;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

async fn phase(clients: &[Client], n: usize, secs: f64, key_size: usize, value: &str, write: bool) -> (u64, f64, Histogram<u64>) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n {
        let mut client = clients[c % clients.len()].clone();
        let value = value.to_string();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut ops = 0u64;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let key = format!("{:0>width$}", format!("{c}-{}", i % 16), width = key_size);
                let t = Instant::now();
                if write {
                    client.put(key, value.clone(), None).await.expect("put");
                } else {
                    client.get(key, None).await.expect("get");
                }
                h.record(t.elapsed().as_micros() as u64).expect("in range");
                ops += 1;
                i += 1;
            }
            (ops, h)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut ops = 0;
    for t in tasks {
        let (n, h) = t.await.expect("task");
        ops += n;
        hist.add(h).expect("same bounds");
    }
    (ops, started.elapsed().as_secs_f64(), hist)
}

fn main() {
    let endpoints: Vec<String> = arg("--endpoints", "http://127.0.0.1:2379").split(',').map(str::to_string).collect();
    let n: usize = arg("--clients", "256").parse().expect("--clients");
    let secs: f64 = arg("--secs", "10").parse().expect("--secs");
    let key_size: usize = arg("--key-size", "16").parse().expect("--key-size");
    let value = "v".repeat(arg("--value-size", "128").parse().expect("--value-size"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // A few connections, as etcd's own benchmark tool uses (--conns), shared by the clients.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut clients = Vec::new();
        while clients.len() < 8 {
            match Client::connect(&endpoints, None).await {
                Ok(mut c) => {
                    // Ready once a write commits (a leader is elected and a quorum answers).
                    if c.put("warmup", "x", None).await.is_ok() {
                        clients.push(c);
                        continue;
                    }
                }
                Err(e) => assert!(Instant::now() < deadline, "etcd did not come up: {e}"),
            }
            assert!(Instant::now() < deadline, "etcd did not become ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (what, write) in [("writes", true), ("reads", false)] {
            let (ops, s, h) = phase(&clients, n, secs, key_size, &value, write).await;
            println!(
                "{what} {ops} {s:.3} {} {} {}",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999)
            );
        }
    });
}
