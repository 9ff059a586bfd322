//! One tunnelled connection: an HTTP/2 stream seen as a byte stream.
//!
//! - **Reading** hands out the DATA frames h2 has received and returns receive capacity to
//!   the peer (WINDOW_UPDATE, batched by h2) only for the bytes the reader has taken, so a
//!   slow reader throttles the sender instead of growing a buffer. At most one received
//!   frame is held here; the rest wait inside h2, bounded by the stream window.
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
    fmt, io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;

/// One HBONE tunnel: `AsyncRead + AsyncWrite` over an HTTP/2 CONNECT stream.
///
/// `poll_flush` returns at once: bytes handed to h2 are written to the transport by the
/// connection's own task.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read; their capacity is released as they are read.
    unread: Bytes,
    read_eof: bool,
    write_shut: bool,
    /// Client side: this stream's place in its pooled connection, given back on drop.
    _slot: Option<StreamSlot>,
}

impl HboneStream {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        HboneStream {
            send,
            recv,
            unread: Bytes::new(),
            read_eof: false,
            write_shut: false,
            _slot: slot,
        }
    }

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
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.send.stream_id())
            .field("unread", &self.unread.len())
            .field("read_eof", &self.read_eof)
            .field("write_shut", &self.write_shut)
            .finish()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.unread.is_empty() {
                let n = buf.remaining().min(this.unread.len());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                // Fails only if the stream is already gone, which the next read reports.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => this.read_eof = true,
                Some(Ok(data)) => this.unread = data,
                Some(Err(err)) => return Poll::Ready(Err(h2_to_io(err, Direction::Read))),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an HBONE stream after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Capacity already granted (left over from a larger reservation) is used first.
            let granted = this.send.capacity();
            if granted > 0 {
                let n = granted.min(buf.len());
                return match this
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(err) => this.poll_send_error(cx, err).map(Err),
                };
            }
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return this.poll_send_error(cx, err).map(Err),
                None => {
                    // The stream can no longer send: reset by the peer or the connection.
                    return match ready!(this.send.poll_reset(cx)) {
                        Ok(reason) => Poll::Ready(Err(reset_error(reason, Direction::Write))),
                        Err(err) => Poll::Ready(Err(h2_to_io(err, Direction::Write))),
                    };
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_shut {
            return Poll::Ready(Ok(()));
        }
        // Give back capacity reserved for writes that will never come.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.write_shut = true;
                Poll::Ready(Ok(()))
            }
            Err(err) => match ready!(this.poll_send_error(cx, err)) {
                // The peer said "stop sending, no error": our side is as closed as asked.
                err if is_no_error_reset(&err) => {
                    this.write_shut = true;
                    Poll::Ready(Ok(()))
                }
                err => Poll::Ready(Err(err)),
            },
        }
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
