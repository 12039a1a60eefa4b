//! etcd's KV service answering every Put and Range at once, with no store behind it: what the
//! gRPC transport alone costs, and so the ceiling of any server measured through etcd's API on
//! this machine with the same client (docs/benchmarks.md, "Session 12").
//!
//! ```text
//! cargo build --release -p sixfive-etcd --example answer_at_once
//! for p in 16379 16479 16579; do target/release/examples/answer_at_once $p & done
//! sixfive bench kv --secs 8 --etcd-endpoints http://127.0.0.1:16379,http://127.0.0.1:16479,http://127.0.0.1:16579
//! ```
//!
//! Each process serves on one thread, as a member of `kv cluster` does by default.

use sixfive_etcd::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse, kv_server,
};
use tonic::{Request, Response, Status};

struct AnswerAtOnce;

fn header() -> Option<ResponseHeader> {
    Some(ResponseHeader { cluster_id: 1, member_id: 1, revision: 1, raft_term: 1 })
}

#[tonic::async_trait]
impl kv_server::Kv for AnswerAtOnce {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Ok(Response::new(RangeResponse { header: header(), ..Default::default() }))
    }
    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Ok(Response::new(PutResponse { header: header(), ..Default::default() }))
    }
    async fn delete_range(&self, _: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("answer_at_once answers Put and Range only"))
    }
    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("answer_at_once answers Put and Range only"))
    }
    async fn compact(&self, _: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("answer_at_once answers Put and Range only"))
    }
}

fn main() -> std::process::ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: answer_at_once PORT");
        return std::process::ExitCode::from(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let served = rt.block_on(
        tonic::transport::Server::builder()
            .add_service(kv_server::KvServer::new(AnswerAtOnce))
            .serve(([127, 0, 0, 1], port).into()),
    );
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: serving on 127.0.0.1:{port}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
