//! `Request::decode` (reports and snapshot requests, the reply socket's first frame).
#![no_main]

use f2b_proto::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Request::peek_event_id(data);
    if let Ok(first) = Request::decode(data) {
        let bytes = first.encode();
        let again = Request::decode(&bytes)
            .unwrap_or_else(|e| panic!("re-encoded request does not decode: {e}: {first:?}"));
        assert_eq!(first, again, "decode -> encode -> decode disagrees");
        assert_eq!(bytes, again.encode(), "encoding is not stable");
    }
});
