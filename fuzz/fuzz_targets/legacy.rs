//! `legacy::parse` (fail2ban-zmq-tools' `[token|]host|jail|action|ip`), with and
//! without a token: a message that parses is re-formatted and must parse to the
//! same event; its `wire` form (what is echoed and broadcast) must parse too.
#![no_main]

use f2b_proto::legacy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for token in [None, Some("s3cret")] {
        let Ok(first) = legacy::parse(data, token) else {
            continue;
        };
        let text = legacy::format(&first.host, &first.jail, first.action, first.ip);
        let again = legacy::parse(text.as_bytes(), None)
            .unwrap_or_else(|e| panic!("re-formatted {text:?} does not parse: {e}: {first:?}"));
        assert_eq!(
            (&first.host, &first.jail, first.action, first.ip),
            (&again.host, &again.jail, again.action, again.ip),
            "parse -> format -> parse disagrees"
        );
        let wire = legacy::parse(first.wire.as_bytes(), None)
            .unwrap_or_else(|e| panic!("the wire form {:?} does not parse: {e}", first.wire));
        assert_eq!((wire.host, wire.ip), (first.host.clone(), first.ip));
    }
});
