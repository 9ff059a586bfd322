//! `lab-app serve`: a dual-stack server, one thread per connection, forever.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

use super::{AppMode, GREETING};

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

/// Bind `[::]:port` dual-stack (IPv4 clients appear as `::ffff:a.b.c.d`), call
/// `ready` with the bound port, then serve until the process is killed. Per
/// connection a line goes to stderr; write errors there are ignored so that a
/// closed stderr never stops the server.
pub fn serve(options: ServeOptions, ready: impl FnOnce(u16)) -> Result<()> {
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
        serve_tcp(&listener, options.mode)
    }
}

fn serve_tcp(listener: &TcpListener, mode: AppMode) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // Aborted handshakes and fd exhaustion are per-connection troubles.
            Err(e) => {
                note(format_args!("accept failed: {e}"));
                continue;
            }
        };
        let local = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // Logged at once: whoever checks which address the server saw can rely on
        // this line long before the client finishes.
        note(format_args!("accept peer={peer} local={local} mode={mode}"));
        let spawned = thread::Builder::new().spawn(move || {
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
