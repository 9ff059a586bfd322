//! A CONNECT request on 15008, as any peer with a certificate can send it: method,
//! `:authority`, and the headers warren reads (`forwarded`, `baggage`, `traceparent`,
//! `x-warren-connection-id`). The input is split at `\n`: the authority, then
//! `name: value` lines.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let authority = lines.next().unwrap_or_default();
    let mut request = http::Request::builder().method(http::Method::CONNECT);
    match http::Uri::builder().authority(authority).build() {
        Ok(uri) => request = request.uri(uri),
        Err(_) => return,
    }
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            request = request.header(name.trim(), value.trim());
        }
    }
    if let Ok(request) = request.body(()) {
        let _ = warren::proxy::hbone::headers::parse_connect(&request);
    }
    // The header parsers on their own too, with any bytes.
    let _ = warren::proxy::hbone::headers::parse_forwarded_for(&text);
});
