//! HBONE: HTTP/2 CONNECT tunnels over mTLS between agents (port 15008).
