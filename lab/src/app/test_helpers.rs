//! Servers for the unit tests of the app modules.

use std::sync::mpsc;
use std::time::Duration;

use super::{serve, AppMode, ServeOptions};

/// Start a server on a free port (all addresses, reached on loopback) in a background
/// thread — it serves until the test process exits — and return the port.
pub(crate) fn start_server(mode: AppMode, udp: bool) -> u16 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        serve(ServeOptions { port: 0, mode, udp }, |port| {
            tx.send(port).unwrap()
        })
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server ready")
}
