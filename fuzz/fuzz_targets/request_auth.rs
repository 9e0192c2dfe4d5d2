//! `RequestAuth::decode` (a report's auth frame) and its MAC check, which must
//! never accept what the fuzzer makes up.
#![no_main]

use f2b_proto::auth::{MonitorSecret, RequestAuth};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(first) = RequestAuth::decode(data) {
        let bytes = first.encode();
        let again = RequestAuth::decode(&bytes)
            .unwrap_or_else(|e| panic!("re-encoded auth frame does not decode: {e}: {first:?}"));
        assert_eq!(first, again, "decode -> encode -> decode disagrees");
        assert_eq!(bytes, again.encode(), "encoding is not stable");
        let secret = MonitorSecret::from_random([42; 32]);
        assert!(
            !first.verify(&secret, data),
            "a made-up MAC verified: {first:?}"
        );
    }
});
