//! The last connections refused by a policy, kept for `/config_dump` and `warren
//! status`: the first thing an operator asks when a client reports "connection reset".
//! Bounded, newest first; the access log and `warren_policy_refusals_total` keep the
//! whole history.
use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use super::access_log::{timestamp, ConnectionRecord};
use crate::policy::PolicyRef;

/// How many refusals are kept.
pub const KEPT: usize = 20;

/// One refused connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub at: String,
    pub connection_id: String,
    /// The client's address (or IP, through a tunnel).
    pub source: Option<String>,
    /// The client's proven SPIFFE ID; none for plaintext.
    pub source_identity: Option<String>,
    pub destination: String,
    /// `namespace/name` of the destination workload.
    pub destination_workload: Option<String>,
    /// The refusing policy, as `kind namespace/name`.
    pub policy: String,
    pub reason: String,
}

/// The last [`KEPT`] refusals.
#[derive(Debug, Default)]
pub struct RecentRefusals {
    entries: Mutex<VecDeque<Refusal>>,
}

impl RecentRefusals {
    pub fn record(&self, record: &ConnectionRecord, policy: &PolicyRef, reason: &str) {
        let refusal = Refusal {
            at: timestamp(SystemTime::now()),
            connection_id: record.connection_id.clone(),
            source: record.src_addr.clone(),
            source_identity: record.src_identity.clone(),
            destination: record.dst_addr.to_string(),
            destination_workload: record
                .dst_workload
                .as_ref()
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            policy: format!("{policy:?}"),
            reason: reason.to_owned(),
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() == KEPT {
            entries.pop_back();
        }
        entries.push_front(refusal);
    }

    /// Newest first.
    pub fn snapshot(&self) -> Vec<Refusal> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::PolicyKind, proxy::access_log::Direction};

    #[test]
    fn keeps_the_newest_refusals_first() {
        let refusals = RecentRefusals::default();
        let policy = PolicyRef::new(PolicyKind::AuthorizationPolicy, "demo", "allow-client");
        for i in 0..KEPT + 5 {
            let record = ConnectionRecord::new(
                format!("c{i}"),
                Direction::Inbound,
                "10.77.1.10:8080".parse().unwrap(),
            );
            refusals.record(&record, &policy, "no ALLOW policy matched");
        }
        let kept = refusals.snapshot();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].connection_id, format!("c{}", KEPT + 4));
        assert_eq!(kept[KEPT - 1].connection_id, "c5");
        assert_eq!(kept[0].destination, "10.77.1.10:8080");
        assert_eq!(kept[0].policy, "AuthorizationPolicy demo/allow-client");
    }
}
