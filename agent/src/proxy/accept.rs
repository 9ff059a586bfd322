//! Accepting on a pod's listeners, and what a failed accept does.
//!
//! accept(2) fails for one of two kinds of reasons:
//! - **Something ran out**: the agent's file descriptors (EMFILE), the node's (ENFILE),
//!   kernel memory for sockets (ENOBUFS, ENOMEM). Every listener of the agent fails alike
//!   until something is closed, and the connection stays queued (the kernel completed
//!   its handshake), so trying again at once would spin on it. The listener backs off
//!   ([`Backoff`]: 10 ms, doubling up to 1 s, back to 10 ms after a success) and tries
//!   again; meanwhile new connections wait in the listen backlog, and the kernel refuses
//!   them once it is full. An error the agent does not know is treated alike: trying
//!   again at once could spin too.
//! - **One connection went wrong** before it was accepted (ECONNABORTED, a peer that
//!   reset; the network errors Linux passes on from accept(2)): the next one is not
//!   affected, so the loop goes on at once.
//!
//! Invariants:
//! - Every failed accept is counted in `warren_accept_errors_total{listener,error}`
//!   (`listener` is the port, `error` one of [`AcceptError`]'s five labels: at most 15
//!   series).
//! - The log says so at most once per second per listener kind and error, however many
//!   pods fail alike ([`crate::log_limit`]), and says what to do; the lines held back
//!   are counted in the next one.
//! - A listener that keeps failing tries again at most once per [`MAX_BACKOFF`], and
//!   never without a pause.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::{Listener, Pod};
use crate::{log_limit::LogLimit, metrics::Metrics, workload::Workload};

/// The first pause after a failed accept.
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause: a listener retries at least this often, so it recovers within
/// about this long once descriptors are free again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why an accept failed (the metric's `error` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AcceptError {
    /// EMFILE: the agent is at its open-file limit.
    Emfile,
    /// ENFILE: the node is at its open-file limit (`fs.file-max`).
    Enfile,
    /// ENOBUFS, ENOMEM: the kernel is short of memory for sockets.
    Enomem,
    /// The connection failed before it was accepted; the next one is not affected.
    Aborted,
    /// Anything else.
    Other,
}

impl AcceptError {
    pub fn of(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EMFILE) => AcceptError::Emfile,
            Some(libc::ENFILE) => AcceptError::Enfile,
            Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::Enomem,
            // accept(2): "Linux accept() passes already-pending network errors on the new
            // socket as an error code from accept()", to be treated like EAGAIN; EPERM is
            // a firewall rule refusing the connection.
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH,
            ) => AcceptError::Aborted,
            _ => AcceptError::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AcceptError::Emfile => "emfile",
            AcceptError::Enfile => "enfile",
            AcceptError::Enomem => "enomem",
            AcceptError::Aborted => "aborted",
            AcceptError::Other => "other",
        }
    }

    /// Whether the next accept would fail alike (back off), not only this connection.
    pub fn persists(self) -> bool {
        self != AcceptError::Aborted
    }

    /// What is happening and what to do, for the log line.
    fn explained(self) -> &'static str {
        match self {
            AcceptError::Emfile => "the agent is out of file descriptors (EMFILE): new connections to the node's pods wait in the kernel's listen backlog and are refused once it is full, until connections close. Raise the agent's open-file limit: LimitNOFILE of the container runtime's or the agent's systemd unit, `ulimit -n` when run by hand (the agent raises its soft limit to the hard limit at start, so it is the hard limit that must grow)",
            AcceptError::Enfile => "the node is out of file descriptors (ENFILE): new connections to the node's pods wait in the kernel's listen backlog and are refused once it is full. Raise the node's limit (sysctl fs.file-max) or find what holds them (/proc/sys/fs/file-nr)",
            AcceptError::Enomem => "the kernel is short of memory for sockets (ENOBUFS/ENOMEM): new connections to the node's pods wait in the kernel's listen backlog and are refused once it is full. The node is under memory pressure (see /proc/net/sockstat, sysctl net.ipv4.tcp_mem)",
            AcceptError::Aborted => "a connection failed before it was accepted (the peer reset, or the network dropped it); the next one is not affected",
            AcceptError::Other => "accept failed; trying again with back-off",
        }
    }
}

/// What the accept loops of every pod share: the count of failed accepts and the
/// throttle of their log lines.
pub struct AcceptErrors {
    metrics: Arc<Metrics>,
    logged: LogLimit<(Listener, AcceptError)>,
}

impl AcceptErrors {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            logged: LogLimit::per_second(),
        })
    }

    /// Count an accept on `pod`'s `listener` that failed with `err`, and log it unless
    /// the same failure was logged less than a second ago.
    fn failed(&self, listener: Listener, pod: &Workload, err: &io::Error) -> AcceptError {
        let error = AcceptError::of(err);
        self.metrics.accept_failed(listener.label(), error.label());
        if let Some(held_back) = self.logged.allow((listener, error)) {
            let what = error.explained();
            if error.persists() {
                tracing::warn!(listener = listener.name(), %pod, error = %err, held_back, "cannot accept: {what}; warren_accept_errors_total counts every failure");
            } else {
                tracing::debug!(listener = listener.name(), %pod, error = %err, held_back, "{what}");
            }
        }
        error
    }
}

/// How long a listener waits before it tries again, after failed accepts.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: MIN_BACKOFF }
    }

    /// An accept failed with `error`: how long to wait before the next, if at all.
    fn failed(&mut self, error: AcceptError) -> Option<Duration> {
        if !error.persists() {
            return None;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(wait)
    }

    fn succeeded(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

/// Accept forever on `listener`, `pod`'s listener of kind `kind`, handing each connection
/// to `handle` on a task of its own.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    kind: Listener,
    pod: Arc<Pod>,
    errors: Arc<AcceptErrors>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Pod>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let workload = pod.workload.clone();
    accept_each(listener, kind, &workload, &errors, |stream, peer| {
        tokio::spawn(handle(stream, peer, pod.clone()));
    })
    .await
}

/// Accept forever, giving each connection to `accepted`; a failed accept is counted,
/// logged and, if the next would fail too, waited out.
async fn accept_each(
    listener: TcpListener,
    kind: Listener,
    pod: &Workload,
    errors: &AcceptErrors,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Backoff::new();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.succeeded();
                // Listeners are dual-stack: show IPv4 peers as IPv4, not ::ffff:a.b.c.d.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                accepted(stream, peer);
            }
            Err(err) => {
                let error = errors.failed(kind, pod, &err);
                if let Some(wait) = backoff.failed(error) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    };

    use super::*;
    use crate::proxy::hbone;

    #[test]
    fn running_out_backs_off_and_a_failed_connection_does_not() {
        for (errno, error) in [
            (libc::EMFILE, AcceptError::Emfile),
            (libc::ENFILE, AcceptError::Enfile),
            (libc::ENOBUFS, AcceptError::Enomem),
            (libc::ENOMEM, AcceptError::Enomem),
            (libc::EBADF, AcceptError::Other),
        ] {
            let of = AcceptError::of(&io::Error::from_raw_os_error(errno));
            assert_eq!(of, error, "{errno}");
            assert!(of.persists(), "{errno}");
        }
        for errno in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EPROTO,
            libc::EPERM,
        ] {
            let of = AcceptError::of(&io::Error::from_raw_os_error(errno));
            assert_eq!(of, AcceptError::Aborted, "{errno}");
            assert!(!of.persists(), "{errno}");
        }

        let mut backoff = Backoff::new();
        let waits: Vec<Option<Duration>> = [
            AcceptError::Emfile,
            AcceptError::Emfile,
            AcceptError::Aborted,
            AcceptError::Enfile,
        ]
        .into_iter()
        .map(|error| backoff.failed(error))
        .collect();
        let ms = |ms| Some(Duration::from_millis(ms));
        assert_eq!(waits, [ms(10), ms(20), None, ms(40)]);
        let longest = (0..20)
            .filter_map(|_| backoff.failed(AcceptError::Other))
            .max();
        assert_eq!(longest, Some(MAX_BACKOFF));
        backoff.succeeded();
        assert_eq!(backoff.failed(AcceptError::Emfile), ms(10));
    }

    #[test]
    fn error_labels_are_few_and_fixed() {
        let labels: Vec<&str> = [
            AcceptError::Emfile,
            AcceptError::Enfile,
            AcceptError::Enomem,
            AcceptError::Aborted,
            AcceptError::Other,
        ]
        .map(AcceptError::label)
        .into();
        assert_eq!(labels, ["emfile", "enfile", "enomem", "aborted", "other"]);
    }

    /// Set by [`out_of_file_descriptors_is_counted_logged_once_a_second_and_waited_out`]
    /// for the process it starts.
    const EMFILE_CHILD: &str = "WARREN_TEST_EMFILE_CHILD";

    /// EMFILE for real: this test binary runs [`emfile_child`] in a process of its own,
    /// which lowers its open-file limit and uses it up, so the test runner's own limit is
    /// never touched.
    #[test]
    fn out_of_file_descriptors_is_counted_logged_once_a_second_and_waited_out() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "proxy::accept::tests::emfile_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(EMFILE_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "the child failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("1 passed"),
            "the child did not run:\n{stdout}\n{stderr}"
        );
    }

    /// Log lines written through a `tracing` subscriber, kept for the test to read.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            text.lines().map(str::to_owned).collect()
        }
    }

    /// Lower the open-file limit and open descriptors until there is none left; they are
    /// free again once the returned files are dropped.
    fn use_up_file_descriptors() -> Vec<std::fs::File> {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(256), hard).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut held = Vec::new();
        loop {
            match null.try_clone() {
                Ok(file) => held.push(file),
                Err(err) => {
                    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
                    break;
                }
            }
        }
        held.push(null);
        held
    }

    /// The value of the sample of `page` that starts with `series`, 0 if none.
    fn sample(page: &str, series: &str) -> u64 {
        page.lines()
            .find_map(|line| line.strip_prefix(series))
            .map_or(0, |value| value.trim().parse().unwrap())
    }

    /// The half of the EMFILE test that runs in its own process; does nothing unless that
    /// test started it. Time is tokio's paused clock: five seconds of failing accepts take
    /// a moment.
    #[test]
    fn emfile_child() {
        if std::env::var_os(EMFILE_CHILD).is_none() {
            return;
        }
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // Three connections wait in the backlog (the kernel completed them).
            let _clients: Vec<std::net::TcpStream> = (0..3)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            let metrics = Arc::new(Metrics::new(hbone::Pool::new(Default::default())).unwrap());
            let errors = AcceptErrors::new(metrics.clone());
            let accepted = Arc::new(AtomicUsize::new(0));
            let held = use_up_file_descriptors();
            tokio::spawn({
                let accepted = accepted.clone();
                async move {
                    let pod = Workload::test_pod("server", "n1", &[]);
                    accept_each(listener, Listener::Plaintext, &pod, &errors, |_, _| {
                        accepted.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
                }
            });
            tokio::time::sleep(Duration::from_secs(5)).await;

            let emfile = "warren_accept_errors_total{error=\"emfile\",listener=\"15006\"}";
            let failed = sample(&metrics.render(), emfile);
            // 10 ms doubling to 1 s: 8 tries in the first 1.3 s, then one a second. A
            // fixed 100 ms pause would be 50, a loop without one thousands.
            assert!((8..=14).contains(&failed), "{failed} failed accepts in 5 s");
            let warnings: Vec<String> = logs
                .lines()
                .into_iter()
                .filter(|line| line.contains("WARN"))
                .collect();
            assert!(
                (2..=6).contains(&warnings.len()),
                "one line a second at most, not one per failure: {warnings:#?}"
            );
            for line in &warnings {
                assert!(
                    line.contains("out of file descriptors (EMFILE)")
                        && line.contains("LimitNOFILE")
                        && line.contains("inbound-plaintext"),
                    "{line}"
                );
            }
            assert!(
                warnings.iter().any(|line| !line.contains("held_back=0")),
                "later lines count those held back: {warnings:#?}"
            );
            assert_eq!(accepted.load(Ordering::SeqCst), 0);

            // Descriptors free again: the waiting connections are taken within a pause.
            drop(held);
            tokio::time::sleep(MAX_BACKOFF * 2).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
            let after = sample(&metrics.render(), emfile);
            assert!(after <= failed + 1, "{after} after {failed}");
        });
    }
}
