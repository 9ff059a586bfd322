//! Work that blocks, kept off the data-path workers.
//!
//! The agent runs on a tokio runtime of two workers (`main.rs`), and every connection of
//! every pod of the node runs on them. A worker that waits — on an `iptables-restore`
//! that takes hundreds of milliseconds on a node with a big ruleset, on a search of
//! /proc that enters every network namespace of the node, on a file — stalls half of the
//! node's traffic meanwhile. So that work runs on tokio's blocking threads ([`run`]),
//! and the task that asked for it awaits it, in the same order as before.
//!
//! What runs there, while the agent serves:
//! - iptables mode: capturing a pod, releasing it, clearing an earlier agent's rules from
//!   a pod not in the mesh (`enrollment.rs`: `iptables-save`, `iptables-restore`);
//! - Kubernetes mode: the search of /proc for running pods' network namespaces
//!   (`cni/procfs.rs`, through `enrollment/cluster.rs`, at start-up too), and writing
//!   the mesh namespaces for `warren-cni`;
//! - local mode: reading the `--config` file and the `--policy` path, once a second.
//!
//! What stays on the workers, and why:
//! - Creating a socket in a pod's netns (`socket.rs`, `Netns::cookie`): `setns` moves
//!   the calling thread only, so the switch, the `socket()`/`bind()` and the switch back
//!   must happen on one thread, without an await ([`crate::netns::Netns::run`]); it
//!   takes microseconds, and a hop to another thread would cost more.
//! - `host_sockets::owns_connection`, asked for each plaintext connection from a node
//!   address: one sock_diag round trip that the kernel answers within the `send` (a few
//!   microseconds), read without waiting.
//! - eBPF capture and release (`redirect/ebpf.rs`): a few map updates and one link
//!   attached and pinned, microseconds; they hold the loaded object's maps.
//! - Start-up (`agent::run` until it serves): it runs on the thread that called
//!   `block_on` (`main`), not on a worker, and before any pod is served.
//!
//! A blocking thread that enters a pod's netns (the /proc search) returns to the agent's
//! before the closure ends, panic or not ([`crate::netns::Netns::run`]), so the next work
//! on that thread runs in the agent's own netns as it must (`host_sockets`, iptables'
//! `pre_exec`, which enters the pod's netns in the child only).

/// Run `work` on tokio's blocking threads and wait for it, without holding a worker.
/// A panic in `work` is a panic here, as if it had run inline.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        // Only when the runtime shuts down before the work starts.
        Err(err) => panic!("blocking work not run: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of [`run`]: the worker is free while the work blocks. On a runtime of one
    /// worker, a task that waits for a timer still runs while another task's work
    /// blocks (inline, the work would wait for the timer task in vain).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_worker_is_free_while_the_work_blocks() {
        let (tx, rx) = std::sync::mpsc::channel();
        let ticker = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            tx.send(()).unwrap();
        });
        let blocked = tokio::spawn(run(move || {
            rx.recv_timeout(std::time::Duration::from_secs(2)).is_ok()
        }));
        assert!(
            blocked.await.unwrap(),
            "the timer task ran while the work blocked"
        );
        ticker.await.unwrap();
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_a_panic_of_the_caller() {
        let caller = tokio::spawn(run(|| -> u8 { panic!("inside") }));
        let err = caller.await.unwrap_err();
        assert!(err.is_panic());
        let message = err.into_panic();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"inside"));
    }
}
