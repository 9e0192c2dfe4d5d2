//! Decoding never panics on any bytes, and whatever decodes re-encodes to something
//! that decodes to the same value (decode -> encode -> decode agrees). Inputs are
//! random bytes and valid messages mutated byte by byte, from a fixed seed so a
//! failure reproduces.

use f2b_proto::auth::{self, MonitorSecret, RequestAuth, SigningKey};
use f2b_proto::{
    pack_events, Ack, AckStatus, Action, ActiveBan, Broadcast, Epoch, Event, EventId, Heartbeat,
    JailName, Nak, NakReason, NodeName, Reply, Request, Sequenced, SnapshotPage, SnapshotReply,
    SnapshotRequest,
};

/// xorshift64*: a small deterministic generator; the test needs no crypto.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let event = Event::new(
        EventId::from_u128(0xfeed),
        NodeName::new("web1").unwrap(),
        JailName::new("sshd").unwrap(),
        Action::Ban,
        "2001:db8::dead:beef".parse().unwrap(),
        1_763_700_773_446,
    )
    .unwrap();
    let mut page = SnapshotPage::new(Epoch(7), 3);
    page.try_push(ActiveBan {
        seq: 2,
        expires_ms: 1_763_700_999_000,
        event: event.clone(),
    })
    .unwrap();
    page.next = Some(2);
    vec![
        Request::Snapshot(SnapshotRequest {
            jails: vec![JailName::new("sshd").unwrap()],
            cursor: Some(5),
            nonce: Some([0x5a; 16]),
        })
        .encode(),
        RequestAuth::sign(
            &MonitorSecret::new(&"k".repeat(32)).unwrap(),
            &NodeName::new("web1").unwrap(),
            1_763_700_773_446,
            [0x11; 16],
            b"{}",
        )
        .encode(),
        SnapshotReply::Page(page).encode(),
        Request::Report(event.clone()).encode(),
        Reply::Ack(Ack {
            id: event.id,
            seq: Some(9),
            status: AckStatus::Broadcast,
        })
        .encode(),
        Reply::Nak(Nak::new(Some(event.id), NakReason::InvalidIp, "x")).encode(),
        Request::Reports(vec![event.clone(), event.clone()]).encode(),
        Reply::Replies(vec![
            Reply::Ack(Ack {
                id: event.id,
                seq: None,
                status: AckStatus::Unchanged,
            }),
            Reply::Nak(Nak::new(Some(event.id), NakReason::Busy, "later")),
        ])
        .encode(),
        Broadcast::Event(Sequenced {
            seq: 1,
            epoch: Epoch(7),
            event: event.clone(),
        })
        .encode(),
        pack_events(
            (2..4)
                .map(|seq| Sequenced {
                    seq,
                    epoch: Epoch(7),
                    event: event.clone(),
                })
                .collect(),
        )[0]
        .encode(),
        Broadcast::Heartbeat(Heartbeat {
            seq: 1,
            epoch: Epoch(7),
            interval_ms: 1000,
        })
        .encode(),
    ]
}

const INTERESTING: &[u8] = b"{}[]\":,0123456789-.abcdefv\\ \0\xff\n";

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let pos = if out.is_empty() {
            0
        } else {
            rng.below(out.len())
        };
        match rng.below(4) {
            0 if !out.is_empty() => out[pos] = INTERESTING[rng.below(INTERESTING.len())],
            1 if !out.is_empty() => {
                out.remove(pos);
            }
            2 => out.insert(pos, INTERESTING[rng.below(INTERESTING.len())]),
            _ if !out.is_empty() => out[pos] = rng.next() as u8,
            _ => out.push(rng.next() as u8),
        }
    }
    out
}

fn check(bytes: &[u8]) -> usize {
    let mut decoded = 0;
    if let Ok(r) = Request::decode(bytes) {
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        decoded += 1;
    }
    if let Ok(r) = Reply::decode(bytes) {
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        decoded += 1;
    }
    if let Ok(a) = RequestAuth::decode(bytes) {
        assert_eq!(RequestAuth::decode(&a.encode()).unwrap(), a);
        // A mutated auth frame never verifies under the secret of the seed, unless
        // the mutation left everything the MAC covers intact.
        let secret = MonitorSecret::new(&"k".repeat(32)).unwrap();
        if a.verify(&secret, b"{}") {
            assert_eq!(
                (a.ts_ms, a.nonce, a.key.as_str()),
                (1_763_700_773_446, [0x11; 16], "web1")
            );
        }
        decoded += 1;
    }
    if let Ok(r) = SnapshotReply::decode(bytes) {
        assert_eq!(SnapshotReply::decode(&r.encode()).unwrap(), r);
        decoded += 1;
    }
    for topic in [&b"ev:sshd\0"[..], b"hb:\0", b""] {
        if let Ok(b) = Broadcast::decode(topic, bytes) {
            assert_eq!(Broadcast::decode(&b.topic(), &b.encode()).unwrap(), b);
            decoded += 1;
        }
    }
    // No mutated frame is taken for a signature by the publisher's key.
    let key = SigningKey::from_seed([1; 32]);
    if bytes.len() == auth::SIGNATURE_LEN {
        assert!(!auth::verify_broadcast(
            &[key.public()],
            b"hb:\0",
            b"{}",
            bytes
        ));
    }
    decoded
}

#[test]
fn mutated_messages_never_panic_and_round_trip() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = seeds();
    let (mut tried, mut decoded) = (0, 0);
    for seed in &seeds {
        assert!(check(seed) > 0, "a seed must decode");
    }
    for _ in 0..20_000 {
        let seed = &seeds[rng.below(seeds.len())];
        decoded += check(&mutate(&mut rng, seed));
        tried += 1;
    }
    for _ in 0..5_000 {
        let len = rng.below(300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        decoded += check(&bytes);
        tried += 1;
    }
    eprintln!("{tried} inputs tried, {decoded} decoded and round-tripped");
    assert!(decoded > 0, "mutations should leave some messages valid");
}
