//! One tunnelled connection: an HTTP/2 stream seen as a byte stream.
//!
//! - **Reading** hands out the DATA frames h2 has received and returns receive capacity to
//!   the peer (WINDOW_UPDATE, batched by h2) only for the bytes the reader has taken, so a
//!   slow reader throttles the sender instead of growing a buffer. At most one received
//!   frame is held here; the rest wait inside h2, bounded by the stream window. The relay
//!   takes several frames at once and releases their capacity once it wrote them.
//! - **Writing** asks h2 for send capacity first (`reserve_capacity`/`poll_capacity`) and
//!   hands it no more than it granted, so a writer waits for the peer's window (and for
//!   h2's bounded send buffer) instead of queueing without limit.
//! - **Half-close**: `poll_shutdown` sends END_STREAM; the other direction keeps flowing.
//!   Reading returns EOF when the peer has ended its side.
//! - **Resets**: a RST_STREAM from the peer, or the connection dying under the stream,
//!   surfaces as an `io::Error` (`ConnectionReset`, `BrokenPipe` when writing into a stream
//!   the peer has finished with, `ConnectionAborted` on GOAWAY), never as a clean EOF, so a
//!   relay can propagate the abort. Dropping the stream before both sides ended resets it.
use std::{
    collections::VecDeque,
    fmt,
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;
use crate::proxy::relay::{ChunkRead, ChunkWrite, Duplex};

/// Most bytes of already-received DATA frames handed to a relay in one batch (one
/// `writev` to the application's socket).
const MAX_READ_BATCH: usize = 256 * 1024;

/// One HBONE tunnel: `AsyncRead + AsyncWrite` over an HTTP/2 CONNECT stream, and a
/// [`Duplex`] for the relay, which moves h2's DATA frames without copying them.
///
/// `poll_flush` returns at once: bytes handed to h2 are written to the transport by the
/// connection's own task.
pub struct HboneStream {
    reader: HboneReader,
    writer: HboneWriter,
}

/// The receiving half: DATA frames from the peer.
pub struct HboneReader {
    recv: RecvStream,
    /// Received bytes not yet read; their capacity is released as they are read.
    unread: Bytes,
    read_eof: bool,
}

/// The sending half: DATA frames to the peer, END_STREAM on shutdown.
pub struct HboneWriter {
    send: SendStream<Bytes>,
    write_shut: bool,
    /// Client side: this stream's place in its pooled connection, given back on drop.
    _slot: Option<StreamSlot>,
}

impl HboneStream {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        HboneStream {
            reader: HboneReader {
                recv,
                unread: Bytes::new(),
                read_eof: false,
            },
            writer: HboneWriter {
                send,
                write_shut: false,
                _slot: slot,
            },
        }
    }
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.writer.send.stream_id())
            .field("unread", &self.reader.unread.len())
            .field("read_eof", &self.reader.read_eof)
            .field("write_shut", &self.writer.write_shut)
            .finish()
    }
}

impl HboneReader {
    /// The next DATA frame with bytes in it; `None` once the peer ended its side.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            if self.read_eof {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => self.read_eof = true,
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => return Poll::Ready(Ok(Some(data))),
                Some(Err(err)) => return Poll::Ready(Err(h2_to_io(err, Direction::Read))),
            }
        }
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.unread.is_empty() {
            match ready!(self.poll_frame(cx))? {
                Some(data) => self.unread = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        self.release(n);
        Poll::Ready(Ok(()))
    }

    /// Give `n` bytes of receive window back to the peer.
    fn release(&mut self, n: usize) {
        // Fails only if the stream is already gone, which the next read reports.
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl ChunkRead for HboneReader {
    /// Waits for one frame, then takes the frames h2 already holds, up to
    /// [`MAX_READ_BATCH`] bytes, so that one write to the application carries them all.
    async fn read_chunks(
        &mut self,
        chunks: &mut VecDeque<Bytes>,
        _limit: usize,
    ) -> io::Result<bool> {
        if !self.unread.is_empty() {
            chunks.push_back(std::mem::take(&mut self.unread));
        } else {
            match poll_fn(|cx| self.poll_frame(cx)).await? {
                Some(data) => chunks.push_back(data),
                None => return Ok(false),
            }
        }
        let mut batch = chunks.back().map_or(0, Bytes::len);
        while batch < MAX_READ_BATCH {
            match poll_fn(|cx| Poll::Ready(self.poll_frame(cx))).await {
                Poll::Ready(Ok(Some(data))) => {
                    batch += data.len();
                    chunks.push_back(data);
                }
                // The end (seen again by the next call) or nothing more yet.
                Poll::Ready(Ok(None)) | Poll::Pending => break,
                Poll::Ready(Err(err)) => return Err(err),
            }
        }
        Ok(true)
    }

    /// The peer may send as much again once the application took it (backpressure).
    fn consumed(&mut self, n: usize) {
        self.release(n);
    }
}

impl HboneWriter {
    /// The error for a stream h2 will no longer send on: the reset reason if the peer (or
    /// the connection) gave one.
    fn poll_send_error(&mut self, cx: &mut Context<'_>, fallback: h2::Error) -> Poll<io::Error> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(reset_error(reason, Direction::Write)),
            Poll::Ready(Err(err)) => Poll::Ready(h2_to_io(err, Direction::Write)),
            // No reset recorded: the failure was local (h2 "user error"); report it as is.
            Poll::Pending => Poll::Ready(h2_to_io(fallback, Direction::Write)),
        }
    }

    fn check_open(&self) -> io::Result<()> {
        if self.write_shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an HBONE stream after shutdown",
            ));
        }
        Ok(())
    }

    /// Wait until h2 grants send capacity (asking for `wanted` bytes); the capacity.
    fn poll_granted(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        loop {
            // Capacity already granted (left over from a larger reservation) is used first.
            let granted = self.send.capacity();
            if granted > 0 {
                return Poll::Ready(Ok(granted));
            }
            self.send.reserve_capacity(wanted);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return self.poll_send_error(cx, err).map(Err),
                None => {
                    // The stream can no longer send: reset by the peer or the connection.
                    return match ready!(self.send.poll_reset(cx)) {
                        Ok(reason) => Poll::Ready(Err(reset_error(reason, Direction::Write))),
                        Err(err) => Poll::Ready(Err(h2_to_io(err, Direction::Write))),
                    };
                }
            }
        }
    }

    /// Hand h2 as much of `data` as it has capacity for; `data` keeps the rest.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
        wanted: usize,
    ) -> Poll<io::Result<()>> {
        let granted = ready!(self.poll_granted(cx, wanted))?;
        let part = data.split_to(granted.min(data.len()));
        match self.send.send_data(part, false) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) => self.poll_send_error(cx, err).map(Err),
        }
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_shut {
            return Poll::Ready(Ok(()));
        }
        // Give back capacity reserved for writes that will never come.
        self.send.reserve_capacity(0);
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.write_shut = true;
                Poll::Ready(Ok(()))
            }
            Err(err) => match ready!(self.poll_send_error(cx, err)) {
                // The peer said "stop sending, no error": our side is as closed as asked.
                err if is_no_error_reset(&err) => {
                    self.write_shut = true;
                    Poll::Ready(Ok(()))
                }
                err => Poll::Ready(Err(err)),
            },
        }
    }
}

impl ChunkWrite for HboneWriter {
    /// The send capacity h2 grants this stream: within the peer's windows and h2's send
    /// buffer ([`super::tuning::MAX_SEND_BUFFER`]), so a peer that stops reading holds
    /// the relay here, before it reads more from the application.
    async fn room(&mut self, wanted: usize) -> io::Result<usize> {
        self.check_open()?;
        poll_fn(|cx| self.poll_granted(cx, wanted)).await
    }

    /// The chunks go to h2 as they are (no copy), as fast as the peer's window allows.
    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        self.check_open()?;
        let mut wanted: usize = chunks.iter().map(Bytes::len).sum();
        while let Some(chunk) = chunks.front_mut() {
            let before = chunk.len();
            poll_fn(|cx| self.poll_send(cx, chunk, wanted)).await?;
            wanted -= before - chunk.len();
            if chunk.is_empty() {
                chunks.pop_front();
            }
        }
        // Capacity granted for a read that came back short: give it back to the
        // connection, or an idle stream would sit on part of the peer's window.
        if self.send.capacity() > 0 {
            self.send.reserve_capacity(0);
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_finish(cx)).await
    }
}

impl Duplex for HboneStream {
    type Reader<'a> = &'a mut HboneReader;
    type Writer<'a> = &'a mut HboneWriter;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        (&mut self.reader, &mut self.writer)
    }

    /// `RST_STREAM(CONNECT_ERROR)`: what RFC 9113 §8.5 has a CONNECT proxy send when its
    /// TCP connection fails; the peer agent resets its socket in turn.
    fn abort(&mut self) {
        self.writer.send.send_reset(Reason::CONNECT_ERROR);
        self.writer.write_shut = true;
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().reader.poll_read_into(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let writer = &mut self.get_mut().writer;
        writer.check_open()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(writer.poll_granted(cx, buf.len()))?;
        let n = granted.min(buf.len());
        match writer
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(err) => writer.poll_send_error(cx, err).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer.poll_finish(cx)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Marks the io::Error made from a RST_STREAM(NO_ERROR), so shutdown can recognise it.
#[derive(Debug, thiserror::Error)]
#[error("the peer reset the HBONE stream ({reason})")]
struct StreamReset {
    reason: Reason,
}

fn is_no_error_reset(err: &io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<StreamReset>())
        .is_some_and(|reset| reset.reason == Reason::NO_ERROR)
}

fn reset_error(reason: Reason, direction: Direction) -> io::Error {
    let kind = match (direction, reason) {
        // Like writing to a TCP socket the peer closed: EPIPE.
        (Direction::Write, Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
            io::ErrorKind::BrokenPipe
        }
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, StreamReset { reason })
}

fn h2_to_io(err: h2::Error, direction: Direction) -> io::Error {
    if err.is_io() {
        return match err.into_io() {
            Some(io) => io,
            None => io::Error::other("HBONE connection I/O error"),
        };
    }
    match err.reason() {
        Some(reason) if err.is_reset() => reset_error(reason, direction),
        Some(_) if err.is_go_away() => io::Error::new(io::ErrorKind::ConnectionAborted, err),
        _ => io::Error::new(io::ErrorKind::ConnectionReset, err),
    }
}
