//! rustls configurations for the mTLS tunnel: SPIFFE-aware verification both ways.
