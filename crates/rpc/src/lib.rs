//! # sixfive-rpc: the seams between services and the runtime that runs them
//!
//! Every service above Raft is written against these traits, so the deterministic simulator
//! (`sixfive-sim`'s `World`) and the production runtime (tokio and TCP) run the same code.
//!
//! - Servers are [`Node`]s: deterministic, event-driven state machines. They react to timers,
//!   one-way messages from peers and requests from clients, and act only through [`Ctx`]
//!   (send, reply, set a timer). A request's reply may be sent later, from another event (a
//!   KV server answers once Raft has committed the operation).
//! - Clients are async code over a [`Transport`]: call with a timeout, sleep, read the clock.
#![deny(missing_docs)]

use std::future::Future;

/// An address: a server or a client.
pub type Endpoint = u64;
/// Identifies one request so its reply can be sent later.
pub type CallId = u64;
/// Time in microseconds (virtual in the simulator, monotonic in production).
pub type Micros = u64;

/// Why a call got no answer. The request may or may not have been executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcError {
    /// The request or its reply was lost, or the server is unreachable or down.
    Failed,
    /// No answer within the caller's timeout.
    Timeout,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Failed => write!(f, "the request or its reply was lost, or the server is unreachable"),
            RpcError::Timeout => write!(f, "no answer within the timeout"),
        }
    }
}
impl std::error::Error for RpcError {}

/// What a client can do.
pub trait Transport {
    /// Sends `request` to `to` and waits for the reply, at most `timeout`.
    fn call(&self, to: Endpoint, request: Vec<u8>, timeout: Micros) -> impl Future<Output = Result<Vec<u8>, RpcError>>;
    /// Waits `d`.
    fn sleep(&self, d: Micros) -> impl Future<Output = ()>;
    /// The time now.
    fn now(&self) -> Micros;
}

/// What a server can do while handling an event.
pub trait Ctx {
    /// The time now.
    fn now(&self) -> Micros;
    /// This server's address.
    fn me(&self) -> Endpoint;
    /// Sends a one-way message to a peer (may be lost, delayed, reordered).
    fn send(&mut self, to: Endpoint, message: Vec<u8>);
    /// Answers request `call` from `to`.
    fn reply(&mut self, to: Endpoint, call: CallId, reply: Vec<u8>);
    /// Calls [`Node::on_timer`] with `id` after `after`.
    fn set_timer(&mut self, after: Micros, id: u64);
}

/// A server: a deterministic state machine driven by events.
pub trait Node {
    /// The node has just started (or restarted from its disk): set the first timers here.
    fn on_start(&mut self, ctx: &mut dyn Ctx);
    /// A timer set with [`Ctx::set_timer`] fired.
    fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64);
    /// A one-way message from a peer.
    fn on_message(&mut self, ctx: &mut dyn Ctx, from: Endpoint, message: Vec<u8>);
    /// A request; answer it (now or later) with [`Ctx::reply`], or never (the caller times out).
    fn on_request(&mut self, ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>);
    /// The node is being shut down on purpose (not a crash): release what waits on it.
    fn on_shutdown(&mut self, _ctx: &mut dyn Ctx) {}
}
