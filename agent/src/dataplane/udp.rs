//! The QUIC endpoint's UDP socket, registered with the reactor for reading only.
//!
//! quinn's own tokio socket is registered for reading and writing. Edge-triggered, that wakes
//! the reactor once for every datagram sent, when the kernel frees it and the socket becomes
//! writable again: on a forwarded request (one datagram out, one in, per agent) that is one
//! `epoll_wait` in three. Sends here go straight to the socket; only after one would block
//! (the 16 MiB send buffer is full) does the sender register a duplicate of the socket for
//! writing, until it is writable again. Reads also skip the call that would only say the
//! socket is empty: a batch shorter than asked for drained it (as tokio does for TCP reads).

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Sleep;

/// quinn's tokio runtime with [`Socket`] for the endpoint's socket.
#[derive(Debug)]
pub struct ReadOnlyRegistration;

impl Runtime for ReadOnlyRegistration {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(Socket::new(sock)?))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

#[derive(Debug)]
pub struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send would have blocked, and no waiter has seen the socket writable since. quinn
    /// asks whether the socket is writable before every send; the answer is yes, at no cost,
    /// unless this is set.
    full: AtomicBool,
}

impl Socket {
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Socket> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        Ok(Socket { io: register(sock, Interest::READABLE)?, state, full: AtomicBool::new(false) })
    }
}

/// Registers `sock` with the reactor for `interest` only.
#[allow(unsafe_code)]
fn register(sock: std::net::UdpSocket, interest: Interest) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: a std `UdpSocket` owns its descriptor and returns that same one from `as_raw_fd`
    // until it is dropped, which happens only after the `AsyncFd` has deregistered it.
    unsafe { AsyncFd::register_with_interest(sock, interest) }.map_err(|e| e.into_parts().1)
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable { socket: self, waiting: None })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // `WouldBlock` goes back to quinn, which then waits on a `Writable`; other errors are
        // logged and dropped by quinn-udp, as with quinn's own socket (UDP may lose anything).
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
            self.full.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(quinn::udp::BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match self.state.recv(self.io.get_ref().into(), bufs, meta) {
                Ok(n) => {
                    // Fewer datagrams than asked for: the queue was empty when the kernel
                    // returned. One that arrived since is a new edge, which clearing the
                    // readiness seen by this guard does not lose.
                    if n < batch {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// How long a sender waits before trying again when the socket cannot be watched for room
/// (no descriptor left to duplicate it, say).
const RETRY_UNWATCHED: Duration = Duration::from_millis(1);

/// Whether the socket takes datagrams: yes, unless a send would have blocked; then it waits
/// through a duplicate of the socket registered for writing only while it waits (registering
/// reports the current state, so no wake-up is lost). It never fails: quinn ends a
/// connection's driver on an error here without closing the connection, which would leave a
/// peer's connection open and dead.
#[derive(Debug)]
struct Writable {
    socket: Arc<Socket>,
    waiting: Option<Wait>,
}

#[derive(Debug)]
enum Wait {
    Room(AsyncFd<std::net::UdpSocket>),
    Retry(Pin<Box<Sleep>>),
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.full.load(Ordering::Relaxed) {
            // Another waiter saw room first: drop this one's registration, or it would wake
            // the reactor for every datagram sent until the next wait.
            this.waiting = None;
            return Poll::Ready(Ok(()));
        }
        let socket = &this.socket;
        let wait = this.waiting.get_or_insert_with(|| {
            match socket.io.get_ref().try_clone().and_then(|dup| register(dup, Interest::WRITABLE)) {
                Ok(fd) => Wait::Room(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the QUIC socket for room; trying the send again in 1 ms");
                    Wait::Retry(Box::pin(tokio::time::sleep(RETRY_UNWATCHED)))
                }
            }
        });
        match wait {
            // An error (the reactor going away) also means: try the send again.
            Wait::Room(fd) => drop(ready!(fd.poll_write_ready(cx))),
            Wait::Retry(sleep) => ready!(Future::poll(sleep.as_mut(), cx)),
        }
        this.waiting = None;
        this.socket.full.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Arc<Socket> {
        Arc::new(Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap())
    }

    async fn recv(s: &Socket) -> Vec<Vec<u8>> {
        let mut storage = vec![[0u8; 1500]; quinn::udp::BATCH_SIZE];
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        let n = std::future::poll_fn(|cx| {
            let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            s.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        (0..n).map(|i| storage[i][..meta[i].len].to_vec()).collect()
    }

    #[tokio::test]
    async fn a_short_batch_clears_readiness_without_losing_the_next_datagram() {
        // Every round ends with a short batch (readiness cleared without a call that finds the
        // socket empty); the next round's datagrams must still wake the receiver.
        let (a, b) = (socket(), socket());
        let to = b.local_addr().unwrap();
        for round in 0..50u8 {
            let count = 1 + usize::from(round % 3);
            for i in 0..count {
                let payload = [round, i as u8];
                let t = Transmit { destination: to, ecn: None, contents: &payload, segment_size: None, src_ip: None };
                a.try_send(&t).unwrap();
            }
            let mut got = Vec::new();
            while got.len() < count {
                let batch = tokio::time::timeout(Duration::from_secs(2), recv(&b)).await;
                got.extend(batch.unwrap_or_else(|_| panic!("round {round}: a datagram was never seen")));
            }
            let want: Vec<Vec<u8>> = (0..count).map(|i| vec![round, i as u8]).collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    #[tokio::test]
    async fn a_waiter_that_finds_room_seen_by_another_drops_its_registration() {
        let a = socket();
        let dup = register(a.io.get_ref().try_clone().unwrap(), Interest::WRITABLE).unwrap();
        // This waiter registered; another then saw room and cleared `full`.
        let mut late = Writable { socket: a.clone(), waiting: Some(Wait::Room(dup)) };
        let ready = std::future::poll_fn(|cx| Pin::new(&mut late).poll_writable(cx));
        tokio::time::timeout(Duration::from_secs(2), ready).await.unwrap().unwrap();
        assert!(late.waiting.is_none(), "a left-over registration would wake the reactor per datagram sent");
    }

    #[tokio::test]
    async fn waiting_for_room_returns_at_once_on_a_socket_with_room() {
        // Registering reports the current state: a wait that starts after the buffer emptied
        // is not lost.
        let a = socket();
        let mut poller = a.clone().create_io_poller();
        for _ in 0..3 {
            // As after a send that would have blocked: the wait goes through the reactor.
            a.full.store(true, Ordering::Relaxed);
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
            );
            ready.await.expect("a writable socket was not reported writable").unwrap();
            assert!(!a.full.load(Ordering::Relaxed), "the socket is taken as writable again");
        }
    }
}
