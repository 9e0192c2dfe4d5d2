//! `Broadcast::decode(topic, payload)` and the signature check a subscriber runs
//! first. The input's first byte is the topic's length (cut to what is there).
#![no_main]

use f2b_proto::auth::{self, SigningKey};
use f2b_proto::Broadcast;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (topic, payload) = rest.split_at(usize::from(n).min(rest.len()));
    // A forged signature frame: the payload's last 64 bytes, when it has them.
    let key = SigningKey::from_seed([7; 32]).public();
    if payload.len() >= auth::SIGNATURE_LEN {
        let (p, sig) = payload.split_at(payload.len() - auth::SIGNATURE_LEN);
        assert!(!auth::verify_broadcast(&[key], topic, p, sig));
    }
    if let Ok(first) = Broadcast::decode(topic, payload) {
        let (t, p) = (first.topic(), first.encode());
        let again = Broadcast::decode(&t, &p)
            .unwrap_or_else(|e| panic!("re-encoded broadcast does not decode: {e}: {first:?}"));
        assert_eq!(first, again, "decode -> encode -> decode disagrees");
        assert_eq!(
            (t, p),
            (again.topic(), again.encode()),
            "encoding is not stable"
        );
    }
});
