//! `lab-app connect`: exchanges with a `lab-app serve`, checked end to end — one, or
//! many connections held open at once ([`LoadOptions`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

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
/// A paced sender (`LoadOptions::duration`) writes one piece this often.
const PACE_INTERVAL: Duration = Duration::from_millis(100);
/// How many different failure reasons a `--parallel` report spells out.
const SHOWN_FAILURES: usize = 5;

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

impl ConnectOptions {
    /// A TCP exchange of `bytes` in `mode` with `addr`, with the default timeout and
    /// nothing else special; set the other fields on the result where needed.
    pub fn tcp(addr: SocketAddr, mode: AppMode, bytes: u64) -> ConnectOptions {
        ConnectOptions {
            addr,
            mode,
            bytes,
            udp: false,
            timeout: DEFAULT_TIMEOUT,
            source_port: None,
            marker: None,
        }
    }

    /// One UDP datagram of `bytes` to `addr`, awaiting its echo.
    pub fn udp(addr: SocketAddr, bytes: u64) -> ConnectOptions {
        ConnectOptions {
            udp: true,
            ..ConnectOptions::tcp(addr, AppMode::Echo, bytes)
        }
    }

    /// The same with a marker text as the payload.
    pub fn with_marker(mut self, marker: impl Into<String>) -> ConnectOptions {
        self.marker = Some(marker.into());
        self
    }
}

/// How `lab-app connect` spreads its work over connections and time (TCP only). Kept
/// apart from [`ConnectOptions`] so that the code that builds that struct field by
/// field (the demo, the tests) keeps compiling as these grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Connections, each in its own thread with its own payload stream. All of them
    /// are connected before any exchanges a byte, so this many are open at once.
    pub parallel: usize,
    /// Once every connection is up, wait (the `hold` callback of [`connect_load`]; in
    /// `lab-app`, until standard input ends) before exchanging, so that whoever
    /// started the client can look at all of them open and idle.
    pub hold: bool,
    /// Send the payload in small pieces spread over this long instead of at once: a
    /// long-lived stream (the client still checks every byte that comes back).
    pub duration: Option<Duration>,
}

impl Default for LoadOptions {
    /// One connection, no holding, no pacing: a plain `lab-app connect`.
    fn default() -> Self {
        LoadOptions {
            parallel: 1,
            hold: false,
            duration: None,
        }
    }
}

impl LoadOptions {
    fn is_default(&self) -> bool {
        *self == LoadOptions::default()
    }
}

/// Progress of an exchange, turned into the report whatever happens.
#[derive(Default)]
struct Exchange {
    sent: u64,
    received: u64,
    local_addr: Option<String>,
}

/// Run the exchange; never fails, the report says what happened.
pub fn connect(options: &ConnectOptions) -> ConnectReport {
    connect_load(options, &LoadOptions::default(), |_| {})
}

/// Run `load.parallel` exchanges at once, shaped by `load`; never fails, the report
/// says what happened. With `load.hold`, `hold(connected)` is called once every
/// connection has been made (or has failed to be), with the number that were, and the
/// exchanges start when it returns.
///
/// With one connection the report is that connection's. With several it adds them up:
/// `ok` only if every one passed, `sent`/`received` summed, no `local_addr`, and a
/// `detail` that says how many failed and why.
pub fn connect_load(
    options: &ConnectOptions,
    load: &LoadOptions,
    hold: impl FnOnce(usize),
) -> ConnectReport {
    let mode = if options.udp {
        "udp".to_string()
    } else {
        options.mode.to_string()
    };
    let report = |ok: bool, exchange: Exchange, detail: String| ConnectReport {
        ok,
        mode: mode.clone(),
        sent: exchange.sent,
        received: exchange.received,
        local_addr: exchange.local_addr,
        detail,
    };
    if options.udp {
        if !load.is_default() {
            return report(
                false,
                Exchange::default(),
                "parallel, held and paced connections are TCP only".to_string(),
            );
        }
        let mut exchange = Exchange::default();
        return match udp(options, &mut exchange) {
            Ok(detail) => report(true, exchange, detail),
            Err(detail) => report(false, exchange, detail),
        };
    }
    if load.parallel == 0 {
        return report(
            false,
            Exchange::default(),
            "--parallel must be at least 1".to_string(),
        );
    }
    let mut results = tcp_all(options, load, hold);
    if results.len() == 1 {
        let (exchange, outcome) = results.pop().expect("one result");
        return match outcome {
            Ok(detail) => report(true, exchange, detail),
            Err(detail) => report(false, exchange, detail),
        };
    }
    let total = Exchange {
        sent: results.iter().map(|(e, _)| e.sent).sum(),
        received: results.iter().map(|(e, _)| e.received).sum(),
        local_addr: None,
    };
    let (ok, detail) = summarise(&results, load);
    report(ok, total, detail)
}

type Outcome = Result<String, String>;

/// The `detail` of a run with several connections: how many, and the failures grouped
/// by reason (most frequent first) so that 200 identical resets make one line.
fn summarise(results: &[(Exchange, Outcome)], load: &LoadOptions) -> (bool, String) {
    let n = results.len();
    let held = if load.hold {
        "connected, held open at once, then "
    } else {
        "connected at once, then "
    };
    let mut failures: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (_, outcome)) in results.iter().enumerate() {
        if let Err(why) = outcome {
            failures.entry(why.as_str()).or_default().push(i);
        }
    }
    if failures.is_empty() {
        let each = results[0].1.as_deref().unwrap_or_default();
        return (true, format!("{n} connections {held}each: {each}"));
    }
    let failed: usize = failures.values().map(Vec::len).sum();
    let mut reasons: Vec<(&str, Vec<usize>)> = failures.into_iter().collect();
    reasons.sort_by_key(|(_, which)| std::cmp::Reverse(which.len()));
    let mut detail = format!("{failed} of {n} connections failed:");
    for (why, which) in reasons.iter().take(SHOWN_FAILURES) {
        let more = if which.len() > 1 { ", …" } else { "" };
        detail.push_str(&format!(
            " {}× {why} (connection {}{more});",
            which.len(),
            which[0]
        ));
    }
    if reasons.len() > SHOWN_FAILURES {
        detail.push_str(&format!(
            " and {} other reasons",
            reasons.len() - SHOWN_FAILURES
        ));
    } else {
        detail.pop();
    }
    (false, detail)
}

/// Every connection in its own thread: connect, wait until all have, `hold`, then
/// exchange. A connection that failed to connect still checks in, so the others never
/// wait for it.
fn tcp_all(
    options: &ConnectOptions,
    load: &LoadOptions,
    hold: impl FnOnce(usize),
) -> Vec<(Exchange, Outcome)> {
    let gate = Gate::default();
    thread::scope(|scope| {
        let workers: Vec<_> = (0..load.parallel)
            .map(|index| {
                let gate = &gate;
                thread::Builder::new()
                    .name(format!("conn-{index}"))
                    .spawn_scoped(scope, move || {
                        let mut exchange = Exchange::default();
                        let stream = tcp_open(options, &mut exchange);
                        gate.arrive_and_wait(stream.is_ok());
                        let outcome = stream.and_then(|stream| {
                            let payload = Payload::for_connection(options.marker.as_deref(), index);
                            tcp_exchange(&stream, options, load, &mut exchange, payload)
                        });
                        (exchange, outcome)
                    })
            })
            .collect();
        let started = workers.iter().filter(|w| w.is_ok()).count();
        let connected = gate.wait_for(started);
        if load.hold {
            hold(connected);
        }
        gate.open();
        workers
            .into_iter()
            .map(|worker| match worker {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    (
                        Exchange::default(),
                        Err("the connection's thread panicked".to_string()),
                    )
                }),
                Err(e) => (
                    Exchange::default(),
                    Err(format!("cannot start a thread for the connection: {e}")),
                ),
            })
            .collect()
    })
}

/// Where the connection threads meet: each checks in once it has connected (or failed
/// to) and waits for the gate to open; the main thread waits until all have checked in.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    connected: usize,
    open: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arrive_and_wait(&self, connected: bool) {
        let mut state = self.lock();
        state.arrived += 1;
        state.connected += usize::from(connected);
        self.changed.notify_all();
        while !state.open {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Wait until `n` threads have arrived; returns how many of them are connected.
    fn wait_for(&self, n: usize) -> usize {
        let mut state = self.lock();
        while state.arrived < n {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.connected
    }

    fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }
}

fn tcp_open(options: &ConnectOptions, exchange: &mut Exchange) -> Result<TcpStream, String> {
    let addr = options.addr;
    let stream = tcp_connect(addr, options.source_port, options.timeout)
        .map_err(|e| format!("connect to {addr} failed: {e}"))?;
    exchange.local_addr = stream.local_addr().ok().map(|a| a.to_string());
    stream
        .set_read_timeout(Some(options.timeout))
        .and_then(|()| stream.set_write_timeout(Some(options.timeout)))
        .map_err(|e| format!("setting socket timeouts: {e}"))?;
    Ok(stream)
}

fn tcp_exchange(
    stream: &TcpStream,
    options: &ConnectOptions,
    load: &LoadOptions,
    exchange: &mut Exchange,
    payload: Payload,
) -> Outcome {
    let sending = Sending {
        bytes: options.bytes,
        duration: load.duration,
        payload,
    };
    match options.mode {
        AppMode::Echo => echo(stream, sending, exchange),
        AppMode::Greet => {
            let greeting = read_line(stream)
                .map_err(|e| format!("reading the greeting: {}", io_detail(&e)))?;
            if greeting != GREETING {
                return Err(format!("expected greeting {GREETING:?}, got {greeting:?}"));
            }
            echo(stream, sending, exchange).map(|d| format!("greeting received; {d}"))
        }
        AppMode::Sha => sha(stream, sending, exchange),
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

/// What a client sends: `bytes` of `payload`, at once or spread over `duration`.
struct Sending {
    bytes: u64,
    duration: Option<Duration>,
    payload: Payload,
}

impl Sending {
    /// " paced over 12s" when paced, for the report.
    fn pacing(&self) -> String {
        self.duration
            .map(|d| format!(" paced over {d:?}"))
            .unwrap_or_default()
    }
}

/// Send the payload, half-close, and check that exactly the payload comes back.
/// Sending happens on its own thread so that a full receive buffer on our side can
/// never stall the server's writes and, through them, our own.
fn echo(stream: &TcpStream, sending: Sending, exchange: &mut Exchange) -> Outcome {
    let writer = stream
        .try_clone()
        .map_err(|e| format!("cloning the socket: {e}"))?;
    let bytes = sending.bytes;
    let pacing = sending.pacing();
    let mut expected = sending.payload.clone();
    let sender = thread::spawn(move || send_payload(&writer, sending, None));
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
    Ok(format!(
        "{bytes} bytes echoed intact{pacing}, half-close honoured"
    ))
}

/// Write the payload then shut down the write side; on error, how far it got. Paced,
/// it writes one piece every [`PACE_INTERVAL`] and half-closes no sooner than
/// `duration` after it started, so the connection carries data for that long.
fn send_payload(
    mut stream: &TcpStream,
    sending: Sending,
    mut hasher: Option<&mut Sha256>,
) -> Result<u64, (u64, io::Error)> {
    let Sending {
        bytes,
        duration,
        mut payload,
    } = sending;
    let start = Instant::now();
    let (piece, interval) = match duration {
        Some(duration) => {
            let pieces = duration
                .as_millis()
                .div_ceil(PACE_INTERVAL.as_millis())
                .max(1) as u64;
            (bytes.div_ceil(pieces).max(1), PACE_INTERVAL)
        }
        None => (CHUNK as u64, Duration::ZERO),
    };
    let mut buf = vec![0u8; piece.min(CHUNK as u64) as usize];
    let mut sent: u64 = 0;
    let mut pieces: u32 = 0;
    while sent < bytes {
        if let Some(wait) = (start + interval * pieces).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let end = (sent + piece).min(bytes);
        while sent < end {
            let n = (end - sent).min(buf.len() as u64) as usize;
            payload.fill(&mut buf[..n]);
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&buf[..n]);
            }
            stream.write_all(&buf[..n]).map_err(|e| (sent, e))?;
            sent += n as u64;
        }
        pieces += 1;
    }
    if let Some(rest) = duration.and_then(|d| (start + d).checked_duration_since(Instant::now())) {
        thread::sleep(rest);
    }
    stream.shutdown(Shutdown::Write).map_err(|e| (sent, e))?;
    Ok(sent)
}

fn sha(stream: &TcpStream, sending: Sending, exchange: &mut Exchange) -> Outcome {
    // The server reads everything before it answers, so one thread suffices.
    let bytes = sending.bytes;
    let pacing = sending.pacing();
    let mut hasher = Sha256::new();
    let sent = send_payload(stream, sending, Some(&mut hasher));
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
    Ok(format!("sha256 {local} of {bytes} bytes{pacing} matches"))
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
