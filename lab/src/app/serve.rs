//! `lab-app serve`: a dual-stack server, one thread per connection, forever. Built to
//! hold the 10,000+ idle connections of `lab-app bench hold`: it raises its open-files
//! limit, gives its connection threads small stacks, and closes the connections it has
//! no thread for (see [`connection_limit`]).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

use super::open_files::raise_open_files_limit;
use super::{AppMode, GREETING};

/// Stack of a connection thread. The handlers keep their buffers on the heap, or an
/// 8 KiB one on the stack (`io::copy`), so this is ample, and 10,000 connections
/// reserve 640 MiB of address space instead of the 20 GiB of the default 2 MiB stacks.
const CONNECTION_STACK_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept`.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Memory mappings a connection thread takes: its stack and the stack's guard page,
/// and the signal stack and guard page that Rust's runtime gives every thread.
const MAPPINGS_PER_THREAD: u64 = 4;
/// Mappings left for the rest of the process: code, heap, malloc arenas, and the
/// stacks of ended threads that glibc keeps for reuse.
const MAPPINGS_RESERVED: u64 = 2048;
/// The kernel's default `vm.max_map_count`, assumed when it cannot be read.
const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;

/// Options of `lab-app serve`.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Port to listen on (0: any; the READY line tells which).
    pub port: u16,
    /// What to do with each TCP connection.
    pub mode: AppMode,
    /// Echo UDP datagrams instead of serving TCP.
    pub udp: bool,
}

/// Raise the open-files limit to the hard limit, bind `[::]:port` dual-stack (IPv4
/// clients appear as `::ffff:a.b.c.d`), call `ready` with the bound port, then serve
/// until the process is killed. Per connection a line goes to stderr; write errors
/// there are ignored so that a closed stderr never stops the server.
pub fn serve(options: ServeOptions, ready: impl FnOnce(u16)) -> Result<()> {
    raise_open_files_limit().context("raising the open-files limit")?;
    let (domain, ty, proto) = if options.udp {
        (Domain::IPV6, Type::DGRAM, Protocol::UDP)
    } else {
        (Domain::IPV6, Type::STREAM, Protocol::TCP)
    };
    let socket = Socket::new(domain, ty, Some(proto)).context("creating the server socket")?;
    socket
        .set_only_v6(false)
        .context("turning IPV6_V6ONLY off")?;
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, options.port));
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding [::]:{} (is the port in use?)", options.port))?;
    if options.udp {
        let socket: UdpSocket = socket.into();
        ready(
            socket
                .local_addr()
                .context("reading the bound address")?
                .port(),
        );
        serve_udp(&socket)
    } else {
        socket.listen(1024).context("listening")?;
        let listener: TcpListener = socket.into();
        ready(
            listener
                .local_addr()
                .context("reading the bound address")?
                .port(),
        );
        serve_tcp(&listener, options.mode, connection_limit())
    }
}

/// How many connections may have a thread at once. The kernel caps the memory
/// mappings of a process (`vm.max_map_count`, 65,530 by default: about 16,000
/// threads), and a thread that gets its stack but not its signal stack aborts the
/// whole process, dropping every connection. Past this limit a new connection is
/// closed at once instead, with a log line that says why.
fn connection_limit() -> usize {
    let max_map_count = fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_MAP_COUNT);
    threads_within(max_map_count)
}

/// Connection threads that fit in `max_map_count` mappings.
fn threads_within(max_map_count: u64) -> usize {
    let threads = max_map_count.saturating_sub(MAPPINGS_RESERVED) / MAPPINGS_PER_THREAD;
    usize::try_from(threads).unwrap_or(usize::MAX)
}

/// A connection's claim on one of the threads [`connection_limit`] allows, given back
/// when its thread ends (or never starts).
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_tcp(listener: &TcpListener, mode: AppMode, limit: usize) -> Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // Aborted handshakes and fd exhaustion are per-connection troubles. Out of
            // descriptors, the next accept fails the same way until a connection
            // closes: the pause keeps that from spinning a CPU and flooding stderr.
            Err(e) => {
                note(format_args!("accept failed: {e}"));
                thread::sleep(ACCEPT_RETRY_PAUSE);
                continue;
            }
        };
        let local = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if open.load(Ordering::SeqCst) >= limit {
            note(format_args!(
                "refused peer={peer} local={local}: {limit} connections are open, the most \
                 this server has threads for (see vm.max_map_count)"
            ));
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let slot = ConnectionSlot(Arc::clone(&open));
        // Logged at once: whoever checks which address the server saw can rely on
        // this line long before the client finishes.
        note(format_args!("accept peer={peer} local={local} mode={mode}"));
        // Each piece of an echo leaves at once. With Nagle, an echo larger than one
        // read of the copy loop would hold its second piece back until the client
        // acknowledged the first, which delayed ACKs can put off for 40 ms: a
        // request/response benchmark would time the ACK timer.
        if let Err(e) = stream.set_nodelay(true) {
            note(format_args!(
                "conn peer={peer} local={local} TCP_NODELAY failed: {e}"
            ));
        }
        let spawned = thread::Builder::new()
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                let _slot = slot;
                let done = |received: u64, sent: u64| {
                    note(format_args!(
                    "conn peer={peer} local={local} mode={mode} received={received} sent={sent}"
                ))
                };
                if let Err(e) = handle(&stream, mode, done) {
                    note(format_args!(
                        "conn peer={peer} local={local} mode={mode} error: {e}"
                    ));
                }
            });
        if let Err(e) = spawned {
            note(format_args!("cannot start a thread for {peer}: {e}"));
        }
    }
}

/// Serve one connection. `done(received, sent)` is called just before the final
/// half-close, so its log line is written before the client can see the end.
fn handle(stream: &TcpStream, mode: AppMode, done: impl FnOnce(u64, u64)) -> io::Result<()> {
    let mut reader = stream;
    let mut writer = stream;
    match mode {
        AppMode::Echo => echo(reader, writer, 0, done),
        AppMode::Greet => {
            writer.write_all(GREETING.as_bytes())?;
            echo(reader, writer, GREETING.len() as u64, done)
        }
        AppMode::Sha => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut count: u64 = 0;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                count += n as u64;
            }
            let reply = format!("{} {count}\n", hex(&hasher.finalize()));
            done(count, reply.len() as u64);
            writer.write_all(reply.as_bytes())?;
            stream.shutdown(Shutdown::Write)
        }
    }
}

fn echo(
    mut reader: &TcpStream,
    mut writer: &TcpStream,
    already_sent: u64,
    done: impl FnOnce(u64, u64),
) -> io::Result<()> {
    let copied = io::copy(&mut reader, &mut writer)?;
    done(copied, already_sent + copied);
    // EOF from the client: pass the half-close on.
    writer.shutdown(Shutdown::Write)
}

fn serve_udp(socket: &UdpSocket) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer) {
                    note(format_args!("udp peer={peer} send failed: {e}"));
                } else {
                    note(format_args!("udp peer={peer} echoed={n}"));
                }
            }
            Err(e) => note(format_args!("udp receive failed: {e}")),
        }
    }
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn note(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Instant;

    /// Whether `stream` echoes one byte.
    fn echoes(mut stream: &TcpStream) -> bool {
        let mut byte = [0u8];
        stream.write_all(b"x").is_ok() && matches!(stream.read(&mut byte), Ok(1))
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    #[test]
    fn connections_past_the_limit_are_closed_and_the_server_goes_on() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || serve_tcp(&listener, AppMode::Echo, 2));
        let first = connect(addr);
        let second = connect(addr);
        assert!(echoes(&first) && echoes(&second));
        assert!(!echoes(&connect(addr)), "a third connection was served");
        // Once a connection ends, its thread's place is free again.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !echoes(&connect(addr)) {
            assert!(Instant::now() < deadline, "no place freed");
            thread::sleep(Duration::from_millis(10));
        }
        assert!(echoes(&second));
    }

    #[test]
    fn the_kernel_default_leaves_room_for_ten_thousand_connections() {
        let threads = threads_within(DEFAULT_MAX_MAP_COUNT);
        assert!((10_000..16_000).contains(&threads), "{threads}");
        assert_eq!(threads_within(100), 0);
    }
}
