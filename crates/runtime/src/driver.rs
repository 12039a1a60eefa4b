//! The event loop that drives one [`Node`], as the simulator's `World` does: `on_start` once,
//! then timers, peer messages and client requests one at a time, each handler acting only
//! through the [`Ctx`]; replies may come from a later event.
//!
//! The loop runs on a thread of its own (so a sync blocks only it, while the network tasks
//! keep reading into its queue). It takes every event already queued as one batch and then
//! calls [`Driven::end_of_batch`]: a node that defers its work there (the KV server's group
//! commit) writes and syncs one Ready for the whole batch; what arrives during that sync
//! makes the next batch.
//!
//! Work too slow for the loop (a snapshot of a large state: serialise, write, sync) runs on a
//! thread of its own ([`Driven::background_work`]); its outcome comes back through the input
//! queue, as a closure run on the node.
//!
//! If the node fails (a storage failure it cannot continue from) or a handler panics, the loop
//! stops and [`DriverHandle::join`] returns the reason: the server stops serving and exits
//! non-zero, rather than answering from a state it could not persist.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node};
use tokio::sync::mpsc;

/// Most events taken into one batch (bounds the latency of the first of them).
pub const MAX_BATCH: usize = 4096;
/// Capacity of a node's input queue; network readers wait when it is full.
pub const INPUT_QUEUE: usize = 16_384;
/// A batch (its events, timers, the node's flush: write, sync, apply) taking this long is
/// logged: the loop serves nothing meanwhile.
const SLOW_BATCH: Duration = Duration::from_millis(200);

/// Microseconds on a clock shared by everything in this process: wall-clock time read once at
/// the first call, advanced by the monotonic clock (so it never goes back while the process
/// runs, and a restarted server continues roughly where the last one was).
pub fn now_micros() -> Micros {
    static BASE: OnceLock<(Instant, Micros)> = OnceLock::new();
    let (at, wall) = BASE.get_or_init(|| {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as Micros).unwrap_or(0);
        (Instant::now(), wall)
    });
    wall + at.elapsed().as_micros() as Micros
}

/// A [`Node`] the runtime can drive.
pub trait Driven: Node + Send + 'static {
    /// Every event queued at the start of this batch has been handled. A node that defers work
    /// (group commit) does it now.
    fn end_of_batch(&mut self, _ctx: &mut dyn Ctx) {}
    /// Why the node cannot go on (its storage failed), if so: the loop then stops with it.
    fn failure(&self) -> Option<String> {
        None
    }
    /// Work to run on another thread, asked after every batch: its result, a closure, is then
    /// run on the node like any input.
    fn background_work(&mut self) -> Option<BackgroundWork<Self>> {
        None
    }
    /// A sync to run off the loop, asked after every batch (pipelined persistence): run on the
    /// node's sync thread, one after the other, its result then run on the node.
    fn sync_work(&mut self) -> Option<BackgroundWork<Self>> {
        None
    }
}

/// Work for another thread whose result is run on the node.
pub type BackgroundWork<N> = Box<dyn FnOnce() -> Job<N> + Send>;

impl<S, M> Driven for sixfive_rsm::RsmNode<S, M>
where
    S: sixfive_raft::Storage + Send + 'static,
    S::Error: Send + 'static,
    M: sixfive_rsm::StateMachine + Send + 'static,
{
    fn end_of_batch(&mut self, ctx: &mut dyn Ctx) {
        self.flush(ctx);
    }
    fn failure(&self) -> Option<String> {
        self.failed().map(str::to_owned)
    }
    /// A sync (with pipelined persistence): waited for off the loop, finished on it.
    fn sync_work(&mut self) -> Option<BackgroundWork<Self>> {
        let job = self.take_sync_job()?;
        Some(Box::new(move || {
            let result = job();
            Box::new(move |n: &mut Self, ctx: &mut dyn Ctx| {
                n.finish_sync(ctx, result);
            })
        }))
    }
    /// A snapshot job (with background snapshots): taken off the loop, finished on it.
    fn background_work(&mut self) -> Option<BackgroundWork<Self>> {
        let started = Instant::now();
        let job = self.take_snapshot_job()?;
        let copied = started.elapsed();
        Some(Box::new(move || {
            let started = Instant::now();
            let index = job.index();
            let taken = job.run();
            let ran = started.elapsed();
            Box::new(move |n: &mut Self, ctx: &mut dyn Ctx| {
                let started = Instant::now();
                n.finish_snapshot(ctx, taken);
                tracing::info!(
                    "snapshot at index {index}: state copied in {} ms on the loop, written in {} ms off it, installed in {} ms",
                    copied.as_millis(),
                    ran.as_millis(),
                    started.elapsed().as_millis()
                );
            })
        }))
    }
}

/// Where a node's sends and replies go.
pub trait Router: Send + Sync + 'static {
    /// A one-way message to peer `to` (dropped if it cannot be queued).
    fn send(&self, to: Endpoint, bytes: Vec<u8>);
    /// The answer to request `call` of client `to` (it may wait for [`Router::flush`]).
    fn reply(&self, to: Endpoint, call: CallId, bytes: Vec<u8>);
    /// Sends what waits: called by the loop after every batch, before it waits for more.
    fn flush(&self) {}
}

/// A closure run on the node with a context.
pub type Job<N> = Box<dyn FnOnce(&mut N, &mut dyn Ctx) + Send>;

/// Something for the node's loop to do.
pub enum Input<N> {
    /// A message from a peer.
    Message {
        /// The peer.
        from: Endpoint,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// A client's request.
    Request {
        /// The client's endpoint (its connection).
        from: Endpoint,
        /// Its call id.
        call: CallId,
        /// The request.
        bytes: Vec<u8>,
    },
    /// Runs a closure on the node (status, leadership transfer), with a context.
    With(Job<N>),
    /// Stops on purpose: `on_shutdown` answers what waits, the batch is flushed, the loop ends.
    Shutdown,
}

/// Runs after every batch with the node (for metrics).
pub type Observer<N> = Box<dyn FnMut(&N) + Send>;

/// A node's input queue: the sender for the network tasks, the receiver for [`spawn`].
pub fn channel<N>() -> (mpsc::Sender<Input<N>>, mpsc::Receiver<Input<N>>) {
    mpsc::channel(INPUT_QUEUE)
}

/// A running node loop.
pub struct DriverHandle<N> {
    /// Where to send inputs.
    pub input: mpsc::Sender<Input<N>>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl<N> DriverHandle<N> {
    /// Waits for the loop to end: `Ok` after a shutdown, `Err` with the reason if the node
    /// failed (its storage failed, or a handler panicked).
    pub fn join(self) -> Result<(), String> {
        self.thread.join().unwrap_or_else(|_| Err("the node loop's thread died".into()))
    }

    /// Whether the loop has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

struct RtCtx<'a> {
    me: Endpoint,
    now: Micros,
    router: &'a dyn Router,
    timers: &'a mut BTreeMap<(Micros, u64), u64>,
    timer_seq: &'a mut u64,
}

impl Ctx for RtCtx<'_> {
    fn now(&self) -> Micros {
        self.now
    }
    fn me(&self) -> Endpoint {
        self.me
    }
    fn send(&mut self, to: Endpoint, message: Vec<u8>) {
        self.router.send(to, message);
    }
    fn reply(&mut self, to: Endpoint, call: CallId, reply: Vec<u8>) {
        self.router.reply(to, call, reply);
    }
    fn set_timer(&mut self, after: Micros, id: u64) {
        *self.timer_seq += 1;
        self.timers.insert((self.now + after, *self.timer_seq), id);
    }
}

struct Loop<N> {
    me: Endpoint,
    /// The input queue, for background work to answer through (weak: the loop still ends
    /// once every other sender is gone).
    input: mpsc::WeakSender<Input<N>>,
    node: N,
    router: Arc<dyn Router>,
    timers: BTreeMap<(Micros, u64), u64>,
    timer_seq: u64,
    /// The node's sync thread ([`Driven::sync_work`]), started at the first sync.
    syncer: Option<std::sync::mpsc::Sender<BackgroundWork<N>>>,
}

impl<N: Driven> Loop<N> {
    fn dispatch(&mut self, f: impl FnOnce(&mut N, &mut dyn Ctx)) {
        let mut ctx = RtCtx {
            me: self.me,
            now: now_micros(),
            router: self.router.as_ref(),
            timers: &mut self.timers,
            timer_seq: &mut self.timer_seq,
        };
        f(&mut self.node, &mut ctx);
    }

    /// Handles one input; false once the node is shut down.
    fn handle(&mut self, input: Input<N>) -> bool {
        match input {
            Input::Message { from, bytes } => self.dispatch(|n, ctx| n.on_message(ctx, from, bytes)),
            Input::Request { from, call, bytes } => self.dispatch(|n, ctx| n.on_request(ctx, from, call, bytes)),
            Input::With(f) => self.dispatch(f),
            Input::Shutdown => {
                self.dispatch(|n, ctx| {
                    n.on_shutdown(ctx);
                    n.end_of_batch(ctx);
                });
                self.router.flush();
                return false;
            }
        }
        true
    }

    fn start_background(&mut self, work: BackgroundWork<N>) {
        let input = self.input.clone();
        let spawned = std::thread::Builder::new().name(format!("node-{}-bg", self.me)).spawn(move || {
            let job = work();
            if let Some(tx) = input.upgrade() {
                // Dropped if the loop has ended meanwhile.
                let _ = tx.blocking_send(Input::With(job));
            }
        });
        if let Err(e) = spawned {
            // Cannot happen short of resource exhaustion; the node then stops, as on a failure.
            panic!("cannot start a background thread: {e}");
        }
    }

    /// Runs `work` on the node's sync thread: one thread for the node's whole life (a sync
    /// every few hundred microseconds is too often to start a thread for each), taking the
    /// syncs in order.
    fn start_sync(&mut self, work: BackgroundWork<N>) {
        let syncer = self.syncer.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<BackgroundWork<N>>();
            let input = self.input.clone();
            let spawned = std::thread::Builder::new().name(format!("node-{}-sync", self.me)).spawn(move || {
                // Ends once the loop (which holds the sender) is gone.
                while let Ok(work) = rx.recv() {
                    // A panic here would leave the node waiting for this sync forever: it is
                    // carried to the loop instead, which stops the node with it.
                    let job = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|e| {
                        let why = panic_message(e.as_ref());
                        Box::new(move |_: &mut N, _: &mut dyn Ctx| panic!("the sync thread panicked: {why}"))
                    });
                    let Some(tx) = input.upgrade() else { return };
                    if tx.blocking_send(Input::With(job)).is_err() {
                        return;
                    }
                }
            });
            if let Err(e) = spawned {
                // Cannot happen short of resource exhaustion; the node then stops, as on a failure.
                panic!("cannot start the sync thread: {e}");
            }
            tx
        });
        syncer.send(work).expect("the sync thread runs as long as the loop");
    }

    fn fire_due_timers(&mut self) {
        let now = now_micros();
        while let Some((&(at, seq), _)) = self.timers.first_key_value() {
            if at > now {
                break;
            }
            let id = self.timers.remove(&(at, seq)).expect("listed");
            self.dispatch(|n, ctx| n.on_timer(ctx, id));
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input<N>>, mut observer: Option<Observer<N>>) -> Result<(), String> {
        self.dispatch(|n, ctx| n.on_start(ctx));
        loop {
            let next = self.timers.first_key_value().map(|(&(at, _), _)| at);
            let first = match next {
                Some(at) => {
                    let wait = Duration::from_micros(at.saturating_sub(now_micros()));
                    tokio::select! {
                        biased;
                        input = rx.recv() => Some(input),
                        _ = tokio::time::sleep(wait) => None,
                    }
                }
                None => Some(rx.recv().await),
            };
            let started = Instant::now();
            let mut running = match first {
                Some(Some(input)) => self.handle(input),
                Some(None) => self.handle(Input::Shutdown), // every sender is gone
                None => true,
            };
            let mut taken = 1;
            while running && taken < MAX_BATCH {
                let Ok(input) = rx.try_recv() else { break };
                running = self.handle(input);
                taken += 1;
            }
            if !running {
                return Ok(());
            }
            self.fire_due_timers();
            self.dispatch(|n, ctx| n.end_of_batch(ctx));
            self.router.flush();
            if let Some(why) = self.node.failure() {
                return Err(why);
            }
            if let Some(work) = self.node.sync_work() {
                self.start_sync(work);
            }
            if let Some(work) = self.node.background_work() {
                self.start_background(work);
            }
            let took = started.elapsed();
            if took >= SLOW_BATCH {
                tracing::warn!(
                    "node {}: a batch of {taken} events took {} ms (the loop answered nothing meanwhile)",
                    self.me,
                    took.as_millis()
                );
            }
            if let Some(o) = observer.as_mut() {
                o(&self.node);
            }
        }
    }
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Starts the loop of `node` at address `me` on a new thread, taking its inputs from the queue
/// made by [`channel`].
pub fn spawn<N: Driven>(
    me: Endpoint,
    node: N,
    router: Arc<dyn Router>,
    observer: Option<Observer<N>>,
    channel: (mpsc::Sender<Input<N>>, mpsc::Receiver<Input<N>>),
) -> DriverHandle<N> {
    spawn_on(None, me, node, router, observer, channel)
}

/// A runtime for [`spawn_on`]: one thread's, with I/O, for the tasks that should run on the
/// node's own thread between its batches (its network, so that a request reaches the loop
/// without a hand-off between threads).
pub fn loop_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// How long the tasks on a loop's own runtime run after the loop ends: what it answered last
/// goes out.
const LINGER: Duration = Duration::from_millis(100);

/// How long the loop's runtime waits for its blocking tasks as the thread ends.
const SHUTDOWN: Duration = Duration::from_millis(200);

/// [`spawn`], on `rt` (from [`loop_runtime`]) if given: the tasks spawned on it before run on
/// the node's thread too, whenever the loop waits for input.
pub fn spawn_on<N: Driven>(
    rt: Option<tokio::runtime::Runtime>,
    me: Endpoint,
    node: N,
    router: Arc<dyn Router>,
    observer: Option<Observer<N>>,
    (input, rx): (mpsc::Sender<Input<N>>, mpsc::Receiver<Input<N>>),
) -> DriverHandle<N> {
    let weak = input.downgrade();
    let thread = std::thread::Builder::new()
        .name(format!("node-{me}"))
        .spawn(move || {
            let shared = rt.is_some();
            let rt = match rt {
                Some(rt) => rt,
                None => {
                    tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| e.to_string())?
                }
            };
            let lp = Loop { me, input: weak, node, router, timers: BTreeMap::new(), timer_seq: 0, syncer: None };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(lp.run(rx, observer))))
                .map_err(|e| panic_message(e.as_ref()));
            if shared {
                rt.block_on(async { tokio::time::sleep(LINGER).await });
            }
            // Not a plain drop, which would wait without limit for the blocking pool (a peer's
            // host name resolving, say).
            rt.shutdown_timeout(SHUTDOWN);
            result?
        })
        .expect("spawn the node thread");
    DriverHandle { input, thread }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl Router for Log {
        fn send(&self, to: Endpoint, bytes: Vec<u8>) {
            self.0.lock().unwrap().push(format!("send {to} {}", String::from_utf8_lossy(&bytes)));
        }
        fn reply(&self, to: Endpoint, call: CallId, bytes: Vec<u8>) {
            self.0.lock().unwrap().push(format!("reply {to}/{call} {}", String::from_utf8_lossy(&bytes)));
        }
    }

    /// Echoes requests at the end of the batch; ticks three times; panics on "boom".
    #[derive(Default)]
    struct Echo {
        queued: Vec<(Endpoint, CallId, Vec<u8>)>,
        ticks: u32,
    }
    impl Node for Echo {
        fn on_start(&mut self, ctx: &mut dyn Ctx) {
            ctx.set_timer(1_000, 7);
        }
        fn on_timer(&mut self, ctx: &mut dyn Ctx, id: u64) {
            assert_eq!(id, 7);
            self.ticks += 1;
            if self.ticks < 3 {
                ctx.set_timer(1_000, 7);
            } else {
                ctx.send(2, b"ticked".to_vec());
            }
        }
        fn on_message(&mut self, _ctx: &mut dyn Ctx, _from: Endpoint, message: Vec<u8>) {
            assert_ne!(message, b"boom", "storage failed: cannot continue safely");
        }
        fn on_request(&mut self, _ctx: &mut dyn Ctx, from: Endpoint, call: CallId, request: Vec<u8>) {
            self.queued.push((from, call, request));
        }
        fn on_shutdown(&mut self, ctx: &mut dyn Ctx) {
            ctx.send(2, b"bye".to_vec());
        }
    }
    impl Driven for Echo {
        fn end_of_batch(&mut self, ctx: &mut dyn Ctx) {
            for (to, call, r) in self.queued.drain(..) {
                ctx.reply(to, call, r);
            }
        }
    }

    /// Answers each request from a background thread: the work names the thread it ran on.
    #[derive(Default)]
    struct Slow {
        asked: Vec<(Endpoint, CallId)>,
    }
    impl Node for Slow {
        fn on_start(&mut self, _ctx: &mut dyn Ctx) {}
        fn on_timer(&mut self, _ctx: &mut dyn Ctx, _id: u64) {}
        fn on_message(&mut self, _ctx: &mut dyn Ctx, _from: Endpoint, _message: Vec<u8>) {}
        fn on_request(&mut self, _ctx: &mut dyn Ctx, from: Endpoint, call: CallId, _request: Vec<u8>) {
            self.asked.push((from, call));
        }
        fn on_shutdown(&mut self, _ctx: &mut dyn Ctx) {}
    }
    impl Driven for Slow {
        fn background_work(&mut self) -> Option<BackgroundWork<Self>> {
            let (to, call) = self.asked.pop()?;
            Some(Box::new(move || {
                let ran_on = std::thread::current().name().unwrap_or("?").to_string();
                Box::new(move |_n: &mut Slow, ctx: &mut dyn Ctx| {
                    let on = std::thread::current().name().unwrap_or("?").to_string();
                    ctx.reply(to, call, format!("worked on {ran_on}, answered on {on}").into_bytes());
                })
            }))
        }
    }

    #[test]
    fn background_work_runs_off_the_loop_and_its_result_on_it() {
        let log = Arc::new(Log::default());
        let h = spawn(1, Slow::default(), log.clone(), None, channel());
        h.input.blocking_send(Input::Request { from: 9, call: 3, bytes: Vec::new() }).unwrap();
        for _ in 0..500 {
            if !log.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        h.input.blocking_send(Input::Shutdown).unwrap();
        assert_eq!(h.join(), Ok(()));
        assert_eq!(log.0.lock().unwrap().clone(), vec!["reply 9/3 worked on node-1-bg, answered on node-1"]);
    }

    #[test]
    fn tasks_on_the_loops_runtime_run_on_its_thread_before_and_after_the_loop() {
        let log = Arc::new(Log::default());
        let rt = loop_runtime().unwrap();
        let (input, rx) = channel::<Echo>();
        let (ran_on, on) = std::sync::mpsc::channel();
        let (late, late_rx) = tokio::sync::oneshot::channel::<()>();
        {
            // Spawned before the loop runs, as a server's network is: a "connection" that
            // hands the loop a request, then one that still runs once the loop has ended.
            let _g = rt.enter();
            let (input, first) = (input.clone(), ran_on.clone());
            tokio::spawn(async move {
                first.send(std::thread::current().name().map(String::from)).unwrap();
                input.send(Input::Request { from: 9, call: 3, bytes: b"hi".to_vec() }).await.unwrap();
            });
            tokio::spawn(async move {
                late_rx.await.unwrap();
                ran_on.send(std::thread::current().name().map(String::from)).unwrap();
            });
        }
        let h = spawn_on(Some(rt), 1, Echo::default(), log.clone(), None, (input, rx));
        assert_eq!(on.recv_timeout(Duration::from_secs(10)).unwrap().as_deref(), Some("node-1"));
        for _ in 0..500 {
            if !log.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        h.input.blocking_send(Input::Shutdown).unwrap();
        // Once the node said goodbye its loop returns without waiting again: the task let go
        // now can only run in the linger after it.
        for _ in 0..500 {
            if log.0.lock().unwrap().iter().any(|l| l == "send 2 bye") {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        late.send(()).unwrap();
        assert_eq!(h.join(), Ok(()));
        assert_eq!(log.0.lock().unwrap().first().map(String::as_str), Some("reply 9/3 hi"));
        assert_eq!(on.recv_timeout(Duration::from_secs(1)).unwrap().as_deref(), Some("node-1"));
    }

    /// Its first sync panics.
    #[derive(Default)]
    struct BadSync(bool);
    impl Node for BadSync {
        fn on_start(&mut self, _ctx: &mut dyn Ctx) {}
        fn on_timer(&mut self, _ctx: &mut dyn Ctx, _id: u64) {}
        fn on_message(&mut self, _ctx: &mut dyn Ctx, _from: Endpoint, _message: Vec<u8>) {
            self.0 = true;
        }
        fn on_request(&mut self, _ctx: &mut dyn Ctx, _from: Endpoint, _call: CallId, _request: Vec<u8>) {}
        fn on_shutdown(&mut self, _ctx: &mut dyn Ctx) {}
    }
    impl Driven for BadSync {
        fn sync_work(&mut self) -> Option<BackgroundWork<Self>> {
            std::mem::take(&mut self.0).then(|| -> BackgroundWork<Self> { Box::new(|| panic!("disk on fire")) })
        }
    }

    #[test]
    fn a_panic_on_the_sync_thread_stops_the_node() {
        let h = spawn(1, BadSync::default(), Arc::new(Log::default()), None, channel());
        h.input.blocking_send(Input::Message { from: 2, bytes: Vec::new() }).unwrap();
        let err = h.join().unwrap_err();
        assert!(err.contains("the sync thread panicked: disk on fire"), "{err}");
    }

    #[test]
    fn timers_deferred_replies_shutdown_and_failure() {
        let log = Arc::new(Log::default());
        let h = spawn(1, Echo::default(), log.clone(), None, channel());
        h.input.blocking_send(Input::Request { from: 9, call: 3, bytes: b"hi".to_vec() }).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        h.input.blocking_send(Input::Shutdown).unwrap();
        assert_eq!(h.join(), Ok(()));
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got, vec!["reply 9/3 hi", "send 2 ticked", "send 2 bye"]);

        let h = spawn(1, Echo::default(), Arc::new(Log::default()), None, channel());
        h.input.blocking_send(Input::Message { from: 2, bytes: b"boom".to_vec() }).unwrap();
        let err = h.join().unwrap_err();
        assert!(err.contains("storage failed"), "{err}");
    }
}
