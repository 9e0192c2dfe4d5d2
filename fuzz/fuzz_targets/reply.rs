//! `Reply::decode` (ACK or NAK, what a monitor reads).
#![no_main]

use f2b_proto::Reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(first) = Reply::decode(data) {
        let bytes = first.encode();
        let again = Reply::decode(&bytes)
            .unwrap_or_else(|e| panic!("re-encoded reply does not decode: {e}: {first:?}"));
        assert_eq!(first, again, "decode -> encode -> decode disagrees");
        assert_eq!(bytes, again.encode(), "encoding is not stable");
    }
});
