//! `warren verify --pcap FILE`: a capture file made anywhere, read to the end into flows.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(capture) = warren::verify::read_capture(data) {
        let source = warren::verify::Source::File {
            path: "fuzz.pcap".into(),
            span: capture.span(),
        };
        let _ = capture.report(source, &[], Vec::new());
    }
});
