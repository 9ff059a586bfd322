//! The TCP socket under a tunnel's TLS: bare until the handshake is done, buffered
//! after.
//!
//! Invariants:
//! - **Nothing is allocated per connection before the peer has proved who it is.** An
//!   unauthenticated client can open as many TCP connections to 15008 as the limits let
//!   it; with the 2 × 64 KiB transport buffers allocated at accept, ~15,000 idle
//!   connections from a host outside the mesh took an agent from 38 MB to 2.2 GB (the
//!   DaemonSet's limit is 512 MiB). Bare, a pending handshake costs its task, the socket
//!   and rustls's small handshake state.
//! - **Switching loses no byte.** The bare socket has no buffer of its own, so every byte
//!   read before [`Transport::buffer`] is in rustls's hands and every byte written has
//!   reached the socket; the buffers start empty.
//!
//! After the handshake the buffers pay for themselves (see [`super::tuning::TRANSPORT_BUFFER`]
//! and docs/performance.md): one `recv` fills 64 KiB instead of rustls's 4 KiB reads, and
//! the records of one h2 flush leave in one `send`.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadBuf},
    net::TcpStream,
};

use super::tuning::TRANSPORT_BUFFER;

/// A tunnel's TCP socket; see the module's invariants.
#[derive(Debug)]
pub struct Transport(State);

#[derive(Debug)]
enum State {
    /// During the TLS handshake: no buffers.
    Bare(TcpStream),
    /// Once the peer is authenticated.
    Buffered(BufWriter<BufReader<TcpStream>>),
    /// Only while switching (never observed from outside `buffer`).
    Switching,
}

impl Transport {
    pub fn new(tcp: TcpStream) -> Self {
        Self(State::Bare(tcp))
    }

    /// Give the socket its buffers: call once the handshake has completed, before the
    /// tunnel carries data. Calling it again changes nothing.
    pub fn buffer(&mut self) {
        self.0 = match std::mem::replace(&mut self.0, State::Switching) {
            State::Bare(tcp) => State::Buffered(BufWriter::with_capacity(
                TRANSPORT_BUFFER,
                BufReader::with_capacity(TRANSPORT_BUFFER, tcp),
            )),
            other => other,
        };
    }

    /// Whether [`Self::buffer`] was called.
    pub fn is_buffered(&self) -> bool {
        matches!(self.0, State::Buffered(_))
    }

    pub fn tcp(&self) -> &TcpStream {
        match &self.0 {
            State::Bare(tcp) => tcp,
            State::Buffered(buffered) => buffered.get_ref().get_ref(),
            State::Switching => unreachable!("a transport is never left switching"),
        }
    }
}

/// Both states forward to the stream they hold; all are `Unpin`.
macro_rules! forward {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().0 {
            State::Bare($io) => {
                let $io = Pin::new($io);
                $call
            }
            State::Buffered($io) => {
                let $io = Pin::new($io);
                $call
            }
            State::Switching => unreachable!("a transport is never left switching"),
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        forward!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            State::Bare(tcp) => tcp.is_write_vectored(),
            State::Buffered(buffered) => buffered.is_write_vectored(),
            State::Switching => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Bytes written and read bare, then buffered, arrive whole and in order both ways.
    #[tokio::test]
    async fn switching_to_buffers_loses_no_byte() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut ours = Transport::new(client.unwrap());
        let mut theirs = server.unwrap().0;
        assert!(!ours.is_buffered());

        ours.write_all(b"hello ").await.unwrap();
        theirs.write_all(b"first ").await.unwrap();
        let mut six = [0; 6];
        ours.read_exact(&mut six).await.unwrap();
        assert_eq!(&six, b"first ");

        ours.buffer();
        ours.buffer(); // twice is once
        assert!(ours.is_buffered());
        ours.write_all(b"world").await.unwrap();
        ours.flush().await.unwrap();
        theirs.write_all(b"second").await.unwrap();
        ours.read_exact(&mut six).await.unwrap();
        assert_eq!(&six, b"second");

        ours.shutdown().await.unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
    }
}
