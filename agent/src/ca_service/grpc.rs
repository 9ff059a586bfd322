//! Istio's certificate API, `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! (the API istiod serves on 15012 and ztunnel calls), as unary gRPC over HTTP/2: the
//! two messages (prost), the 5-byte length-prefixed framing, and gRPC statuses in the
//! trailers. Shared by `warren ca serve` and the agents' client.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key with which a node agent asks for another identity than its own
/// (ztunnel's, honoured by istiod for trusted node accounts).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Largest message accepted either way: a CSR or a chain is a few kilobytes.
pub const MAX_MESSAGE: usize = 1 << 20;

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, leaf first, root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// The identity a node agent asks for on a pod's behalf, if any.
    pub fn impersonated_identity(&self) -> Option<&str> {
        let value = self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
        match value.kind.as_ref()? {
            prost_types::value::Kind::StringValue(identity) => Some(identity),
            _ => None,
        }
    }

    pub fn with_impersonated_identity(mut self, identity: &str) -> Self {
        let metadata = self.metadata.get_or_insert_with(Default::default);
        metadata.fields.insert(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
            },
        );
        self
    }
}

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    pub fn from_number(number: u32) -> Option<Self> {
        Some(match number {
            0 => Code::Ok,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            13 => Code::Internal,
            14 => Code::Unavailable,
            16 => Code::Unauthenticated,
            _ => return None,
        })
    }
}

/// A gRPC failure: code and message, as carried in `grpc-status` / `grpc-message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (gRPC status {code:?})")]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One message in gRPC's framing: uncompressed flag, 4-byte big-endian length, bytes.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + body.len());
    framed.put_u8(0);
    framed.put_u32(body.len() as u32);
    framed.put_slice(&body);
    framed.freeze()
}

/// The one message of a unary call's body.
pub fn unframe<M: prost::Message + Default>(mut body: Bytes) -> Result<M, Status> {
    let invalid = |why: &str| {
        Status::new(
            Code::InvalidArgument,
            format!("malformed gRPC message: {why}"),
        )
    };
    if body.len() < 5 {
        return Err(invalid("shorter than its 5-byte prefix"));
    }
    if body.get_u8() != 0 {
        return Err(invalid("compressed messages are not accepted"));
    }
    let length = body.get_u32() as usize;
    if length > MAX_MESSAGE || length != body.len() {
        return Err(invalid("its length prefix does not match the body"));
    }
    M::decode(body).map_err(|err| invalid(&err.to_string()))
}

/// `grpc-message` is percent-encoded (outside printable ASCII, and `%` itself).
pub fn encode_message(message: &str) -> String {
    message
        .bytes()
        .map(|b| match b {
            b' '..=b'~' if b != b'%' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

pub fn decode_message(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten();
        if let Some(hex) = hex {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_the_framing() {
        let request = IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: 3600,
            metadata: None,
        }
        .with_impersonated_identity("spiffe://cluster.local/ns/demo/sa/client");
        let back: IstioCertificateRequest = unframe(frame(&request)).unwrap();
        assert_eq!(back, request);
        assert_eq!(
            back.impersonated_identity(),
            Some("spiffe://cluster.local/ns/demo/sa/client")
        );
        let mut bad = frame(&request).to_vec();
        bad[4] ^= 1;
        assert_eq!(
            unframe::<IstioCertificateRequest>(bad.into())
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        let text = "no pod of ns/demo/sa/x on node n1 — 100%";
        let encoded = encode_message(text);
        assert!(encoded.is_ascii() && !encoded.contains('—'));
        assert_eq!(decode_message(&encoded), text);
    }
}
