//! Splicing a forwarded connection: a TCP connection with a QUIC stream (or with another TCP
//! connection, for an instance on this host), both ways, with half-close, holding no buffer
//! while idle.
//!
//! A forwarded connection spends most of its life idle (keep-alive HTTP, WebSockets, Meteor's
//! DDP), so what it holds then is what a sidecar pays per open connection. Here that is the
//! two ends and two empty [`Bytes`]: QUIC data arrives as chunks quinn already owns, and TCP
//! data is read into a fresh chunk only once the socket is readable; a chunk lives until the
//! other end has taken it (for QUIC, until quinn has it acknowledged). The future is written by
//! hand because the same logic as two joined async blocks held 640 bytes of state per
//! connection; [`Splice`] holds about 200.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant, Sleep};

/// The most one read takes from either end.
const READ_CHUNK: usize = 64 * 1024;
/// The most QUIC frames joined into one write to TCP (about 70 KB at a 9 KB MTU).
const COALESCE: usize = 8;

/// One end of a splice: a source of chunks and a sink for the other end's.
pub trait End: Unpin {
    /// The next chunk; `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;
    /// Writes some of `data` (at least one byte), leaving in it what was not written.
    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;
    /// Ends this end's write direction (TCP shutdown, QUIC finish) and waits until it is done.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// Gives up reading, because the other end can no longer take the data.
    fn abort_read(&mut self);
    /// Gives up writing, because the other end failed.
    fn abort_write(&mut self);
    /// Ends both ways so that the peer sees a failure, not an end of stream: the splice is
    /// closed with data it could not deliver.
    fn reset(&mut self);
}

impl End for TcpStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        ready!(self.poll_read_ready(cx))?;
        // Readiness can be spurious (a first edge, a wake-up whose data an earlier read took):
        // the chunk is allocated here and dropped if the read finds nothing. `poll_read`
        // (unlike `try_read_buf`) takes a short read as proof the socket is drained, which
        // saves the read that would only say so, one syscall per request on small exchanges.
        let mut chunk = BytesMut::with_capacity(READ_CHUNK);
        match ready!(tokio_util::io::poll_read_buf(Pin::new(self), cx, &mut chunk)) {
            Ok(0) => Poll::Ready(Ok(None)),
            // A small read would pin the whole chunk until the other end lets go of it.
            Ok(n) if n < READ_CHUNK / 8 => Poll::Ready(Ok(Some(Bytes::copy_from_slice(&chunk)))),
            Ok(_) => Poll::Ready(Ok(Some(chunk.freeze()))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let _ = ready!(Pin::new(self).poll_shutdown(cx));
        Poll::Ready(())
    }

    fn abort_read(&mut self) {}

    fn abort_write(&mut self) {
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }

    fn reset(&mut self) {
        // Closing with a zero linger sends an RST instead of a FIN.
        let _ = socket2::SockRef::from(&*self).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// A QUIC stream as one end. quinn's read and write futures are cancel-safe, so each poll
/// makes a fresh one and nothing of them is kept between polls.
pub struct QuicEnd {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// After `finish`: until the peer has acknowledged everything (or stopped the stream).
    /// Boxed, and only then: quinn's `stopped` future must stay registered between polls.
    stopped: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl std::fmt::Debug for QuicEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicEnd").field("stream", &self.send.id()).field("finishing", &self.stopped.is_some()).finish()
    }
}

impl QuicEnd {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> QuicEnd {
        QuicEnd { send, recv, stopped: None }
    }
}

impl End for QuicEnd {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // quinn hands data over one QUIC frame at a time (a packet's worth, 1.2 to 9 KB). Each
        // chunk written to TCP on its own costs a send and, on the receiving host, a segment:
        // on a bulk transfer that was two thirds of the receiving agent's CPU. What has
        // already arrived is taken at once and joined, so the TCP side writes up to 64 KB.
        let mut chunks: [Bytes; COALESCE] = Default::default();
        let read = {
            let read = self.recv.read_chunks(&mut chunks);
            let read = std::pin::pin!(read);
            ready!(read.poll(cx))
        };
        Poll::Ready(match read {
            Ok(None) => Ok(None),
            Ok(Some(1)) => Ok(Some(std::mem::take(&mut chunks[0]))),
            Ok(Some(n)) => {
                let mut joined = BytesMut::with_capacity(chunks[..n].iter().map(Bytes::len).sum());
                for c in &chunks[..n] {
                    joined.extend_from_slice(c);
                }
                Ok(Some(joined.freeze()))
            }
            Err(e) => Err(io::Error::other(e)),
        })
    }

    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        // Moves the chunk into quinn without a copy; a partial write leaves the rest in `data`.
        let write = self.send.write_chunks(std::slice::from_mut(data));
        let write = std::pin::pin!(write);
        ready!(write.poll(cx)).map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let send = &mut self.send;
        let stopped = self.stopped.get_or_insert_with(|| {
            let _ = send.finish();
            let stopped = send.stopped();
            Box::pin(async move {
                let _ = stopped.await;
            })
        });
        stopped.as_mut().poll(cx)
    }

    fn abort_read(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }

    fn abort_write(&mut self) {
        let _ = self.send.reset(0u32.into());
    }

    fn reset(&mut self) {
        self.abort_write();
        self.abort_read();
    }
}

/// One direction of a splice.
#[derive(Debug, Default)]
struct Flow {
    /// Read from one end, not yet taken by the other; empty most of the time.
    pending: Bytes,
    state: FlowState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    #[default]
    Open,
    /// The source ended: the sink's write side is being closed.
    Finishing,
    Done,
}

impl Flow {
    /// Moves what it can; sets `moved` when a byte was read or written.
    fn poll(&mut self, from: &mut impl End, to: &mut impl End, cx: &mut Context<'_>, moved: &mut bool) -> Poll<()> {
        loop {
            match self.state {
                FlowState::Open if !self.pending.is_empty() => match ready!(to.poll_put(cx, &mut self.pending)) {
                    Ok(()) => *moved = true,
                    Err(_) => {
                        from.abort_read();
                        self.pending = Bytes::new();
                        self.state = FlowState::Done;
                    }
                },
                FlowState::Open => match ready!(from.poll_chunk(cx)) {
                    Ok(Some(chunk)) => {
                        self.pending = chunk;
                        *moved = true;
                    }
                    Ok(None) => self.state = FlowState::Finishing,
                    Err(_) => {
                        to.abort_write();
                        self.state = FlowState::Done;
                    }
                },
                FlowState::Finishing => {
                    ready!(to.poll_finish(cx));
                    self.state = FlowState::Done;
                }
                FlowState::Done => return Poll::Ready(()),
            }
        }
    }
}

/// How long a spliced connection may carry no byte either way before both ends are closed,
/// and the counter of connections closed so.
#[derive(Debug, Clone)]
pub struct IdleLimit {
    pub after: Duration,
    pub closed: Counter,
}

/// Checks per idle limit: a splice is closed after more than this many checks in a row found
/// it quiet, between 1 and 1.25 times the limit after its last byte.
const IDLE_CHECKS: u8 = 4;

/// A splice's idle timer. Traffic does not touch the timer (moving it takes the timer wheel's
/// lock) nor read the clock: it only zeroes `quiet`, and the timer fires every quarter of the
/// limit, counting the quiet quarters.
#[derive(Debug)]
struct Idle {
    sleep: Pin<Box<Sleep>>,
    limit: Arc<IdleLimit>,
    /// Checks in a row that found the splice quiet.
    quiet: u8,
}

impl Idle {
    fn period(&self) -> Duration {
        self.limit.after / u32::from(IDLE_CHECKS)
    }

    /// Whether the splice has carried nothing for the limit; otherwise leaves the timer set.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            self.quiet += 1;
            if self.quiet > IDLE_CHECKS {
                return true;
            }
            // From now, not from the missed deadline: after a stall (the process paused, the
            // thread busy) a splice that has just carried bytes is not closed for the quarters
            // it was not looked at.
            let next = self.sleep.deadline().max(Instant::now()) + self.period();
            self.sleep.as_mut().reset(next);
        }
        false
    }
}

/// Copies between `a` and `b` both ways until both directions have ended; an end of stream
/// on one side closes the other side's write direction only (half-close). With an idle limit,
/// a splice that carries nothing either way for that long is closed at both ends.
#[derive(Debug)]
pub struct Splice<A: End, B: End> {
    a: A,
    b: B,
    a_to_b: Flow,
    b_to_a: Flow,
    idle: Option<Idle>,
}

impl<A: End, B: End> Splice<A, B> {
    pub fn new(a: A, b: B) -> Self {
        Splice { a, b, a_to_b: Flow::default(), b_to_a: Flow::default(), idle: None }
    }

    /// Closes the splice after `limit.after` without a byte either way (`None`: never).
    pub fn idle_limit(mut self, limit: Option<&Arc<IdleLimit>>) -> Self {
        self.idle = limit.map(|limit| {
            let first = Instant::now() + limit.after / u32::from(IDLE_CHECKS);
            Idle { sleep: Box::pin(tokio::time::sleep_until(first)), limit: limit.clone(), quiet: 0 }
        });
        self
    }

    /// A splice whose first bytes each way were already read: `a_to_b` goes to `b` first,
    /// `b_to_a` to `a` (what an HTTP parser read past an upgrade response).
    pub fn with_pending(a: A, b: B, a_to_b: Bytes, b_to_a: Bytes) -> Self {
        Splice {
            a,
            b,
            a_to_b: Flow { pending: a_to_b, state: FlowState::Open },
            b_to_a: Flow { pending: b_to_a, state: FlowState::Open },
            idle: None,
        }
    }
}

impl<A: End, B: End> Future for Splice<A, B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut moved = false;
        let forward = this.a_to_b.poll(&mut this.a, &mut this.b, cx, &mut moved);
        let backward = this.b_to_a.poll(&mut this.b, &mut this.a, cx, &mut moved);
        if forward.is_ready() && backward.is_ready() {
            return Poll::Ready(());
        }
        if let Some(idle) = &mut this.idle {
            if moved {
                idle.quiet = 0;
            }
            if idle.expired(cx) {
                idle.limit.closed.inc();
                if this.a_to_b.pending.is_empty() && this.b_to_a.pending.is_empty() {
                    // Both ways at both ends: TCP ends see a FIN, QUIC ends a reset and a stop.
                    this.a.abort_write();
                    this.b.abort_write();
                    this.a.abort_read();
                    this.b.abort_read();
                } else {
                    // A sink took nothing for the whole limit: what it left is dropped, and
                    // its peer must not take the close for the end of the stream.
                    this.a.reset();
                    this.b.reset();
                }
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

/// A future that holds `guard` as long as it runs: a task spawned with it drops both together,
/// with no async state of its own.
#[derive(Debug)]
pub struct Holding<F, G> {
    future: F,
    _guard: G,
}

impl<F: Future + Unpin, G: Unpin> Holding<F, G> {
    pub fn new(future: F, guard: G) -> Self {
        Holding { future, _guard: guard }
    }
}

impl<F: Future + Unpin, G: Unpin> Future for Holding<F, G> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.get_mut().future).poll(cx)
    }
}

/// Splices a TCP connection with a QUIC stream.
pub fn tcp_quic(tcp: TcpStream, send: quinn::SendStream, recv: quinn::RecvStream) -> Splice<TcpStream, QuicEnd> {
    Splice::new(tcp, QuicEnd::new(send, recv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn tcp_to_tcp_carries_bytes_both_ways_with_half_close() {
        // client <-> (x | splice | y) <-> server
        let (mut client, x) = pair().await;
        let (y, mut server) = pair().await;
        let splice = tokio::spawn(Splice::new(x, y));
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "every byte arrives, in order, then the end of stream");
        // The other direction still works after the client's half-close.
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        tokio::time::timeout(std::time::Duration::from_secs(5), splice).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_splice_closes_once_idle_for_the_limit_and_not_while_bytes_move() {
        use std::time::Duration;
        let (mut client, x) = pair().await;
        let (y, mut server) = pair().await;
        let limit = Arc::new(IdleLimit { after: Duration::from_millis(300), closed: Counter::default() });
        let splice = tokio::spawn(Splice::new(x, y).idle_limit(Some(&limit)));
        // Bytes each way every 100 ms for three times the limit: the splice stays open.
        let mut buf = [0u8; 4];
        for i in 0..9u32 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (from, to) = if i % 2 == 0 { (&mut client, &mut server) } else { (&mut server, &mut client) };
            from.write_all(&i.to_be_bytes()).await.unwrap();
            to.read_exact(&mut buf).await.unwrap();
            assert_eq!(u32::from_be_bytes(buf), i);
        }
        let start = tokio::time::Instant::now();
        assert!(!splice.is_finished(), "a splice carrying bytes was closed");
        assert_eq!(limit.closed.get(), 0);
        // Then nothing: both ends see the end of the stream soon after the limit.
        let eof = tokio::time::timeout(Duration::from_secs(5), async {
            (client.read(&mut buf).await.unwrap(), server.read(&mut buf).await.unwrap())
        });
        assert_eq!(eof.await.expect("the idle splice was not closed"), (0, 0));
        // Never before the limit, at most a quarter of it late (plus scheduling).
        assert!(start.elapsed() >= Duration::from_millis(300), "closed after {:?}", start.elapsed());
        tokio::time::timeout(Duration::from_secs(1), splice).await.unwrap().unwrap();
        assert_eq!(limit.closed.get(), 1, "the close is counted");
    }

    #[tokio::test]
    async fn an_idle_close_with_undelivered_bytes_resets_instead_of_ending_the_stream() {
        use std::time::Duration;
        let (mut client, x) = pair().await;
        let (y, _server) = pair().await; // never reads
        let limit = Arc::new(IdleLimit { after: Duration::from_millis(300), closed: Counter::default() });
        let splice = tokio::spawn(Splice::new(x, y).idle_limit(Some(&limit)));
        // Fill every buffer between the client and the server, until the client's writes wait.
        let chunk = vec![7u8; 64 * 1024];
        while let Ok(written) = tokio::time::timeout(Duration::from_millis(200), client.write_all(&chunk)).await {
            written.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), splice).await.expect("the stuck splice was not closed").unwrap();
        assert_eq!(limit.closed.get(), 1);
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await;
        assert!(
            read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the client must not see a clean end of stream: {read:?}"
        );
    }

    #[test]
    fn an_idle_splice_is_small() {
        let size = std::mem::size_of::<Splice<TcpStream, QuicEnd>>();
        eprintln!("Splice<TcpStream, QuicEnd>: {size} bytes");
        assert!(size <= 256, "Splice<TcpStream, QuicEnd> is {size} bytes");
    }
}
