//! What an HBONE CONNECT request and its answer carry, and how each side reads them.
//! Pure functions, so the parsing can be tested (and fuzzed) without a connection.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Version};

use super::{
    baggage::{Baggage, BAGGAGE_HEADER},
    ConnectRequest, HboneError,
};

/// The connection id both agents write in their access-log lines.
pub const CONNECTION_ID_HEADER: &str = "x-warren-connection-id";
/// Why a CONNECT request was refused, in words for the operator reading the client's log.
pub const REASON_HEADER: &str = "x-warren-reason";
/// W3C trace context, which ztunnel sends on every CONNECT. Its trace id is the
/// connection id: a ztunnel peer's connections then carry one id in both access logs.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Longest refusal reason sent; it is a log line, not a document.
const MAX_REASON_LEN: usize = 256;

/// The CONNECT request for `request`. Addresses are canonicalised (IPv4-mapped IPv6 becomes
/// IPv4) so the peer sees the same address however the original socket was opened.
pub(super) fn connect_request(request: &ConnectRequest) -> Result<Request<()>, HboneError> {
    let invalid_id = || HboneError::InvalidConnectionId(request.connection_id.clone());
    // The connection id is the only caller-supplied text; everything else is formatted
    // from addresses, so a builder error can only mean a bad id.
    HeaderValue::from_str(&request.connection_id).map_err(|_| invalid_id())?;
    let builder = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(authority_value(request.authority))
        .header(header::FORWARDED, forwarded_value(request.forwarded_for))
        .header(CONNECTION_ID_HEADER, request.connection_id.as_str());
    let builder = match traceparent_value(&request.connection_id) {
        Some(traceparent) => builder.header(TRACEPARENT_HEADER, traceparent),
        None => builder,
    };
    let builder = match request.baggage.header_value() {
        Some(baggage) => builder.header(BAGGAGE_HEADER, baggage),
        None => builder,
    };
    builder.body(()).map_err(|_| invalid_id())
}

/// `00-<trace id>-<span id>-01` when the connection id can be a trace id (32 lowercase
/// hex digits, not all zero, as [`new_connection_id`](crate::proxy::access_log::new_connection_id)
/// makes them); the span id is fresh.
fn traceparent_value(connection_id: &str) -> Option<String> {
    if !is_trace_id(connection_id) {
        return None;
    }
    let mut span = [0u8; 8];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut span)
        .ok()?;
    span[0] |= 1; // never the invalid all-zero span id
    let span: String = span.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("00-{connection_id}-{span}-01"))
}

/// The trace id of a `traceparent` value (version 00 and the fields it must have).
fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut fields = traceparent.split('-');
    let (version, trace, span, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (version == "00"
        && fields.next().is_none()
        && is_trace_id(trace)
        && hex(span, 16)
        && hex(flags, 2))
    .then_some(trace)
}

fn is_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

/// `ip:port`, IPv6 in brackets, without a zone id (meaningless on another node).
pub(super) fn authority_value(addr: SocketAddr) -> String {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// RFC 7239: `for=192.0.2.1`; an IPv6 node is bracketed and therefore quoted.
pub(super) fn forwarded_value(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    }
}

/// The original source from a `Forwarded` value: the `for` parameter of the first element
/// (the hop nearest the client). Ports are ignored; obfuscated or `unknown` nodes, and
/// anything unparsable, give `None`. Lenient about quoting, since not every peer quotes
/// IPv6 as RFC 7239 asks.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (name, node) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let node = node.trim();
        let node = node
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(node);
        parse_node(node)
    })
}

fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return ip
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    // `192.0.2.43:47011`
    let (ip, _port) = node.split_once(':')?;
    ip.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The fields of a valid CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConnect {
    pub authority: SocketAddr,
    pub connection_id: Option<String>,
    pub forwarded_for: Option<IpAddr>,
    pub baggage: Baggage,
}

/// Checks a request the way ztunnel does: it must be a plain CONNECT (no `:scheme`, no
/// `:path`) to an `ip:port` authority. The error is the reason sent back with a 400.
pub fn parse_connect(request: &Request<()>) -> Result<ParsedConnect, String> {
    if request.method() != Method::CONNECT {
        return Err(format!(
            "method {} is not CONNECT; HBONE carries only CONNECT tunnels",
            request.method()
        ));
    }
    let uri = request.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(format!(
            "CONNECT request for {uri} carries :scheme or :path; HBONE expects only :authority"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err("CONNECT request has no :authority (the original destination)".into());
    };
    let authority: SocketAddr = authority.as_str().parse().map_err(|_| {
        format!("CONNECT authority {authority:?} is not an ip:port original destination")
    })?;
    let authority = SocketAddr::new(authority.ip().to_canonical(), authority.port());
    let headers = request.headers();
    Ok(ParsedConnect {
        authority,
        connection_id: connection_id_of(headers),
        forwarded_for: headers
            .get(header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for),
        baggage: Baggage::parse(headers.get_all(BAGGAGE_HEADER)),
    })
}

/// Our own header, else the trace id of `traceparent` (what a ztunnel peer sends).
fn connection_id_of(headers: &HeaderMap) -> Option<String> {
    let Some(value) = headers.get(CONNECTION_ID_HEADER) else {
        return headers
            .get(TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id_of)
            .map(str::to_owned);
    };
    match value.to_str() {
        Ok(id) => Some(id.to_owned()),
        Err(_) => {
            tracing::debug!(?value, "ignoring a connection id that is not visible ASCII");
            None
        }
    }
}

/// A header value for a refusal reason: control and non-ASCII characters become `?`, and
/// it is cut at [`MAX_REASON_LEN`] bytes.
pub(super) fn reason_value(reason: &str) -> HeaderValue {
    let cleaned: String = reason
        .chars()
        .take(MAX_REASON_LEN)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(cleaned.trim()).unwrap_or_else(|_| HeaderValue::from_static("refused"))
}

/// The reason a refusal carries, or the status's canonical phrase when it has none.
pub(super) fn reason_of(status: StatusCode, headers: &HeaderMap) -> String {
    headers
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|reason| !reason.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authority: &str) -> ConnectRequest {
        ConnectRequest {
            authority: authority.parse().unwrap(),
            connection_id: "c-1".into(),
            forwarded_for: "10.0.0.1".parse().unwrap(),
            baggage: Baggage {
                namespace: Some("demo".into()),
                service: Some("client".into()),
                ..Baggage::default()
            },
        }
    }

    #[test]
    fn forwarded_round_trips() {
        for ip in ["10.77.1.10", "fd00::1", "::1", "2001:db8::a:b"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_value(ip)), Some(ip), "{ip}");
        }
        assert_eq!(
            forwarded_value("fd00::1".parse().unwrap()),
            "for=\"[fd00::1]\""
        );
        assert_eq!(
            forwarded_value("::ffff:10.1.2.3".parse().unwrap()),
            "for=10.1.2.3"
        );
    }

    #[test]
    fn forwarded_parsing_follows_rfc7239_and_tolerates_peers() {
        let cases = [
            (
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                Some("192.0.2.60"),
            ),
            (
                "For=\"[2001:db8:cafe::17]:4711\"",
                Some("2001:db8:cafe::17"),
            ),
            ("for=\"192.0.2.43:47011\"", Some("192.0.2.43")),
            ("proto=https; for=10.1.1.1", Some("10.1.1.1")),
            ("for=10.0.0.1, for=10.0.0.2", Some("10.0.0.1")),
            ("for=[fd00::2]", Some("fd00::2")),
            ("for=fd00::3", Some("fd00::3")),
            ("for=unknown", None),
            ("for=_hidden", None),
            ("for=\"[fd00::1\"", None),
            ("by=10.0.0.1", None),
            ("", None),
            ("for=", None),
        ];
        for (value, want) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(parse_forwarded_for(value), want, "{value:?}");
        }
    }

    #[test]
    fn request_is_a_plain_connect_and_parses_back() {
        for authority in ["10.77.2.10:9000", "[fd00::10]:443"] {
            let built = connect_request(&request(authority)).unwrap();
            assert_eq!(built.method(), Method::CONNECT);
            assert!(built.uri().scheme().is_none());
            assert!(built.uri().path_and_query().is_none());
            let parsed = parse_connect(&built).unwrap();
            assert_eq!(parsed.authority, authority.parse().unwrap());
            assert_eq!(parsed.connection_id.as_deref(), Some("c-1"));
            assert_eq!(parsed.forwarded_for, Some("10.0.0.1".parse().unwrap()));
            assert_eq!(parsed.baggage, request(authority).baggage);
        }
    }

    #[test]
    fn trace_context_carries_the_connection_id() {
        let id = "5f0c1d2e3f405162738495a6b7c8d9e0";
        let mut req = request("10.0.0.2:80");
        req.connection_id = id.into();
        let built = connect_request(&req).unwrap();
        let traceparent = built.headers()[TRACEPARENT_HEADER].to_str().unwrap();
        assert_eq!(trace_id_of(traceparent), Some(id), "{traceparent}");
        assert!(traceparent.starts_with(&format!("00-{id}-")) && traceparent.ends_with("-01"));
        // Without our header (a ztunnel peer), the trace id is the connection id.
        let mut from_ztunnel = built;
        from_ztunnel.headers_mut().remove(CONNECTION_ID_HEADER);
        assert_eq!(
            parse_connect(&from_ztunnel)
                .unwrap()
                .connection_id
                .as_deref(),
            Some(id)
        );
        // An id that cannot be a trace id is sent without trace context.
        assert!(!connect_request(&request("10.0.0.2:80"))
            .unwrap()
            .headers()
            .contains_key(TRACEPARENT_HEADER));
        for bad in [
            "01-5f0c1d2e3f405162738495a6b7c8d9e0-0102030405060708-01",
            "00-00000000000000000000000000000000-0102030405060708-01",
            "00-5F0C1D2E3F405162738495A6B7C8D9E0-0102030405060708-01",
            "00-5f0c1d2e3f405162738495a6b7c8d9e0-01020304-01",
            "00-5f0c1d2e3f405162738495a6b7c8d9e0-0102030405060708-01-extra",
            "",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn mapped_and_scoped_addresses_are_sent_plainly() {
        let mapped = SocketAddr::new("::ffff:10.1.2.3".parse().unwrap(), 80);
        assert_eq!(authority_value(mapped), "10.1.2.3:80");
        let scoped: SocketAddr = "[fe80::1%2]:80".parse().unwrap();
        assert_eq!(authority_value(scoped), "[fe80::1]:80");
    }

    #[test]
    fn bad_connection_id_is_refused_before_sending() {
        let mut req = request("10.0.0.2:80");
        req.connection_id = "a\nb".into();
        assert!(matches!(
            connect_request(&req),
            Err(HboneError::InvalidConnectionId(_))
        ));
    }

    #[test]
    fn invalid_requests_are_explained() {
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.0.1:80/")
            .body(())
            .unwrap();
        assert!(parse_connect(&get).unwrap_err().contains("not CONNECT"));
        let with_path = Request::builder()
            .method(Method::CONNECT)
            .uri("http://10.0.0.1:80/x")
            .body(())
            .unwrap();
        assert!(parse_connect(&with_path).unwrap_err().contains(":path"));
        let by_name = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:80")
            .body(())
            .unwrap();
        assert!(parse_connect(&by_name).unwrap_err().contains("ip:port"));
        let no_port = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1")
            .body(())
            .unwrap();
        assert!(parse_connect(&no_port).is_err());
    }

    #[test]
    fn reasons_are_sanitised() {
        assert_eq!(reason_value("denied by ns/foo"), "denied by ns/foo");
        assert_eq!(reason_value("a\r\nb\u{e9}"), "a??b?");
        assert_eq!(reason_value(&"x".repeat(1000)).len(), MAX_REASON_LEN);
        assert_eq!(reason_value(" \n "), "?");
        let mut headers = HeaderMap::new();
        assert_eq!(reason_of(StatusCode::FORBIDDEN, &headers), "Forbidden");
        headers.insert(REASON_HEADER, HeaderValue::from_static("policy deny-all"));
        assert_eq!(
            reason_of(StatusCode::FORBIDDEN, &headers),
            "policy deny-all"
        );
    }
}
