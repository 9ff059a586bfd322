//! Reading the CA's private key. The signer takes PKCS#8; Istio's plug-in CA keys are
//! as often the older forms `openssl genrsa` and `openssl ecparam -genkey` write —
//! PKCS#1 (`BEGIN RSA PRIVATE KEY`) and SEC1 (`BEGIN EC PRIVATE KEY`) — so those are
//! wrapped into the PKCS#8 that `openssl pkcs8 -topk8` would write, byte for byte.
use std::{fs, path::Path};

use rcgen::KeyPair;
use rustls_pki_types::{pem::PemObject, PrivateKeyDer};
use x509_parser::asn1_rs::{Any, Class, FromDer, Oid, Sequence};

use super::CaError;

/// DER tags used when wrapping.
const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
/// `[1]` constructed: SEC1's public key.
const CONTEXT_1: u8 = 0xa1;
/// `INTEGER 0`: PKCS#8 version.
const VERSION_0: [u8; 3] = [INTEGER, 0x01, 0x00];
/// `OID 1.2.840.10045.2.1` (id-ecPublicKey).
const EC_PUBLIC_KEY: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `SEQUENCE { OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL }`.
const RSA_ENCRYPTION: [u8; 15] = [
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

pub(super) fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = fs::metadata(path) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the CA's private key is readable by other users (mode {mode:o}); chmod 600 it"
            );
        }
    }
    let bad = |reason: String| CaError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let convert = "convert it with `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem -out ca-key.pkcs8.pem` and put ca-key.pkcs8.pem in its place (mode 0600)";
    let unusable = |form: &str, e: &dyn std::fmt::Display| {
        bad(format!(
            "holds {form} that cannot be used ({e}); warren signs with ECDSA P-256/P-384, Ed25519 or RSA keys; {convert}"
        ))
    };
    let pkcs8 =
        match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(key @ PrivateKeyDer::Pkcs8(_)) => key,
            Ok(PrivateKeyDer::Pkcs1(pkcs1)) => {
                PrivateKeyDer::Pkcs8(rsa_pkcs1_to_pkcs8(pkcs1.secret_pkcs1_der()).into())
            }
            Ok(PrivateKeyDer::Sec1(sec1)) => match ec_sec1_to_pkcs8(sec1.secret_sec1_der()) {
                Ok(pkcs8) => PrivateKeyDer::Pkcs8(pkcs8.into()),
                Err(e) => {
                    return Err(unusable(
                        "an EC key in SEC1 form (BEGIN EC PRIVATE KEY)",
                        &e,
                    ))
                }
            },
            Ok(_) => return Err(bad(
                "holds a key of an unknown form; warren reads PKCS#8, PKCS#1 (RSA) and SEC1 (EC)"
                    .to_owned(),
            )),
            Err(e) => return Err(bad(format!("no PEM private key found: {e}"))),
        };
    KeyPair::try_from(&pkcs8).map_err(|e| {
        if pem.starts_with(b"-----BEGIN RSA") {
            unusable("an RSA key in PKCS#1 form (BEGIN RSA PRIVATE KEY)", &e)
        } else if pem.starts_with(b"-----BEGIN EC") {
            unusable("an EC key in SEC1 form (BEGIN EC PRIVATE KEY)", &e)
        } else {
            bad(format!(
                "unsupported key ({e}); warren signs with ECDSA P-256/P-384, Ed25519 or RSA keys"
            ))
        }
    })
}

/// PKCS#8 `PrivateKeyInfo` around a PKCS#1 RSA key (RFC 5208): version 0, algorithm
/// rsaEncryption with NULL parameters, the PKCS#1 DER as the private key.
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(pkcs1.len() + 32);
    body.extend_from_slice(&VERSION_0);
    body.extend_from_slice(&RSA_ENCRYPTION);
    body.extend(tlv(OCTET_STRING, pkcs1));
    tlv(SEQUENCE, &body)
}

/// PKCS#8 `PrivateKeyInfo` around a SEC1 `ECPrivateKey` (RFC 5915): the curve moves from
/// the key's `[0] parameters` into the algorithm identifier, and the key keeps its
/// version, private key and `[1] publicKey` — what openssl writes, and what ring reads.
fn ec_sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, String> {
    let (_, key) = Sequence::from_der(sec1).map_err(|e| format!("not DER: {e}"))?;
    let mut rest: &[u8] = &key.content;
    let (mut version, mut private, mut curve, mut public) = (None, None, None, None);
    while !rest.is_empty() {
        let (after, element) = Any::from_der(rest).map_err(|e| format!("not DER: {e}"))?;
        rest = after;
        match (element.class(), element.tag().0) {
            (Class::Universal, 2) => version = Some(element.data),
            (Class::Universal, 4) => private = Some(element.data),
            (Class::ContextSpecific, 0) => curve = Some(element.data),
            (Class::ContextSpecific, 1) => public = Some(element.data),
            _ => return Err("unexpected element in ECPrivateKey".to_owned()),
        }
    }
    if version != Some(&[1][..]) {
        return Err("ECPrivateKey version is not 1".to_owned());
    }
    let private = private.ok_or("no private key")?;
    let curve = curve.ok_or("no curve named in the key's parameters")?;
    Oid::from_der(curve).map_err(|_| "the key's parameters are not a named curve".to_owned())?;
    let public = public.ok_or("no public key in it")?;

    let mut inner = vec![INTEGER, 0x01, 0x01];
    inner.extend(tlv(OCTET_STRING, private));
    inner.extend(tlv(CONTEXT_1, public));
    let mut algorithm = EC_PUBLIC_KEY.to_vec();
    algorithm.extend_from_slice(curve);
    let mut body = VERSION_0.to_vec();
    body.extend(tlv(SEQUENCE, &algorithm));
    body.extend(tlv(OCTET_STRING, &tlv(SEQUENCE, &inner)));
    Ok(tlv(SEQUENCE, &body))
}

/// DER tag-length-value.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{tests::csr_for, tests::identity, tests::uri, CA_KEY_FILE};
    use super::*;
    use crate::identity::CertificateAuthority;

    fn pem(bytes: &[u8]) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(bytes).unwrap()
    }

    /// Each older form, wrapped, is byte for byte the PKCS#8 form openssl writes.
    #[test]
    fn older_key_forms_wrap_as_openssl_does() {
        let (PrivateKeyDer::Pkcs1(pkcs1), PrivateKeyDer::Pkcs8(pkcs8)) = (
            pem(include_bytes!("../testdata/rsa-2048-test-only.pkcs1.pem")),
            pem(include_bytes!("../testdata/rsa-2048-test-only.pem")),
        ) else {
            panic!("RSA test keys in the wrong forms");
        };
        assert_eq!(
            rsa_pkcs1_to_pkcs8(pkcs1.secret_pkcs1_der()),
            pkcs8.secret_pkcs8_der()
        );
        let (PrivateKeyDer::Sec1(sec1), PrivateKeyDer::Pkcs8(pkcs8)) = (
            pem(include_bytes!("../testdata/ec-p256-test-only.sec1.pem")),
            pem(include_bytes!("../testdata/ec-p256-test-only.pem")),
        ) else {
            panic!("EC test keys in the wrong forms");
        };
        assert_eq!(
            ec_sec1_to_pkcs8(sec1.secret_sec1_der()).unwrap(),
            pkcs8.secret_pkcs8_der()
        );
    }

    #[test]
    fn broken_sec1_keys_are_explained() {
        assert!(ec_sec1_to_pkcs8(b"junk").unwrap_err().contains("not DER"));
        // SEQUENCE { INTEGER 1, OCTET STRING 01 }: no curve.
        let no_curve = [0x30, 0x06, 0x02, 0x01, 0x01, 0x04, 0x01, 0x01];
        assert!(ec_sec1_to_pkcs8(&no_curve).unwrap_err().contains("curve"));
        // SEQUENCE { INTEGER 2 }
        let version_2 = [0x30, 0x03, 0x02, 0x01, 0x02];
        assert!(ec_sec1_to_pkcs8(&version_2)
            .unwrap_err()
            .contains("version"));
    }

    /// A plug-in CA whose ca-key.pem is PKCS#1 (RSA) loads and signs with its RSA
    /// intermediate; an EC key in SEC1 form that does not belong to ca-cert.pem is refused
    /// as not belonging — it was read.
    #[test]
    fn a_plug_in_ca_key_may_be_pkcs1_or_sec1() {
        let (dir, _, intermediate) = super::super::plugged_in_ca();
        fs::write(
            dir.path().join(CA_KEY_FILE),
            include_str!("../testdata/rsa-2048-test-only.pkcs1.pem"),
        )
        .unwrap();
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let id = identity("server");
        let chain = ca
            .sign_csr(&csr_for(vec![uri(&id)]), &id, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            chain[1], intermediate,
            "the leaf comes with its RSA intermediate"
        );

        fs::write(
            dir.path().join(CA_KEY_FILE),
            include_str!("../testdata/ec-p256-test-only.sec1.pem"),
        )
        .unwrap();
        let err = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not belong"), "{err}");
        fs::write(
            dir.path().join(CA_KEY_FILE),
            "-----BEGIN EC PRIVATE KEY-----\nMAMCAQE=\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SEC1") && err.contains("openssl pkcs8"),
            "{err}"
        );
    }
}
