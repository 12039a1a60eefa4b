//! # sixfive-mapreduce: MapReduce as real processes
//!
//! A [`coordinator`] hands out map tasks (input chunks, split at line boundaries) and then
//! reduce tasks to [`worker`]s over UNIX or TCP sockets. Map output stays on the worker that
//! wrote it and is fetched by reducers from that worker's file server, so workers need no
//! shared filesystem; if a worker holding finished map output dies, those map tasks run
//! again. Workers send heartbeats while a task runs; a task whose worker goes silent past a
//! timeout is handed to another worker; optional backup tasks race stragglers near the end
//! of a phase. Every intermediate and output file is written under a temporary name and
//! renamed, so no partial file is ever visible; `_SUCCESS` is written last. The coordinator
//! keeps a [`journal`] of finished tasks, so a restarted coordinator resumes the job, and can
//! serve a job page ([`web`]).
//!
//! Apps implement [`app::App`] (map, reduce, optional combiner), or [`typed::TypedApp`] for
//! values of their own type, and are registered by name in an [`app::Registry`]; the `stream` app runs external commands, so apps can be written in
//! any language. [`cli`] is the command line (`sixfive mr ...`), reusable by a program with
//! apps of its own (see `examples/custom_app.rs`).
#![deny(missing_docs)]

pub mod app;
pub mod cli;
pub mod coordinator;
pub mod journal;
pub mod proto;
pub mod split;
pub mod typed;
pub mod web;
pub mod worker;
