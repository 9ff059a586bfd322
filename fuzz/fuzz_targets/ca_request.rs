//! What any pod can send `warren ca serve`: a gRPC-framed IstioCertificateRequest whose
//! CSR is PEM, and the CSR's DER on its own.
#![no_main]
use libfuzzer_sys::fuzz_target;
use warren::ca_service::{self, grpc};

fuzz_target!(|data: &[u8]| {
    let body = bytes::Bytes::copy_from_slice(data);
    if let Ok(request) = grpc::unframe::<grpc::IstioCertificateRequest>(body) {
        let _ = request.impersonated_identity();
        if let Some(der) = ca_service::csr_der(&request.csr) {
            let _ = ca_service::csr_identity(&der);
        }
    }
    let _ = ca_service::csr_identity(data);
});
