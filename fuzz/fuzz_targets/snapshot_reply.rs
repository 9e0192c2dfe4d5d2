//! `SnapshotReply::decode` (a page of active bans or a NAK, what a subscriber
//! reads when it catches up).
#![no_main]

use f2b_proto::SnapshotReply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(first) = SnapshotReply::decode(data) {
        let bytes = first.encode();
        let again = SnapshotReply::decode(&bytes).unwrap_or_else(|e| {
            panic!("re-encoded snapshot reply does not decode: {e}: {first:?}")
        });
        assert_eq!(first, again, "decode -> encode -> decode disagrees");
        assert_eq!(bytes, again.encode(), "encoding is not stable");
    }
});
