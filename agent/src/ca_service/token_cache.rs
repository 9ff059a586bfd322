//! A short-lived cache of successful TokenReviews, so that a burst of CSRs from one
//! agent (one per identity of its node's pods, all with the same token) costs the API
//! server one TokenReview, not one per CSR.
//!
//! - Keyed by the SHA-256 of the token: the token itself is never stored.
//! - Only successes are cached: a refused token (or an API server that could not answer)
//!   is reviewed again at every call.
//! - Entries live `ttl` (`--token-cache-ttl`, 60 s): a token the API server stops
//!   accepting (its pod deleted, its service account removed) is still accepted for up
//!   to that long. What the caller may have is decided at every call regardless (the
//!   node's pods are listed each time); only *who the caller is* is remembered.
//! - At most `capacity` entries (`--token-cache-size`, 4096); the oldest go first.
//! - Concurrent calls with the same uncached token wait for one review.
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::{authorize::Caller, grpc::Status};

/// SHA-256 of a token.
type Key = [u8; 32];

pub struct TokenCache {
    ttl: Duration,
    capacity: usize,
    state: Mutex<State>,
    /// One gate per token being reviewed, so that concurrent calls wait for one review.
    reviewing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, (Instant, Caller)>,
    /// Insertion order (oldest first), to expire and evict; an element whose time
    /// differs from its entry's is stale and skipped.
    order: VecDeque<(Key, Instant)>,
}

fn key(token: &str) -> Key {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

impl TokenCache {
    /// A cache of `capacity` entries kept `ttl`; a zero for either caches nothing.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            state: Mutex::new(State::default()),
            reviewing: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disabled(&self) -> bool {
        self.ttl.is_zero() || self.capacity == 0
    }

    /// Entries held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The caller of `token` if it was reviewed successfully less than `ttl` ago, else
    /// what `review` says (remembered when it is a success).
    pub async fn get_or_review<F, Fut>(&self, token: &str, review: F) -> Result<Caller, Status>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Caller, Status>>,
    {
        if self.disabled() {
            return review().await;
        }
        let key = key(token);
        if let Some(caller) = self.get(&key) {
            return Ok(caller);
        }
        let gate = Reviewing::enter(self, key);
        let _reviewing = gate.lock().await;
        // Another call may have reviewed the same token while this one waited.
        if let Some(caller) = self.get(&key) {
            return Ok(caller);
        }
        let reviewed = review().await;
        if let Ok(caller) = &reviewed {
            self.insert(key, caller.clone());
        }
        reviewed
    }

    fn get(&self, key: &Key) -> Option<Caller> {
        let mut state = self.state();
        let (at, caller) = state.entries.get(key)?;
        if at.elapsed() < self.ttl {
            return Some(caller.clone());
        }
        state.entries.remove(key);
        None
    }

    fn insert(&self, key: Key, caller: Caller) {
        let now = Instant::now();
        let mut state = self.state();
        // The oldest are in front: drop what has expired, then what is over capacity.
        while let Some(&(oldest, at)) = state.order.front() {
            let expired = now.duration_since(at) >= self.ttl;
            if !expired && state.entries.len() < self.capacity {
                break;
            }
            state.order.pop_front();
            if state.entries.get(&oldest).is_some_and(|(t, _)| *t == at) {
                state.entries.remove(&oldest);
            }
        }
        state.entries.insert(key, (now, caller));
        state.order.push_back((key, now));
    }
}

/// A call's hold on its token's review gate; the gate is forgotten when its last
/// holder is done (or cancelled).
struct Reviewing<'a> {
    cache: &'a TokenCache,
    key: Key,
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> Reviewing<'a> {
    fn enter(cache: &'a TokenCache, key: Key) -> Self {
        let gate = cache
            .reviewing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        Self {
            cache,
            key,
            gate: Some(gate),
        }
    }

    async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        match &self.gate {
            Some(gate) => gate.lock().await,
            None => unreachable!("the gate is held until drop"),
        }
    }
}

impl Drop for Reviewing<'_> {
    fn drop(&mut self) {
        let mut reviewing = self
            .cache
            .reviewing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Under the map's lock nobody else can take a new hold: two holders left (the
        // map and this one) means this is the last.
        if let Some(gate) = self.gate.take() {
            if Arc::strong_count(&gate) == 2 {
                reviewing.remove(&self.key);
            }
            drop(gate);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ca_service::grpc::Code;

    fn caller(name: &str) -> Caller {
        Caller {
            namespace: "demo".into(),
            service_account: name.into(),
            node: None,
            pod: None,
        }
    }

    /// `get_or_review` with a review that counts its calls and accepts tokens that do
    /// not start with "bad".
    async fn review(
        cache: &TokenCache,
        token: &str,
        reviews: &AtomicUsize,
    ) -> Result<Caller, Status> {
        cache
            .get_or_review(token, || async {
                reviews.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if token.starts_with("bad") {
                    Err(Status::new(Code::Unauthenticated, "refused"))
                } else {
                    Ok(caller(token))
                }
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_remembered_for_its_ttl_and_a_refusal_never() {
        let cache = TokenCache::new(Duration::from_secs(60), 16);
        let reviews = AtomicUsize::new(0);
        for _ in 0..5 {
            assert_eq!(review(&cache, "a", &reviews).await, Ok(caller("a")));
        }
        assert_eq!(reviews.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        review(&cache, "a", &reviews).await.unwrap();
        assert_eq!(reviews.load(Ordering::SeqCst), 1, "still fresh at 59 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        review(&cache, "a", &reviews).await.unwrap();
        assert_eq!(reviews.load(Ordering::SeqCst), 2, "reviewed again at 60 s");

        reviews.store(0, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(review(&cache, "bad", &reviews).await.is_err());
        }
        assert_eq!(reviews.load(Ordering::SeqCst), 3, "a refusal is not cached");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_with_one_token_wait_for_one_review() {
        let cache = TokenCache::new(Duration::from_secs(60), 16);
        let reviews = AtomicUsize::new(0);
        let calls = (0..8).map(|_| review(&cache, "agent", &reviews));
        let answers = futures_util::future::join_all(calls).await;
        assert!(answers.iter().all(|a| a == &Ok(caller("agent"))));
        assert_eq!(reviews.load(Ordering::SeqCst), 1);
        assert!(
            cache.reviewing.lock().unwrap().is_empty(),
            "gates are forgotten"
        );

        // Concurrent refusals: each call is reviewed.
        reviews.store(0, Ordering::SeqCst);
        let calls = (0..4).map(|_| review(&cache, "bad", &reviews));
        futures_util::future::join_all(calls).await;
        assert_eq!(reviews.load(Ordering::SeqCst), 4);
        assert!(cache.reviewing.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_entry_goes_when_full() {
        let cache = TokenCache::new(Duration::from_secs(60), 2);
        let reviews = AtomicUsize::new(0);
        for token in ["a", "b", "c"] {
            review(&cache, token, &reviews).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(cache.len(), 2);
        review(&cache, "c", &reviews).await.unwrap();
        review(&cache, "b", &reviews).await.unwrap();
        assert_eq!(reviews.load(Ordering::SeqCst), 3, "b and c are kept");
        review(&cache, "a", &reviews).await.unwrap();
        assert_eq!(reviews.load(Ordering::SeqCst), 4, "a was evicted");
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_caches_nothing() {
        let cache = TokenCache::new(Duration::ZERO, 16);
        let reviews = AtomicUsize::new(0);
        review(&cache, "a", &reviews).await.unwrap();
        review(&cache, "a", &reviews).await.unwrap();
        assert_eq!(reviews.load(Ordering::SeqCst), 2);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_key_is_the_tokens_sha256() {
        // SHA-256("abc"), FIPS 180-2's example.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex: String = key("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }
}
