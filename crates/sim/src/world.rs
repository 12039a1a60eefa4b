//! A whole system in one thread and virtual time: event-driven server [`Node`]s and async
//! client tasks, every message and RPC routed through the faulty [`Network`].
//!
//! The executor is deterministic: tasks run in the order they were woken (FIFO), events in
//! time order with ties broken by insertion, and all randomness comes from the seed. Nothing
//! here reads the clock or spawns a thread.
//!
//! RPC semantics follow the course's network: a lost request fails the call at once; a lost
//! reply fails it after the handler ran; a request to a crashed or unreachable server fails
//! after 0-100 ms (0-7 s with long delays); a server that never answers leaves the caller to
//! its timeout.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use sixfive_rpc::{CallId, Ctx, Endpoint, Micros, Node, RpcError, Transport};

use crate::{EventQueue, Fate, MS, NetConfig, Network, Rng};

type TaskId = u64;
type Task = Pin<Box<dyn Future<Output = ()>>>;

enum Ev {
    Wake(Waker),
    Timer { node: Endpoint, incarnation: u64, id: u64 },
    Message { from: Endpoint, to: Endpoint, bytes: Vec<u8> },
    Request { from: Endpoint, to: Endpoint, call: CallId, bytes: Vec<u8> },
    Reply { from: Endpoint, to: Endpoint, call: CallId, bytes: Vec<u8> },
    Fail { call: CallId, err: RpcError },
}

enum Action {
    Send { to: Endpoint, bytes: Vec<u8> },
    Reply { to: Endpoint, call: CallId, bytes: Vec<u8> },
    Timer { after: Micros, id: u64 },
}

/// A node the world can also hand back as its concrete type.
trait SimNode: Node + std::any::Any {
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<T: Node + 'static> SimNode for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct Slot {
    node: Option<Box<dyn SimNode>>,
    incarnation: u64,
}

struct PendingCall {
    result: Option<Result<Vec<u8>, RpcError>>,
    waker: Option<Waker>,
}

struct Inner {
    now: Micros,
    rng: Rng,
    net: Network,
    events: EventQueue<Ev>,
    nodes: BTreeMap<Endpoint, Slot>,
    calls: BTreeMap<CallId, PendingCall>,
    next_call: CallId,
    tasks: BTreeMap<TaskId, Option<Task>>,
    next_task: TaskId,
    trace: u64,
    handled: u64,
    /// Nodes paused (stop-the-world) until a time.
    paused: BTreeMap<Endpoint, Micros>,
    /// Nodes whose clocks run fast or slow: a timer set for `d` fires after `d * rate`.
    clock_rate: BTreeMap<Endpoint, f64>,
}

/// The simulated world. Cheap to clone (a handle); not `Send`.
#[derive(Clone)]
pub struct World {
    inner: Rc<RefCell<Inner>>,
    runnable: Arc<Mutex<VecDeque<TaskId>>>,
}

struct TaskWaker {
    id: TaskId,
    runnable: Arc<Mutex<VecDeque<TaskId>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.runnable.lock().expect("runnable queue").push_back(self.id);
    }
}

struct SimCtx {
    now: Micros,
    me: Endpoint,
    actions: Vec<Action>,
}

impl Ctx for SimCtx {
    fn now(&self) -> Micros {
        self.now
    }
    fn me(&self) -> Endpoint {
        self.me
    }
    fn send(&mut self, to: Endpoint, message: Vec<u8>) {
        self.actions.push(Action::Send { to, bytes: message });
    }
    fn reply(&mut self, to: Endpoint, call: CallId, reply: Vec<u8>) {
        self.actions.push(Action::Reply { to, call, bytes: reply });
    }
    fn set_timer(&mut self, after: Micros, id: u64) {
        self.actions.push(Action::Timer { after, id });
    }
}

impl World {
    /// An empty world whose every choice follows from `seed`.
    pub fn new(seed: u64, net: NetConfig) -> World {
        World {
            inner: Rc::new(RefCell::new(Inner {
                now: 0,
                rng: Rng::new(seed),
                net: Network::new(net),
                events: EventQueue::default(),
                nodes: BTreeMap::new(),
                calls: BTreeMap::new(),
                next_call: 1,
                tasks: BTreeMap::new(),
                next_task: 1,
                trace: 0xcbf2_9ce4_8422_2325,
                handled: 0,
                paused: BTreeMap::new(),
                clock_rate: BTreeMap::new(),
            })),
            runnable: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    /// Virtual time now.
    pub fn now(&self) -> Micros {
        self.inner.borrow().now
    }

    /// Uniform in `[0, n)` from the world's generator.
    pub fn random(&self, n: u64) -> u64 {
        self.inner.borrow_mut().rng.below(n)
    }

    /// Uses the world's generator.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.inner.borrow_mut().rng)
    }

    /// Reads or changes the network (faults, partitions, counters).
    pub fn net<T>(&self, f: impl FnOnce(&mut Network) -> T) -> T {
        f(&mut self.inner.borrow_mut().net)
    }

    /// Hash of every event handled so far: equal for two runs of the same seed.
    pub fn trace_hash(&self) -> u64 {
        self.inner.borrow().trace
    }

    /// Events handled so far.
    pub fn events_handled(&self) -> u64 {
        self.inner.borrow().handled
    }

    // ------------------------------------------------------------ nodes

    /// Starts `node` at address `at` (replacing a crashed one).
    pub fn start_node<N: Node + 'static>(&self, at: Endpoint, node: N) {
        {
            let mut i = self.inner.borrow_mut();
            let slot = i.nodes.entry(at).or_insert(Slot { node: None, incarnation: 0 });
            assert!(slot.node.is_none(), "node {at} is already running");
            slot.incarnation += 1;
            slot.node = Some(Box::new(node));
        }
        self.dispatch(at, |n, ctx| n.on_start(ctx));
    }

    /// Stops node `at` at once, as a power failure would: nothing it has not sent is sent.
    pub fn crash(&self, at: Endpoint) {
        let mut i = self.inner.borrow_mut();
        if let Some(slot) = i.nodes.get_mut(&at) {
            slot.node = None;
            slot.incarnation += 1;
        }
    }

    /// Stops node `at` on purpose: it may answer what waits on it first.
    pub fn shutdown(&self, at: Endpoint) {
        self.dispatch(at, |n, ctx| n.on_shutdown(ctx));
        self.crash(at);
    }

    /// Pauses node `at` for `d` (a stop-the-world garbage collection, a SIGSTOP): its timers,
    /// messages and requests wait, then all come at once when it resumes. Calls to it may
    /// time out meanwhile.
    pub fn pause(&self, at: Endpoint, d: Micros) {
        let mut i = self.inner.borrow_mut();
        let until = i.now + d;
        let p = i.paused.entry(at).or_insert(0);
        *p = (*p).max(until);
    }

    /// Makes node `at`'s clock run at `rate` (1.0: true time; 1.1: its timers take 10% longer).
    pub fn set_clock_rate(&self, at: Endpoint, rate: f64) {
        assert!(rate > 0.0, "a clock rate must be positive");
        self.inner.borrow_mut().clock_rate.insert(at, rate);
    }

    /// If node `at` is paused now, the time it resumes.
    fn paused_until(&self, at: Endpoint) -> Option<Micros> {
        let i = self.inner.borrow();
        i.paused.get(&at).copied().filter(|&u| u > i.now)
    }

    /// Whether node `at` is running.
    pub fn is_up(&self, at: Endpoint) -> bool {
        self.inner.borrow().nodes.get(&at).is_some_and(|s| s.node.is_some())
    }

    /// Runs `f` on node `at` (if running) with a context, then carries out what it did.
    pub fn dispatch(&self, at: Endpoint, f: impl FnOnce(&mut dyn Node, &mut dyn Ctx)) {
        self.dispatch_any(at, |n, ctx| {
            let as_node: &mut dyn Node = n;
            f(as_node, ctx)
        });
    }

    fn dispatch_any(&self, at: Endpoint, f: impl FnOnce(&mut dyn SimNode, &mut dyn Ctx)) {
        let (mut node, incarnation, now) = {
            let mut i = self.inner.borrow_mut();
            let now = i.now;
            let Some(slot) = i.nodes.get_mut(&at) else { return };
            let Some(node) = slot.node.take() else { return };
            (node, slot.incarnation, now)
        };
        let mut ctx = SimCtx { now, me: at, actions: Vec::new() };
        f(node.as_mut(), &mut ctx);
        let mut i = self.inner.borrow_mut();
        let slot = i.nodes.get_mut(&at).expect("slot exists");
        if slot.incarnation != incarnation {
            return; // crashed meanwhile (from inside f); its actions are lost with it
        }
        slot.node = Some(node);
        for a in ctx.actions {
            i.act(at, incarnation, a);
        }
    }

    /// Borrows node `at` as its concrete type (for tests that inspect a server).
    pub fn inspect<N: 'static, T>(&self, at: Endpoint, f: impl FnOnce(&N) -> T) -> Option<T> {
        let i = self.inner.borrow();
        let node = i.nodes.get(&at)?.node.as_ref()?;
        node.as_any().downcast_ref::<N>().map(f)
    }

    /// Runs `f` on node `at` as its concrete type, with a context (for tests that drive a
    /// server directly, such as submitting to a replicated state machine).
    pub fn with_node<N: 'static, T>(&self, at: Endpoint, f: impl FnOnce(&mut N, &mut dyn Ctx) -> T) -> Option<T> {
        let mut out = None;
        self.dispatch_any(at, |n, ctx| {
            if let Some(n) = n.as_any_mut().downcast_mut::<N>() {
                out = Some(f(n, ctx));
            }
        });
        out
    }

    // ------------------------------------------------------------ tasks

    /// Runs `fut` as a task; its result comes out of the handle.
    pub fn spawn<T: 'static>(&self, fut: impl Future<Output = T> + 'static) -> JoinHandle<T> {
        let slot = Rc::new(RefCell::new(JoinSlot { value: None, waker: None, done: false }));
        let s2 = slot.clone();
        let task: Task = Box::pin(async move {
            let v = fut.await;
            let mut s = s2.borrow_mut();
            s.value = Some(v);
            s.done = true;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        let id = {
            let mut i = self.inner.borrow_mut();
            let id = i.next_task;
            i.next_task += 1;
            i.tasks.insert(id, Some(task));
            id
        };
        self.runnable.lock().expect("runnable").push_back(id);
        JoinHandle { slot }
    }

    /// Runs the world until `fut` completes; panics if everything is blocked with nothing left
    /// to happen.
    pub fn block_on<T: 'static>(&self, fut: impl Future<Output = T> + 'static) -> T {
        let h = self.spawn(fut);
        loop {
            self.run_tasks();
            if let Some(v) = h.slot.borrow_mut().value.take() {
                return v;
            }
            assert!(self.handle_next(Micros::MAX), "deadlock: the main task waits but nothing can happen");
        }
    }

    /// Runs everything due within the next `d`.
    pub fn run_for(&self, d: Micros) {
        let until = self.now() + d;
        loop {
            self.run_tasks();
            if !self.handle_next(until) {
                break;
            }
        }
        self.inner.borrow_mut().now = until;
    }

    fn run_tasks(&self) {
        loop {
            let Some(id) = self.runnable.lock().expect("runnable").pop_front() else { return };
            let task = self.inner.borrow_mut().tasks.get_mut(&id).and_then(Option::take);
            let Some(mut task) = task else { continue }; // finished, or a duplicate wake
            let waker = Waker::from(Arc::new(TaskWaker { id, runnable: self.runnable.clone() }));
            let mut cx = Context::from_waker(&waker);
            match task.as_mut().poll(&mut cx) {
                Poll::Ready(()) => {
                    self.inner.borrow_mut().tasks.remove(&id);
                }
                Poll::Pending => {
                    self.inner.borrow_mut().tasks.insert(id, Some(task));
                }
            }
        }
    }

    /// Handles the next event due by `until`; false if there is none.
    fn handle_next(&self, until: Micros) -> bool {
        let ev = {
            let mut i = self.inner.borrow_mut();
            let Some((t, ev)) = i.events.pop_until(until) else { return false };
            i.now = t;
            i.handled += 1;
            ev
        };
        // A paused node handles nothing until it resumes; then everything due comes at once.
        let target = match &ev {
            Ev::Timer { node, .. } => Some(*node),
            Ev::Message { to, .. } | Ev::Request { to, .. } => Some(*to),
            _ => None,
        };
        if let Some(until) = target.and_then(|t| self.paused_until(t)) {
            self.inner.borrow_mut().events.push(until, ev);
            return true;
        }
        match ev {
            Ev::Wake(w) => w.wake(),
            Ev::Timer { node, incarnation, id } => {
                let current = self.inner.borrow().nodes.get(&node).is_some_and(|s| s.incarnation == incarnation);
                if current {
                    self.trace(1, node, &id.to_le_bytes());
                    self.dispatch(node, |n, ctx| n.on_timer(ctx, id));
                }
            }
            Ev::Message { from, to, bytes } => {
                let ok = self.is_up(to) && self.net(|n| n.arrive(from, to, false));
                if ok {
                    self.trace(2, to, &bytes);
                    self.dispatch(to, |n, ctx| n.on_message(ctx, from, bytes));
                }
            }
            Ev::Request { from, to, call, bytes } => {
                let ok = self.is_up(to) && self.net(|n| n.arrive(from, to, false));
                if ok {
                    self.trace(3, to, &bytes);
                    self.dispatch(to, |n, ctx| n.on_request(ctx, from, call, bytes));
                } else {
                    let mut i = self.inner.borrow_mut();
                    let wait = if i.net.config.long_delays { i.rng.below(7000 * MS) } else { i.rng.below(100 * MS) };
                    let at = i.now + wait;
                    i.events.push(at, Ev::Fail { call, err: RpcError::Failed });
                }
            }
            Ev::Reply { from, to, call, bytes } => {
                let ok = self.net(|n| n.arrive(from, to, true));
                self.trace(4, to, &bytes);
                self.resolve(call, if ok { Ok(bytes) } else { Err(RpcError::Failed) });
            }
            Ev::Fail { call, err } => self.resolve(call, Err(err)),
        }
        true
    }

    fn trace(&self, tag: u64, at: Endpoint, data: &[u8]) {
        let mut i = self.inner.borrow_mut();
        let mut h = i.trace;
        for b in i.now.to_le_bytes().iter().chain(tag.to_le_bytes().iter()).chain(at.to_le_bytes().iter()).chain(data) {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        i.trace = h;
    }

    fn resolve(&self, call: CallId, result: Result<Vec<u8>, RpcError>) {
        let mut i = self.inner.borrow_mut();
        if let Some(c) = i.calls.get_mut(&call)
            && c.result.is_none()
        {
            c.result = Some(result);
            if let Some(w) = c.waker.take() {
                w.wake();
            }
        }
    }

    fn start_call(&self, from: Endpoint, to: Endpoint, bytes: Vec<u8>, timeout: Micros) -> CallId {
        let mut i = self.inner.borrow_mut();
        let call = i.next_call;
        i.next_call += 1;
        i.calls.insert(call, PendingCall { result: None, waker: None });
        let now = i.now;
        let len = bytes.len();
        let Inner { net, rng, events, .. } = &mut *i;
        match net.send(rng, now, from, to, false, len) {
            Fate::Deliver(at) => {
                // A duplicated request runs the handler twice; the caller takes the first reply.
                if let Some(again) = net.duplicate(rng, at) {
                    events.push(again, Ev::Request { from, to, call, bytes: bytes.clone() });
                }
                events.push(at, Ev::Request { from, to, call, bytes })
            }
            Fate::Drop => events.push(now, Ev::Fail { call, err: RpcError::Failed }),
            Fate::FailAt(at) => events.push(at, Ev::Fail { call, err: RpcError::Failed }),
        }
        events.push(now + timeout, Ev::Fail { call, err: RpcError::Timeout });
        call
    }

    /// A client at address `me`.
    pub fn client(&self, me: Endpoint) -> SimClient {
        SimClient { world: self.clone(), me }
    }
}

impl Inner {
    fn act(&mut self, me: Endpoint, incarnation: u64, a: Action) {
        let now = self.now;
        match a {
            Action::Send { to, bytes } => {
                if let Fate::Deliver(at) = self.net.send(&mut self.rng, now, me, to, false, bytes.len()) {
                    if let Some(again) = self.net.duplicate(&mut self.rng, at) {
                        self.events.push(again, Ev::Message { from: me, to, bytes: bytes.clone() });
                    }
                    self.events.push(at, Ev::Message { from: me, to, bytes });
                }
            }
            Action::Reply { to, call, bytes } => match self.net.send(&mut self.rng, now, me, to, true, bytes.len()) {
                Fate::Deliver(at) => self.events.push(at, Ev::Reply { from: me, to, call, bytes }),
                Fate::Drop => self.events.push(now, Ev::Fail { call, err: RpcError::Failed }),
                Fate::FailAt(at) => self.events.push(at, Ev::Fail { call, err: RpcError::Failed }),
            },
            Action::Timer { after, id } => {
                let rate = self.clock_rate.get(&me).copied().unwrap_or(1.0);
                let after = if rate == 1.0 { after } else { (after as f64 * rate) as Micros };
                self.events.push(now + after, Ev::Timer { node: me, incarnation, id })
            }
        }
    }
}

struct JoinSlot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    done: bool,
}

/// The result of a spawned task.
pub struct JoinHandle<T> {
    slot: Rc<RefCell<JoinSlot<T>>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.slot.borrow().done
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.borrow_mut();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                assert!(!s.done, "JoinHandle polled after it returned its value");
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A client's view of the world: implements [`Transport`].
#[derive(Clone)]
pub struct SimClient {
    world: World,
    me: Endpoint,
}

impl SimClient {
    /// The client's address.
    pub fn me(&self) -> Endpoint {
        self.me
    }

    /// The world it lives in.
    pub fn world(&self) -> &World {
        &self.world
    }
}

struct CallFuture {
    world: World,
    call: CallId,
}

impl Future for CallFuture {
    type Output = Result<Vec<u8>, RpcError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut i = self.world.inner.borrow_mut();
        let c = i.calls.get_mut(&self.call).expect("call registered");
        match c.result.take() {
            Some(r) => {
                i.calls.remove(&self.call);
                Poll::Ready(r)
            }
            None => {
                c.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct Sleep {
    world: World,
    deadline: Micros,
    registered: bool,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.world.now() >= self.deadline {
            return Poll::Ready(());
        }
        if !self.registered {
            self.registered = true;
            let d = self.deadline;
            self.world.inner.borrow_mut().events.push(d, Ev::Wake(cx.waker().clone()));
        }
        Poll::Pending
    }
}

impl Transport for SimClient {
    fn call(&self, to: Endpoint, request: Vec<u8>, timeout: Micros) -> impl Future<Output = Result<Vec<u8>, RpcError>> {
        let call = self.world.start_call(self.me, to, request, timeout);
        CallFuture { world: self.world.clone(), call }
    }

    fn sleep(&self, d: Micros) -> impl Future<Output = ()> {
        Sleep { world: self.world.clone(), deadline: self.world.now() + d, registered: false }
    }

    fn now(&self) -> Micros {
        self.world.now()
    }
}
