//! `lab-app connect`: one exchange with a `lab-app serve`, checked end to end.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::serve::hex;
use super::{AppMode, ConnectReport, Payload, GREETING};

/// Default timeout for connecting and for each read.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Default TCP payload size.
pub const DEFAULT_TCP_BYTES: u64 = 64 * 1024;
/// Default UDP datagram size.
pub const DEFAULT_UDP_BYTES: u64 = 1024;
/// Largest UDP payload that fits one datagram.
const MAX_UDP_BYTES: u64 = 65_507;
const CHUNK: usize = 64 * 1024;

/// Options of `lab-app connect`.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Server address.
    pub addr: SocketAddr,
    /// Exchange to run (ignored with `udp`).
    pub mode: AppMode,
    /// Payload size.
    pub bytes: u64,
    /// One UDP datagram instead of TCP.
    pub udp: bool,
    /// Timeout for connecting and for each read.
    pub timeout: Duration,
    /// TCP: bind this local port before connecting (to make two pods use the same
    /// 4-tuple on purpose).
    pub source_port: Option<u16>,
    /// Send this text repeated instead of pseudo-random bytes (to look for it on the
    /// wire).
    pub marker: Option<String>,
}

/// Progress of an exchange, turned into the report whatever happens.
struct Exchange {
    sent: u64,
    received: u64,
    local_addr: Option<String>,
}

/// Run the exchange; never fails, the report says what happened.
pub fn connect(options: &ConnectOptions) -> ConnectReport {
    let mode = if options.udp {
        "udp".to_string()
    } else {
        options.mode.to_string()
    };
    let mut exchange = Exchange {
        sent: 0,
        received: 0,
        local_addr: None,
    };
    let result = if options.udp {
        udp(options, &mut exchange)
    } else {
        tcp(options, &mut exchange)
    };
    let (ok, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    ConnectReport {
        ok,
        mode,
        sent: exchange.sent,
        received: exchange.received,
        local_addr: exchange.local_addr,
        detail,
    }
}

type Outcome = Result<String, String>;

fn tcp(options: &ConnectOptions, exchange: &mut Exchange) -> Outcome {
    let addr = options.addr;
    let stream = tcp_connect(addr, options.source_port, options.timeout)
        .map_err(|e| format!("connect to {addr} failed: {e}"))?;
    exchange.local_addr = stream.local_addr().ok().map(|a| a.to_string());
    stream
        .set_read_timeout(Some(options.timeout))
        .and_then(|()| stream.set_write_timeout(Some(options.timeout)))
        .map_err(|e| format!("setting socket timeouts: {e}"))?;
    let payload = Payload::marker(options.marker.as_deref());
    match options.mode {
        AppMode::Echo => echo(&stream, options.bytes, exchange, payload),
        AppMode::Greet => {
            let greeting = read_line(&stream)
                .map_err(|e| format!("reading the greeting: {}", io_detail(&e)))?;
            if greeting != GREETING {
                return Err(format!("expected greeting {GREETING:?}, got {greeting:?}"));
            }
            echo(&stream, options.bytes, exchange, payload)
                .map(|d| format!("greeting received; {d}"))
        }
        AppMode::Sha => sha(&stream, options.bytes, exchange, payload),
    }
}

/// Connect, first binding `source_port` (on the unspecified address) when given.
fn tcp_connect(
    addr: SocketAddr,
    source_port: Option<u16>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(port) = source_port else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    };
    socket.bind(&local.into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Read one line byte by byte, so nothing after it is consumed.
fn read_line(mut stream: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Send the payload, half-close, and check that exactly the payload comes back.
/// Sending happens on its own thread so that a full receive buffer on our side can
/// never stall the server's writes and, through them, our own.
fn echo(stream: &TcpStream, bytes: u64, exchange: &mut Exchange, payload: Payload) -> Outcome {
    let writer = stream
        .try_clone()
        .map_err(|e| format!("cloning the socket: {e}"))?;
    let mut expected = payload.clone();
    let sender = thread::spawn(move || send_payload(&writer, bytes, None, payload));
    let mut mismatch: Option<u64> = None;
    let mut buf = vec![0u8; CHUNK];
    let mut reader = stream;
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if mismatch.is_none() {
                    if exchange.received + n as u64 > bytes {
                        mismatch = Some(bytes);
                    } else if let Some(at) = expected.check(&buf[..n]) {
                        mismatch = Some(exchange.received + at as u64);
                    }
                }
                exchange.received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let sent = sender
        .join()
        .map_err(|_| "the sending thread panicked".to_string())?;
    exchange.sent = match &sent {
        Ok(n) | Err((n, _)) => *n,
    };
    if let Err((_, e)) = sent {
        return Err(format!(
            "sending failed after {} bytes: {}",
            exchange.sent,
            io_detail(&e)
        ));
    }
    if let Err(e) = read_result {
        return Err(format!(
            "receiving failed after {} bytes: {}",
            exchange.received,
            io_detail(&e)
        ));
    }
    if let Some(at) = mismatch {
        return Err(format!(
            "echoed data differs from what was sent at byte {at}"
        ));
    }
    if exchange.received != bytes {
        return Err(format!(
            "server closed after echoing {} of {bytes} bytes",
            exchange.received
        ));
    }
    Ok(format!("{bytes} bytes echoed intact, half-close honoured"))
}

/// Write `bytes` of payload then shut down the write side; on error, how far it got.
fn send_payload(
    mut stream: &TcpStream,
    bytes: u64,
    mut hasher: Option<&mut Sha256>,
    mut payload: Payload,
) -> Result<u64, (u64, io::Error)> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent: u64 = 0;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        payload.fill(&mut buf[..n]);
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        stream.write_all(&buf[..n]).map_err(|e| (sent, e))?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write).map_err(|e| (sent, e))?;
    Ok(sent)
}

fn sha(stream: &TcpStream, bytes: u64, exchange: &mut Exchange, payload: Payload) -> Outcome {
    // The server reads everything before it answers, so one thread suffices.
    let mut hasher = Sha256::new();
    let sent = send_payload(stream, bytes, Some(&mut hasher), payload);
    exchange.sent = match &sent {
        Ok(n) | Err((n, _)) => *n,
    };
    if let Err((_, e)) = sent {
        return Err(format!(
            "sending failed after {} bytes: {}",
            exchange.sent,
            io_detail(&e)
        ));
    }
    let local = hex(&hasher.finalize());
    let mut reply = String::new();
    let mut reader = stream.take(1024);
    reader
        .read_to_string(&mut reply)
        .map_err(|e| format!("reading the server's digest: {}", io_detail(&e)))?;
    let mut fields = reply.split_whitespace();
    let (Some(digest), Some(count)) = (
        fields.next(),
        fields.next().and_then(|c| c.parse::<u64>().ok()),
    ) else {
        return Err(format!(
            "unexpected reply {reply:?} (want \"<sha256> <count>\")"
        ));
    };
    exchange.received = count;
    if count != bytes {
        return Err(format!("server received {count} of {bytes} bytes"));
    }
    if digest != local {
        return Err(format!(
            "server's sha256 {digest} differs from ours {local}"
        ));
    }
    Ok(format!("sha256 {local} of {bytes} bytes matches"))
}

fn udp(options: &ConnectOptions, exchange: &mut Exchange) -> Outcome {
    let addr = options.addr;
    if options.bytes > MAX_UDP_BYTES {
        return Err(format!(
            "{} bytes do not fit one UDP datagram (max {MAX_UDP_BYTES})",
            options.bytes
        ));
    }
    let any: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).map_err(|e| format!("binding a UDP socket: {e}"))?;
    socket
        .connect(addr)
        .map_err(|e| format!("connect to {addr} failed: {e}"))?;
    exchange.local_addr = socket.local_addr().ok().map(|a| a.to_string());
    socket
        .set_read_timeout(Some(options.timeout))
        .map_err(|e| format!("setting the read timeout: {e}"))?;
    let mut datagram = vec![0u8; options.bytes as usize];
    Payload::default().fill(&mut datagram);
    exchange.sent = socket
        .send(&datagram)
        .map_err(|e| format!("sending to {addr}: {e}"))? as u64;
    let mut buf = vec![0u8; 65_536];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no echo from {addr}: {}", io_detail(&e)))?;
    exchange.received = n as u64;
    if buf[..n] != datagram[..] {
        return Err(format!(
            "echoed datagram ({n} bytes) differs from the one sent"
        ));
    }
    Ok(format!("datagram of {n} bytes echoed intact"))
}

/// An I/O error for the report; timeouts say which timeout.
fn io_detail(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timed out ({e})"),
        _ => e.to_string(),
    }
}
