//! Writing to a connection from the node's own thread.
//!
//! A reply used to travel from the node's loop through a queue to the connection's writer
//! task on a network thread, which then wrote it: one thread waking another for every batch,
//! on a busy 2-core machine a wait in the run queue of ~0.1 ms, on the path of every request.
//! An [`Outbox`] lets the node's loop write the frames itself: it gathers them ([`Outbox::push`])
//! and, at the end of its batch or before it blocks in a sync, sends them with one
//! non-blocking `send` ([`Outbox::flush`]). Only what the socket does not take at once (the
//! peer reads slowly) is handed to the connection's writer task ([`Outbox::run_writer`]),
//! which waits until the socket can take it; until that task has written everything, later
//! frames queue behind it, so frames never interleave nor reorder.
//!
//! Invariant: the socket is written by one side at a time: the flushing thread only while
//! `handed` is false (under the lock), the writer task only while it is true.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// The buffer of an outbox sent empty is kept up to this size (reused, not reallocated).
const KEPT_CAPACITY: usize = 1 << 20;

/// Frames waiting for one connection, and the right to write it.
pub struct Outbox {
    /// A duplicate of the connection's socket (closed with the outbox: a write after the
    /// connection closed fails, it never reaches another file that reused the number).
    fd: OwnedFd,
    state: Mutex<State>,
    /// Wakes the writer task once frames are handed to it.
    wake: Notify,
    /// Listed among the outboxes to flush ([`Outboxes`]).
    listed: AtomicBool,
    /// Most bytes waiting; frames beyond are dropped (the client's call times out, as on a full
    /// queue), so a client that stops reading cannot make the server's memory grow.
    limit: usize,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer task owns the socket until it has written everything pending.
    handed: bool,
    /// The connection failed or closed: frames are dropped.
    closed: bool,
    /// No more frames are taken; the writer ends once it wrote what waits.
    finishing: bool,
}

impl Outbox {
    /// An outbox for `socket` holding at most `limit` bytes.
    pub fn new(socket: &impl AsRawFd, limit: usize) -> io::Result<Outbox> {
        // SAFETY: dup(2) of a descriptor the caller holds open; the result is owned here.
        let fd = unsafe { libc::dup(socket.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Outbox {
            fd,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            listed: AtomicBool::new(false),
            limit,
        })
    }

    /// Adds one frame of `head` then `body` (see [`crate::frame`]); false if it was dropped
    /// (the outbox is full or the connection closed).
    pub fn push(&self, head: &[u8], body: &[u8]) -> bool {
        let mut s = self.state.lock().expect("outbox");
        let len = head.len() + body.len();
        // One frame of any size is taken (a snapshot may exceed the limit on its own).
        if s.closed
            || s.finishing
            || (!s.pending.is_empty() && s.pending.len() + len + crate::frame::HEADER_BYTES > self.limit)
        {
            return false;
        }
        s.pending.extend_from_slice(&(len as u32).to_le_bytes());
        s.pending.extend_from_slice(&crc32c::crc32c_append(crc32c::crc32c(head), body).to_le_bytes());
        s.pending.extend_from_slice(head);
        s.pending.extend_from_slice(body);
        true
    }

    /// Sends what is pending, without blocking: what the socket does not take goes to the
    /// writer task.
    pub fn flush(&self) {
        let mut s = self.state.lock().expect("outbox");
        if s.handed || s.closed || s.pending.is_empty() {
            return;
        }
        let mut sent = 0;
        while sent < s.pending.len() {
            let rest = &s.pending[sent..];
            // SAFETY: send(2) from a live buffer on a descriptor we own; MSG_NOSIGNAL: a closed
            // peer is an error, not a SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                sent += n as usize;
                continue;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => {
                    // The connection failed: the writer task ends, and its owner sees it.
                    s.closed = true;
                    s.pending = Vec::new();
                    drop(s);
                    self.wake.notify_one();
                    return;
                }
            }
        }
        s.pending.drain(..sent);
        if s.pending.is_empty() && s.pending.capacity() > KEPT_CAPACITY {
            // A burst's buffer is not kept for the connection's whole life.
            s.pending = Vec::new();
        }
        if !s.pending.is_empty() {
            s.handed = true;
            drop(s);
            self.wake.notify_one();
        }
    }

    /// The connection's writer task: writes what [`Outbox::flush`] could not, as the socket
    /// takes it. Returns when the connection fails, [`Outbox::close`] is called, or after
    /// [`Outbox::finish`] once everything is written.
    pub async fn run_writer<W: tokio::io::AsyncWrite + Unpin>(&self, mut w: W) {
        loop {
            self.wake.notified().await;
            loop {
                let chunk = {
                    let mut s = self.state.lock().expect("outbox");
                    if s.closed {
                        return;
                    }
                    if s.pending.is_empty() {
                        s.handed = false;
                        if s.finishing {
                            return;
                        }
                        break;
                    }
                    std::mem::take(&mut s.pending)
                };
                if w.write_all(&chunk).await.is_err() {
                    self.close();
                    return;
                }
            }
        }
    }

    /// Takes no more frames; what waits is still sent, then the writer task ends.
    pub fn finish(&self) {
        self.state.lock().expect("outbox").finishing = true;
        self.flush();
        self.wake.notify_one();
    }

    /// Drops what waits and refuses what comes; ends the writer task and shuts the
    /// connection down (at once: a node's job may still hold this outbox for a while).
    pub fn close(&self) {
        let mut s = self.state.lock().expect("outbox");
        s.closed = true;
        s.pending = Vec::new();
        // SAFETY: shutdown(2) on a descriptor we own; an error (already closed) changes nothing.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        drop(s);
        self.wake.notify_one();
    }
}

/// The outboxes a node's loop pushed to since its last flush.
#[derive(Default)]
pub struct Outboxes {
    dirty: Mutex<Vec<std::sync::Arc<Outbox>>>,
}

impl Outboxes {
    /// `o` has frames to flush.
    pub fn mark(&self, o: &std::sync::Arc<Outbox>) {
        if !o.listed.swap(true, Ordering::AcqRel) {
            self.dirty.lock().expect("outboxes").push(o.clone());
        }
    }

    /// Flushes every outbox marked since the last call.
    pub fn flush(&self) {
        let dirty = std::mem::take(&mut *self.dirty.lock().expect("outboxes"));
        for o in dirty {
            o.listed.store(false, Ordering::Release);
            o.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
    }

    /// Sets a socket's buffer (`SO_SNDBUF` or `SO_RCVBUF`) to `bytes`, which also stops the
    /// kernel from growing it: loopback's grow to tens of MB, and the writer task would then
    /// have nothing to do.
    fn small_buffer(socket: &impl AsRawFd, option: libc::c_int, bytes: libc::c_int) {
        // SAFETY: setsockopt(2) with a pointer to a live int of the size given.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    /// A connected pair on loopback with small buffers: (the side an outbox writes, the side a
    /// test reads).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // The receive buffer before connecting: the window is agreed on then.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        small_buffer(&socket, libc::SO_RCVBUF, 32 << 10);
        let c = socket.connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        small_buffer(&s, libc::SO_SNDBUF, 32 << 10);
        (s, c)
    }

    /// The next frame's payload, or a failure after 10 s (a test fails, it does not hang).
    async fn read(c: &mut tokio::net::TcpStream) -> Result<Vec<u8>, crate::frame::FrameError> {
        tokio::time::timeout(Duration::from_secs(10), crate::frame::read(c, 1 << 20))
            .await
            .expect("a frame within 10 s")
    }

    /// An outbox on a connected pair, its writer task running: (the outbox, the side a test
    /// reads, the writer).
    async fn with_writer() -> (Arc<Outbox>, tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        let (s, c) = pair().await;
        let out = Arc::new(Outbox::new(&s, 64 << 20).unwrap());
        let (_r, w) = s.into_split();
        let writer = tokio::spawn({
            let out = out.clone();
            async move { out.run_writer(w).await }
        });
        (out, c, writer)
    }

    #[test]
    fn frames_from_another_thread_arrive_whole_and_in_order_when_the_socket_fills() {
        let rt = runtime();
        rt.block_on(async {
            let (out, mut c, writer) = with_writer().await;
            // 16 MB through socket buffers of 32 KiB: most of it goes through the writer task,
            // and the frames pushed and flushed meanwhile (while it writes, as the reader
            // reads) must queue behind it.
            let frames = 2000u32;
            let pusher = std::thread::spawn({
                let out = out.clone();
                move || {
                    for i in 0..frames {
                        let body = vec![i as u8; 8000 + (i as usize % 7)];
                        assert!(out.push(&i.to_le_bytes(), &body));
                        out.flush();
                        // Paced, so that pushes and flushes go on while the writer writes.
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    out.flush();
                }
            });
            for i in 0..frames {
                let payload = read(&mut c).await.expect("a whole frame");
                assert_eq!(payload[..4], i.to_le_bytes(), "frame {i} in its place");
                assert_eq!(payload.len(), 4 + 8000 + (i as usize % 7));
                assert!(payload[4..].iter().all(|b| *b == i as u8), "frame {i} intact");
            }
            pusher.join().unwrap();
            out.close();
            tokio::time::timeout(Duration::from_secs(10), writer).await.expect("the writer ends").unwrap();
        });
    }

    /// Step by step on one thread, so that the order is certain: the writer task is partway
    /// through a frame when the socket gains room, and a frame flushed then must not be sent
    /// into the middle of it.
    #[test]
    fn a_frame_flushed_while_the_writer_writes_waits_behind_it() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (out, mut c, writer) = with_writer().await;
            let big = vec![1u8; 4 << 20];
            assert!(out.push(b"A", &big));
            out.flush(); // fills the socket; the rest is handed to the writer
            assert!(out.state.lock().unwrap().handed, "the socket took 4 MiB at once");
            tokio::time::sleep(Duration::from_millis(20)).await; // the writer takes it and waits
            assert!(out.push(b"B", b"small"));
            let mut room = vec![0u8; 100_000];
            tokio::io::AsyncReadExt::read_exact(&mut c, &mut room).await.unwrap();
            out.flush(); // the socket has room now, but the writer is inside frame A
            let mut rest = Vec::new();
            while rest.len() + room.len() < 8 + 1 + big.len() + 8 + 1 + 5 {
                let mut buf = vec![0u8; 65_536];
                let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut c, &mut buf))
                    .await
                    .expect("bytes within 10 s")
                    .unwrap();
                rest.extend_from_slice(&buf[..n]);
            }
            let stream = [room, rest].concat();
            let mut expected = crate::frame::encode(&[&b"A"[..], &big].concat());
            expected.extend(crate::frame::encode(b"Bsmall"));
            assert!(stream == expected, "the frames arrive whole and in order");
            out.close();
            writer.await.unwrap();
        });
    }

    #[test]
    fn a_finished_outbox_sends_what_waits_then_its_writer_ends() {
        let rt = runtime();
        rt.block_on(async {
            let (out, mut c, writer) = with_writer().await;
            // 30 MB, more than loopback's buffers take while nobody reads: the rest is the
            // writer's to send.
            for i in 0..3000u32 {
                assert!(out.push(&i.to_le_bytes(), &[7; 10_000]));
            }
            out.finish();
            assert!(!out.push(b"late", &[]), "a finished outbox takes nothing more");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!writer.is_finished(), "the writer still has frames to send");
            for i in 0..3000u32 {
                assert_eq!(read(&mut c).await.unwrap()[..4], i.to_le_bytes());
            }
            tokio::time::timeout(Duration::from_secs(10), writer).await.expect("the writer ends").unwrap();
        });
    }

    #[test]
    fn a_full_outbox_drops_frames_and_a_closed_one_refuses_them() {
        let rt = runtime();
        rt.block_on(async {
            let (s, mut c) = pair().await;
            // Each frame takes 8 + 1 + 40 = 49 bytes: the limit takes two, exactly.
            let out = Outbox::new(&s, 98).unwrap();
            assert!(out.push(b"a", &[1; 40]));
            assert!(out.push(b"b", &[2; 40]), "up to the limit: taken");
            assert!(!out.push(b"c", &[3; 40]), "over the limit: dropped");
            let one = Outbox::new(&s, 97).unwrap();
            assert!(one.push(b"a", &[1; 40]));
            assert!(!one.push(b"b", &[2; 40]), "a byte short: dropped");
            assert!(Outbox::new(&s, 10).unwrap().push(b"big", &[0; 1000]), "one frame of any size is taken");
            out.flush();
            assert_eq!(read(&mut c).await.unwrap(), [&b"a"[..], &[1; 40]].concat());
            assert_eq!(read(&mut c).await.unwrap(), [&b"b"[..], &[2; 40]].concat());
            assert!(out.push(b"d", &[4; 40]), "room again once sent");
            out.close();
            assert!(!out.push(b"e", &[5; 4]), "closed: refused");
            assert!(matches!(read(&mut c).await, Err(crate::frame::FrameError::Closed)));
        });
    }
}
