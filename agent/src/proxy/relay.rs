//! Moving bytes both ways between the two ends of a proxied connection.
//!
//! Why not `tokio::io::copy_bidirectional`: it keeps two buffers per connection for the
//! connection's whole life (8 KiB each; more to go faster), so 10 000 idle connections
//! would hold 160 MiB of buffers, and its 8 KiB reads and writes cost a system call (and
//! a TLS record, an h2 frame) per 8 KiB. Here:
//!
//! - a TCP socket is read only once it is readable, into a buffer allocated for that
//!   read ([`READ_CHUNK`]): an idle connection holds no buffer at all;
//! - and only as much as the other end has room for ([`ChunkWrite::room`]): a tunnel
//!   stream whose peer stopped reading stops the relay from reading, so what a stalled
//!   stream pins is h2's bounded send buffer, not a chunk more;
//! - what was read goes on as `Bytes`, without a copy: into h2 DATA frames, or to the
//!   other socket;
//! - DATA frames that arrived together go to the socket in one `writev`.
//!
//! Half-close is kept: when one side ends, the other side's write half is shut down and
//! the reverse direction goes on. An error in either direction — a reset above all —
//! ends the relay and is passed on as an error, never as a clean end: both ends are
//! aborted ([`Duplex::abort`]: a TCP socket is reset, an HBONE stream gets
//! `RST_STREAM(CONNECT_ERROR)`, as RFC 9113 §8.5 asks of a CONNECT proxy), so a client
//! whose server died mid-response sees an error, not a truncated "complete" answer. The
//! bytes counted are those that crossed, on every path.
use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

use super::access_log::ConnectionRecord;

/// Bytes one read from a socket may take. With it and the tunnel's transport buffers, one
/// stream across the lab's nodes moved 1.7× the bytes of 8 KiB copies
/// (docs/performance.md).
const READ_CHUNK: usize = 64 * 1024;
/// A read shorter than this is copied into a buffer of its own size, so that a small
/// message waiting in h2's send buffer does not pin a whole [`READ_CHUNK`].
const SMALL_READ: usize = 8 * 1024;
/// Most buffers handed to one `writev`.
const MAX_IOV: usize = 64;

/// Where a relay reads from, in chunks.
pub(crate) trait ChunkRead {
    /// Wait until a read would not block: bytes, the end of the stream or an error wait.
    /// The relay asks the other end for room only then, so an idle connection reserves
    /// nothing.
    async fn ready(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Wait for bytes and append at least one non-empty chunk to `chunks`; `false` at the
    /// end of the stream (nothing appended). A reader that allocates for the read takes
    /// at most `limit` bytes (what the writer has room for); one that hands out what it
    /// already holds (h2 frames, inside their flow-control window) may ignore it.
    async fn read_chunks(&mut self, chunks: &mut VecDeque<Bytes>, limit: usize)
        -> io::Result<bool>;

    /// `n` bytes read from here were written to the other end.
    fn consumed(&mut self, _n: usize) {}
}

/// Where a relay writes to.
pub(crate) trait ChunkWrite {
    /// Wait until this end can take bytes without queueing them, and say how many (at
    /// most `wanted`). A tunnel stream answers with the send capacity h2 granted, so when
    /// its peer stops reading, the relay stops reading too instead of holding a chunk it
    /// cannot send: what one stalled stream pins is h2's bounded send buffer, no more.
    async fn room(&mut self, wanted: usize) -> io::Result<usize> {
        Ok(wanted)
    }

    /// Write every chunk, emptying `chunks`.
    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()>;

    /// Nothing more will be written (FIN, END_STREAM).
    async fn finish(&mut self) -> io::Result<()>;
}

/// A connection end a relay can read and write at the same time.
pub(crate) trait Duplex {
    type Reader<'a>: ChunkRead
    where
        Self: 'a;
    type Writer<'a>: ChunkWrite
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// The relay failed: end this side so that its peer sees an error too (a reset), not
    /// a clean end of stream. Called once, after the copying stopped.
    fn abort(&mut self);
}

/// Copy both ways until both sides are done, keeping half-close, or until no byte has
/// moved either way for `idle` (then both ends are aborted, as on any error). The byte
/// counts (and the error) go into `record`: `bytes_sent` downstream → upstream,
/// `bytes_received` back.
pub(crate) async fn relay<A, B>(
    downstream: &mut A,
    upstream: &mut B,
    record: &mut ConnectionRecord,
    idle: Duration,
) where
    A: Duplex,
    B: Duplex,
{
    let (mut sent, mut received) = (0, 0);
    let activity = Activity::new();
    let result = tokio::select! {
        result = copy_counted(downstream, upstream, &mut sent, &mut received, &activity) => result,
        () = activity.idle_for(idle) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {}: no byte either way", humantime::format_duration(idle)),
        )),
    };
    record.bytes_sent = sent;
    record.bytes_received = received;
    if let Err(err) = result {
        record.outcome = Err(err.to_string());
        downstream.abort();
        upstream.abort();
    }
}

/// Bytes copied `a` → `b` and `b` → `a` (tests: the relay without a record).
#[cfg(test)]
pub(crate) async fn copy_both_ways<A: Duplex, B: Duplex>(
    a: &mut A,
    b: &mut B,
) -> io::Result<(u64, u64)> {
    let (mut there, mut back) = (0, 0);
    copy_counted(a, b, &mut there, &mut back, &Activity::new()).await?;
    Ok((there, back))
}

/// When bytes last moved on a relay, either way: what its idle timeout watches.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` at the last chunk.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            tokio::time::sleep_until(last + idle).await;
            if self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) == last {
                return;
            }
        }
    }
}

/// Copy both ways, adding what crossed to `there` (`a` → `b`) and `back` as it goes, so
/// the counts are right when it fails too.
async fn copy_counted<A: Duplex, B: Duplex>(
    a: &mut A,
    b: &mut B,
    there: &mut u64,
    back: &mut u64,
    activity: &Activity,
) -> io::Result<()> {
    let (a_read, a_write) = a.halves();
    let (b_read, b_write) = b.halves();
    tokio::try_join!(
        copy_one_way(a_read, b_write, there, activity),
        copy_one_way(b_read, a_write, back, activity)
    )?;
    Ok(())
}

async fn copy_one_way<R: ChunkRead, W: ChunkWrite>(
    mut from: R,
    mut to: W,
    total: &mut u64,
    activity: &Activity,
) -> io::Result<()> {
    let mut chunks = VecDeque::new();
    loop {
        from.ready().await?;
        let limit = to.room(READ_CHUNK).await?;
        if !from.read_chunks(&mut chunks, limit).await? {
            break;
        }
        activity.touch();
        let n: usize = chunks.iter().map(Bytes::len).sum();
        to.write_chunks(&mut chunks).await?;
        from.consumed(n);
        *total += n as u64;
    }
    to.finish().await
}

impl<T: ChunkRead> ChunkRead for &mut T {
    async fn ready(&mut self) -> io::Result<()> {
        (**self).ready().await
    }

    async fn read_chunks(
        &mut self,
        chunks: &mut VecDeque<Bytes>,
        limit: usize,
    ) -> io::Result<bool> {
        (**self).read_chunks(chunks, limit).await
    }

    fn consumed(&mut self, n: usize) {
        (**self).consumed(n);
    }
}

impl<T: ChunkWrite> ChunkWrite for &mut T {
    async fn room(&mut self, wanted: usize) -> io::Result<usize> {
        (**self).room(wanted).await
    }

    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        (**self).write_chunks(chunks).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        (**self).finish().await
    }
}

/// Reading and writing a socket go through `&TcpStream` (readiness, then a
/// non-blocking call), so both directions share the socket without a lock.
impl Duplex for TcpStream {
    type Reader<'a> = &'a TcpStream;
    type Writer<'a> = &'a TcpStream;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        (&*self, &*self)
    }

    /// `SO_LINGER` 0: when its owner drops the socket (right after the relay), closing it
    /// sends RST and drops unsent bytes — the peer reads "connection reset", not an end
    /// of stream. (No `shutdown` here: that would send a FIN first.)
    fn abort(&mut self) {
        if let Err(err) = self.set_zero_linger() {
            tracing::debug!(error = %err, "cannot set SO_LINGER 0; the connection ends with FIN, not a reset");
        }
    }
}

impl ChunkRead for &TcpStream {
    async fn ready(&mut self) -> io::Result<()> {
        self.readable().await
    }

    async fn read_chunks(
        &mut self,
        chunks: &mut VecDeque<Bytes>,
        limit: usize,
    ) -> io::Result<bool> {
        loop {
            self.readable().await?;
            // Allocated only now that there is something to read, and only as much as
            // the other end has room for.
            let mut buf = BytesMut::with_capacity(limit.clamp(1, READ_CHUNK));
            match self.try_read_buf(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) if n < SMALL_READ.min(buf.capacity()) => {
                    chunks.push_back(Bytes::copy_from_slice(&buf))
                }
                Ok(_) => chunks.push_back(buf.freeze()),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
            return Ok(true);
        }
    }
}

impl ChunkWrite for &TcpStream {
    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        while !chunks.is_empty() {
            self.writable().await?;
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let count = chunks.len().min(MAX_IOV);
            for (slice, chunk) in slices.iter_mut().zip(chunks.iter()) {
                *slice = IoSlice::new(chunk);
            }
            match self.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => advance(chunks, n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        socket2::SockRef::from(*self).shutdown(Shutdown::Write)
    }
}

/// Drop the first `n` bytes of `chunks`.
fn advance(chunks: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = chunks.front_mut() else {
            return;
        };
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        chunks.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// A connected pair of sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// The access record a relay under test fills in.
    fn test_record() -> ConnectionRecord {
        ConnectionRecord::new(
            "test".into(),
            super::super::access_log::Direction::Inbound,
            "127.0.0.1:1".parse().unwrap(),
        )
    }

    #[test]
    fn advance_drops_whole_and_partial_chunks() {
        let mut chunks: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        advance(&mut chunks, 4);
        assert_eq!(
            chunks,
            [Bytes::from_static(b"e"), Bytes::from_static(b"fgh")]
        );
        advance(&mut chunks, 4);
        assert!(chunks.is_empty());
    }

    /// client ⇄ [a relay b] ⇄ server: bytes arrive intact both ways, in sizes that cross
    /// the chunk boundaries, and half-close travels: the server sees EOF after the
    /// client's last byte and can still answer.
    #[tokio::test]
    async fn copies_both_ways_and_keeps_half_close() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay = tokio::spawn(async move { copy_both_ways(&mut a, &mut b).await });

        let upload: Vec<u8> = (0..3 * READ_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let (sent, received) = tokio::join!(
            async {
                client.write_all(&upload).await.unwrap();
                client.shutdown().await.unwrap();
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                answer
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(b"thanks").await.unwrap();
                server.shutdown().await.unwrap();
                got
            }
        );
        assert_eq!(received, upload);
        assert_eq!(sent, b"thanks");
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (upload.len() as u64, 6));
    }

    /// A server that writes and then resets reaches the client as a reset, after the
    /// bytes that crossed, and the record counts those bytes and the error.
    #[tokio::test]
    async fn a_reset_reaches_the_other_side_as_a_reset() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut record = test_record();
            relay(&mut a, &mut b, &mut record, Duration::from_secs(3600)).await;
            record
        });
        server.write_all(&[7; 1000]).await.unwrap();
        server.flush().await.unwrap();
        let mut first = [0; 1000];
        client.read_exact(&mut first).await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        let mut rest = Vec::new();
        let err = client.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let record = relay.await.unwrap();
        assert!(record.outcome.is_err(), "{:?}", record.outcome);
        assert_eq!(record.bytes_received, 1000, "counted up to the reset");
    }

    /// Nothing moving either way for the idle timeout ends the relay with an error, both
    /// ends reset; bytes that keep moving keep it open. (Paused time: the clock jumps
    /// when every task waits.)
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_with_a_reset() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut record = test_record();
            relay(&mut a, &mut b, &mut record, Duration::from_secs(60)).await;
            record
        });
        // Active for longer than the timeout: one byte every 40 s, echoed.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client.write_all(b"x").await.unwrap();
            let mut one = [0; 1];
            server.read_exact(&mut one).await.unwrap();
        }
        assert!(!relay.is_finished(), "closed while bytes were moving");
        let record = relay.await.unwrap();
        let error = record.outcome.unwrap_err();
        assert!(error.contains("idle for 1m"), "{error}");
        assert_eq!(record.bytes_sent, 3);
        let mut rest = Vec::new();
        let err = client.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    /// A reset on one side ends the relay with an error instead of a clean end.
    #[tokio::test]
    async fn a_reset_is_an_error() {
        let (client, mut a) = pair().await;
        let (mut b, _server) = pair().await;
        client.set_zero_linger().unwrap();
        drop(client);
        let result = copy_both_ways(&mut a, &mut b).await;
        assert!(result.is_err(), "{result:?}");
    }
}
