//! Workload identities (SPIFFE), the local CA, and certificates per service account.
