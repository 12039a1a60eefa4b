//! `sixfive shardkv ...`: the sharded key/value service as real processes (controller and
//! replica-group members), a local deployment, the administration commands and the client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use sixfive_kv::KvClient;
use sixfive_runtime::client::random_u64;
use sixfive_runtime::server::{ServeConfig, ServeError};
use sixfive_runtime::shard::{ShardRole, ShardServeConfig, ShardTransport, endpoint_of_url, serve, url_of};
use sixfive_shardkv::{CtrlerClerk, Gid, NSHARDS, ShardClerk, ShardConfig, ShardState, key2shard};

use crate::kv::{DataOp, Outcome, Output, ServeArgs, data_op, exit, failed, kv_error, ok, stop_all, supervise};

/// The controller of the deployment that `sixfive shardkv cluster` starts with its defaults.
pub const LOCAL_CTRLERS: &str = "http://127.0.0.1:26100,http://127.0.0.1:26101,http://127.0.0.1:26102";
const BASE_PORT: u16 = 26100;
const TOKEN: &str = "sixfive-shard-local";

#[derive(Subcommand)]
pub enum ShardCommand {
    /// Runs one member of the controller group (--role ctrler) or of a replica group
    /// (--role group --gid N --ctrler-endpoints ...). Flags as `kv serve`; a member's peer URL
    /// is also where clients reach it, and names it in the controller's configurations.
    Serve(Box<ShardServeArgs>),
    /// Starts a local controller group of 3 and --groups replica groups of 3 as processes with
    /// data under ./sixfive-shard-data, joins the groups the controller does not know yet;
    /// Ctrl-C stops them all; running it again reuses the data.
    Cluster(ClusterArgs),
    /// Administers the shard controller: join, leave, move, query.
    Ctl {
        #[command(subcommand)]
        what: CtlCommand,
    },
    /// Stores VALUE under KEY (whatever its version).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Prints KEY's value and version (exit 3 if there is no such key).
    Get {
        /// Key.
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Removes KEY (exit 3 if there is no such key).
    Del {
        /// Key.
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Appends SUFFIX to KEY's value exactly once (creating it); prints the old value.
    Append {
        /// Key.
        key: String,
        /// Suffix.
        suffix: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Lists keys from START (inclusive) to --end (exclusive) in order, across all shards.
    Scan {
        /// First key (default: the first).
        #[arg(default_value = "")]
        start: String,
        /// End key (exclusive; default: to the last key).
        #[arg(long)]
        end: Option<String>,
        /// Most entries.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Which group serves which shard, every member's role and configuration, and the
    /// migrations in progress; exits 0 only when the controller answers and every group of the
    /// latest configuration has a leader that has reached it with no shard in motion.
    Status {
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub enum CtlCommand {
    /// Adds replica group GID, whose servers are at URLS (their peer URLs, comma-separated).
    Join {
        /// Group id (1 or more).
        gid: Gid,
        /// The group's servers: http://a.b.c.d:port,...
        urls: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Removes replica groups (their shards move to the others).
    Leave {
        /// Group ids.
        #[arg(required = true)]
        gids: Vec<Gid>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Gives SHARD to group GID.
    Move {
        /// Shard (0..10).
        shard: usize,
        /// Group id.
        gid: Gid,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Prints configuration NUM (default: the latest).
    Query {
        /// Configuration number.
        num: Option<u64>,
        #[command(flatten)]
        c: ClientArgs,
    },
}

/// Options of every client command.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The controller members' URLs (default: the local deployment of `shardkv cluster`).
    #[arg(long, env = "SIXFIVE_SHARD_CTRLERS", default_value = LOCAL_CTRLERS)]
    pub ctrlers: String,
    /// Output format.
    #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Simple)]
    pub write_out: Output,
    /// Seconds to wait for an answer before giving up.
    #[arg(long, env = "SIXFIVE_COMMAND_TIMEOUT", default_value_t = 5.0)]
    pub command_timeout: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A member of the shard controller's group.
    Ctrler,
    /// A member of a replica group.
    Group,
}

/// `shardkv serve`'s flags: those of `kv serve`, plus the role.
#[derive(Args)]
pub struct ShardServeArgs {
    /// What this member serves.
    #[arg(long, env = "SIXFIVE_ROLE", value_enum)]
    role: RoleArg,
    /// The replica group's id (with --role group).
    #[arg(long, env = "SIXFIVE_GID")]
    gid: Option<Gid>,
    /// The controller members' peer URLs, comma-separated (with --role group).
    #[arg(long, env = "SIXFIVE_CTRLER_ENDPOINTS")]
    ctrler_endpoints: Option<String>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
pub struct ClusterArgs {
    /// Number of replica groups (1 to 9), each of 3 servers.
    #[arg(long, default_value_t = 3)]
    groups: u64,
    /// Directory holding one data directory per member.
    #[arg(long, default_value = "sixfive-shard-data")]
    data_dir: PathBuf,
    /// First port: controller members on PORT..PORT+2, group G's members on PORT+10G..PORT+10G+2.
    #[arg(long, default_value_t = BASE_PORT)]
    base_port: u16,
    /// Extra flags passed to every `shardkv serve` (e.g. "--snapshot-bytes=1000000").
    #[arg(long, allow_hyphen_values = true)]
    serve_flag: Vec<String>,
}

pub fn main(cmd: ShardCommand) -> ExitCode {
    match cmd {
        ShardCommand::Serve(a) => serve_main(*a),
        ShardCommand::Cluster(a) => cluster_main(a),
        other => client_main(other),
    }
}

fn serve_main(a: ShardServeArgs) -> ExitCode {
    sixfive_runtime::init_logging();
    let raw = match a.serve.into_raw() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    // Only client listeners given explicitly: the peer URL serves clients already.
    let explicit_client = raw.listen_client_urls.clone();
    let role = match (a.role, a.gid) {
        (RoleArg::Ctrler, None) => ShardRole::Ctrler,
        (RoleArg::Ctrler, Some(_)) => {
            eprintln!("error: --gid is for --role group");
            return ExitCode::from(exit::USAGE);
        }
        (RoleArg::Group, Some(g)) => ShardRole::Group(g),
        (RoleArg::Group, None) => {
            eprintln!("error: --role group needs --gid");
            return ExitCode::from(exit::USAGE);
        }
    };
    let cfg = ServeConfig::from_raw(&raw).and_then(|base| {
        let extra = match &explicit_client {
            Some(s) => s
                .split(',')
                .filter(|u| !u.trim().is_empty())
                .map(sixfive_runtime::server::parse_url)
                .collect::<Result<Vec<_>, ServeError>>()?,
            None => Vec::new(),
        };
        ShardServeConfig::new(base, role, a.ctrler_endpoints.as_deref(), extra)
    });
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cluster_main(a: ClusterArgs) -> ExitCode {
    if a.groups == 0 || a.groups > 9 {
        eprintln!("error: --groups must be between 1 and 9");
        return ExitCode::from(exit::USAGE);
    }
    if a.base_port as u64 + 10 * a.groups + 3 > u16::MAX as u64 {
        eprintln!("error: --base-port {} leaves no room for {} groups", a.base_port, a.groups);
        return ExitCode::from(exit::USAGE);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let port = |g: u64, i: u64| a.base_port + (10 * g + i) as u16;
    let url = |g: u64, i: u64| format!("http://127.0.0.1:{}", port(g, i));
    let ctrl_urls: Vec<String> = (0..3).map(|i| url(0, i)).collect();
    let ctrlers = ctrl_urls.join(",");
    // (gid, name, data dir, port); gid 0: the controller.
    let mut members = Vec::new();
    for g in 0..=a.groups {
        for i in 0..3 {
            let name = if g == 0 { format!("c{}", i + 1) } else { format!("g{g}s{}", i + 1) };
            let dir = if g == 0 {
                a.data_dir.join("ctrler").join(&name)
            } else {
                a.data_dir.join(format!("g{g}")).join(&name)
            };
            members.push((g, name, dir, port(g, i)));
        }
    }
    let initial = |g: u64| {
        members
            .iter()
            .filter(|m| m.0 == g)
            .map(|m| format!("{}=http://127.0.0.1:{}", m.1, m.3))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut children = Vec::new();
    for (g, name, dir, p) in &members {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["shardkv", "serve", "--name", name]).arg("--data-dir").arg(dir);
        if *g == 0 {
            cmd.args(["--role", "ctrler"]);
        } else {
            cmd.args(["--role", "group", "--gid", &g.to_string(), "--ctrler-endpoints", &ctrlers]);
        }
        cmd.arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!("--initial-cluster={}", initial(*g)))
            .arg(format!("--initial-cluster-token={TOKEN}"))
            .args(&a.serve_flag);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        match cmd.spawn() {
            Ok(c) => children.push((name.clone(), c)),
            Err(e) => {
                eprintln!("error: cannot start {name}: {e}");
                stop_all(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    println!("started a controller group and {} replica groups (data in {}):", a.groups, a.data_dir.display());
    for ((g, name, _, p), (_, c)) in members.iter().zip(&children) {
        let what = if *g == 0 { "controller".to_string() } else { format!("group {g}") };
        println!("  {name:<6} {what:<10} pid {:>7}  http://127.0.0.1:{p}", c.id());
    }
    println!("controller: {ctrlers}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Join the groups the controller does not know yet (all of them on the first run).
    let joined = rt.block_on(async {
        let t = ShardTransport::new();
        let eps: Vec<u64> = ctrl_urls.iter().map(|u| endpoint_of_url(u).expect("valid")).collect();
        let mut ctl = CtrlerClerk::new(t, eps, random_u64());
        let latest = tokio::time::timeout(Duration::from_secs(30), ctl.query(None)).await;
        let Ok(Ok(latest)) = latest else { return Err("the controller did not answer within 30 s".to_string()) };
        let missing: BTreeMap<Gid, Vec<u64>> = (1..=a.groups)
            .filter(|g| !latest.groups.contains_key(g))
            .map(|g| (g, (0..3).map(|i| endpoint_of_url(&url(g, i)).expect("valid")).collect()))
            .collect();
        if missing.is_empty() {
            return Ok(format!("configuration {} (from the data of an earlier run)", latest.num));
        }
        let gids: Vec<Gid> = missing.keys().copied().collect();
        match tokio::time::timeout(Duration::from_secs(30), ctl.join(missing)).await {
            Ok(Ok(n)) => Ok(format!("joined groups {gids:?}: configuration {n}")),
            Ok(Err(e)) => Err(format!("join refused: {e}")),
            Err(_) => Err("the join was not answered within 30 s".into()),
        }
    });
    match joined {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("warning: {e}; join the groups with `sixfive shardkv ctl join`"),
    }
    println!(
        "try: sixfive shardkv put greeting hello && sixfive shardkv get greeting && sixfive shardkv status   (Ctrl-C stops all)"
    );
    let code = supervise(&rt, &mut children);
    println!("stopping the deployment...");
    let clean = stop_all(&mut children);
    if code == 0 && clean {
        println!("stopped; the data stays in {} (run again to reuse it)", a.data_dir.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn config_json(c: &ShardConfig) -> serde_json::Value {
    let groups: serde_json::Map<String, serde_json::Value> = c
        .groups
        .iter()
        .map(|(g, s)| (g.to_string(), json!(s.iter().map(|e| url_of(*e)).collect::<Vec<_>>())))
        .collect();
    json!({ "num": c.num, "shards": c.shards.to_vec(), "groups": groups })
}

fn config_text(c: &ShardConfig) -> String {
    let mut out = vec![format!("configuration {}", c.num)];
    for (s, g) in c.shards.iter().enumerate() {
        out.push(format!("  shard {s} -> group {g}"));
    }
    for (g, servers) in &c.groups {
        out.push(format!("  group {g}: {}", servers.iter().map(|e| url_of(*e)).collect::<Vec<_>>().join(",")));
    }
    out.join("\n")
}

fn client_main(cmd: ShardCommand) -> ExitCode {
    let c = match &cmd {
        ShardCommand::Put { c, .. }
        | ShardCommand::Get { c, .. }
        | ShardCommand::Del { c, .. }
        | ShardCommand::Append { c, .. }
        | ShardCommand::Scan { c, .. }
        | ShardCommand::Status { c } => c.clone(),
        ShardCommand::Ctl { what } => match what {
            CtlCommand::Join { c, .. }
            | CtlCommand::Leave { c, .. }
            | CtlCommand::Move { c, .. }
            | CtlCommand::Query { c, .. } => c.clone(),
        },
        _ => unreachable!("server commands are handled elsewhere"),
    };
    let timeout = Duration::from_secs_f64(c.command_timeout.max(0.01));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let out = rt.block_on(async move {
        let ctrlers: Vec<u64> =
            match c.ctrlers.split(',').filter(|s| !s.trim().is_empty()).map(endpoint_of_url).collect() {
                Ok(v) if !Vec::is_empty(&v) => v,
                Ok(_) => return failed(exit::USAGE, "--ctrlers: no URL given".into()),
                Err(e) => return failed(exit::USAGE, format!("--ctrlers: {e}")),
            };
        let t = ShardTransport::new();
        if let ShardCommand::Status { .. } = cmd {
            return status(&t, ctrlers, timeout).await;
        }
        let client = random_u64();
        let mut ctl = CtrlerClerk::new(t.clone(), ctrlers.clone(), client);
        let mut clerk = ShardClerk::new(t.clone(), ctrlers, client);
        let write = !matches!(
            cmd,
            ShardCommand::Get { .. } | ShardCommand::Scan { .. } | ShardCommand::Ctl { what: CtlCommand::Query { .. } }
        );
        let run = async {
            match cmd {
                ShardCommand::Ctl { what } => {
                    let reply = match what {
                        CtlCommand::Join { gid, urls, .. } => {
                            let eps: Result<Vec<u64>, _> =
                                urls.split(',').filter(|s| !s.trim().is_empty()).map(endpoint_of_url).collect();
                            match eps {
                                Ok(eps) => ctl.join([(gid, eps)].into()).await,
                                Err(e) => return failed(exit::USAGE, e.to_string()),
                            }
                        }
                        CtlCommand::Leave { gids, .. } => ctl.leave(gids).await,
                        CtlCommand::Move { shard, gid, .. } => ctl.move_shard(shard, gid).await,
                        CtlCommand::Query { num, .. } => {
                            return match ctl.query(num).await {
                                Ok(cfg) => ok(config_text(&cfg), config_json(&cfg)),
                                Err(e) => failed(1, e.to_string()),
                            };
                        }
                    };
                    match reply {
                        Ok(n) => ok(format!("OK: configuration {n}"), json!({ "ok": true, "config": n })),
                        Err(e) => failed(1, e.to_string()),
                    }
                }
                ShardCommand::Get { key, .. } => match clerk.get(&key).await {
                    Ok((v, ver)) => {
                        ok(v.clone(), json!({ "key": key, "value": v, "version": ver, "shard": key2shard(&key) }))
                    }
                    Err(e) => kv_error(e),
                },
                ShardCommand::Put { key, value, .. } => data_op(&mut clerk, DataOp::Put { key, value }).await,
                ShardCommand::Del { key, .. } => data_op(&mut clerk, DataOp::Del { key }).await,
                ShardCommand::Append { key, suffix, .. } => data_op(&mut clerk, DataOp::Append { key, suffix }).await,
                ShardCommand::Scan { start, end, limit, .. } => {
                    data_op(&mut clerk, DataOp::Scan { start, end, limit }).await
                }
                _ => unreachable!(),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(o) => o,
            Err(_) if write && t.requests_sent() > 0 => failed(
                exit::MAYBE_APPLIED,
                format!("no answer within {timeout:?}: the write may or may not have been applied"),
            ),
            Err(_) => failed(exit::UNAVAILABLE, format!("no answer within {timeout:?}")),
        }
    });
    out.finish(c.write_out)
}

fn state_name(s: ShardState) -> &'static str {
    match s {
        ShardState::Absent => "absent",
        ShardState::Serving => "serving",
        ShardState::Waiting => "waiting",
        ShardState::Sending => "sending",
    }
}

async fn status(t: &ShardTransport, ctrlers: Vec<u64>, timeout: Duration) -> Outcome {
    let micros = timeout.as_micros() as u64;
    let mut ctl = CtrlerClerk::new(t.clone(), ctrlers.clone(), random_u64());
    let latest = match tokio::time::timeout(timeout, ctl.query(None)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return failed(1, e.to_string()),
        Err(_) => return failed(exit::UNAVAILABLE, format!("the controller did not answer within {timeout:?}")),
    };
    let mut healthy = true;
    let mut lines = vec![format!("configuration {}", latest.num)];
    let mut members_json = Vec::new();
    // Every member: the controller's, then each group's.
    let mut all: Vec<(Gid, u64)> = ctrlers.iter().map(|e| (0, *e)).collect();
    for (g, servers) in &latest.groups {
        all.extend(servers.iter().map(|e| (*g, *e)));
    }
    // The leader's view of each group: (config, states).
    let mut leader_view: BTreeMap<Gid, (u64, Vec<ShardState>, Vec<usize>)> = BTreeMap::new();
    lines.push(format!(
        "{:<24} {:<6} {:<12} {:>6} {:>8} {:>8} {:>7}",
        "member", "group", "role", "term", "applied", "config", "keys"
    ));
    for (g, e) in &all {
        let st = t.status(*e, micros.min(1_000_000)).await;
        let info = t.info(*e, micros.min(1_000_000)).await;
        let group = if *g == 0 { "ctrl".to_string() } else { g.to_string() };
        match (st, info) {
            (Ok(st), Ok(info)) => {
                let keys: usize = info.keys.iter().sum();
                lines.push(format!(
                    "{:<24} {:<6} {:<12} {:>6} {:>8} {:>8} {:>7}",
                    url_of(*e),
                    group,
                    st.role,
                    st.term,
                    st.applied,
                    info.config,
                    keys
                ));
                if st.role == "leader" && *g != 0 {
                    leader_view.insert(*g, (info.config, info.states.clone(), info.keys.clone()));
                }
                members_json.push(json!({
                    "endpoint": url_of(*e), "group": g, "name": st.name, "role": st.role, "term": st.term,
                    "commit": st.commit, "applied": st.applied, "config": info.config, "keys": keys,
                    "states": info.states.iter().map(|s| state_name(*s)).collect::<Vec<_>>(),
                    "log_bytes": st.log_bytes, "snapshot_bytes": st.snapshot_bytes,
                }));
            }
            _ => {
                lines.push(format!("{:<24} {:<6} unreachable", url_of(*e), group));
                members_json.push(json!({ "endpoint": url_of(*e), "group": g, "error": "unreachable" }));
            }
        }
    }
    lines.push("shard  group  state (at the group's leader)  keys".into());
    let mut shards_json = Vec::new();
    let mut migrating = Vec::new();
    for s in 0..NSHARDS {
        let g = latest.shards[s];
        let (state, keys) = match leader_view.get(&g) {
            Some((num, states, keys)) if *num == latest.num => (state_name(states[s]).to_string(), keys[s]),
            Some((num, _, _)) => (format!("group at configuration {num}"), 0),
            None => ("no leader".to_string(), 0),
        };
        if state != "serving" {
            healthy = false;
        }
        lines.push(format!("{s:>5}  {g:>5}  {state:<29} {keys}"));
        shards_json.push(json!({ "shard": s, "group": g, "state": state, "keys": keys }));
    }
    for (g, (num, states, _)) in &leader_view {
        for (s, st) in states.iter().enumerate() {
            if matches!(st, ShardState::Sending | ShardState::Waiting) {
                migrating.push(format!("shard {s}: group {g} {} (at configuration {num})", state_name(*st)));
            }
        }
        if *num < latest.num {
            migrating.push(format!("group {g} is at configuration {num} of {}", latest.num));
        }
    }
    for g in latest.groups.keys() {
        if !leader_view.contains_key(g) {
            healthy = false;
        }
    }
    if migrating.is_empty() {
        lines.push("migrations: none".into());
    } else {
        healthy = false;
        lines.push("migrations in progress:".into());
        lines.extend(migrating.iter().map(|m| format!("  {m}")));
    }
    let json = json!({
        "config": config_json(&latest), "members": members_json, "shards": shards_json,
        "migrations": migrating, "healthy": healthy,
    });
    Outcome { code: if healthy { 0 } else { exit::UNAVAILABLE }, simple: lines.join("\n"), json }
}
