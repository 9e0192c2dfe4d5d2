use super::*;

fn item(id: u128, local: &str, action: Action, ip: &str, epoch: Option<u64>) -> Item {
    Item {
        jail: JailName::new(local).unwrap(),
        event: Event::new(
            EventId::from_u128(id),
            NodeName::new("web2").unwrap(),
            JailName::new("sshd").unwrap(),
            action,
            ip.parse().unwrap(),
            1_763_702_000_000,
        )
        .unwrap(),
        seq: id as u64,
        epoch: epoch.map(Epoch),
        expires_ms: None,
    }
}

const NOW: u64 = 1_763_702_100_000;

fn open(dir: &Path) -> Store {
    Store::open(dir, SystemTime::now()).unwrap()
}

#[test]
fn creates_a_private_locked_directory() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let s = open(&dir);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(dir.join(STATE_FILE).exists());
    match Store::open(&dir, SystemTime::now()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.join(LOCK_FILE)),
        other => panic!("{other:?}"),
    }
    drop(s);
    // The lock goes with the store.
    open(&dir);
}

#[test]
fn pending_events_survive_a_reopen_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let s = open(tmp.path());
        let mut a = item(3, "cluster", Action::Ban, "203.0.113.3", Some(9));
        a.expires_ms = Some(NOW + 1000);
        s.add_pending(&a, NOW).unwrap();
        s.add_pending(&item(1, "cluster", Action::Unban, "2001:db8::1", None), NOW)
            .unwrap();
        // The same id twice is one row.
        s.add_pending(&a, NOW).unwrap();
    }
    let mut s = open(tmp.path());
    let p = s.pending().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].event.id, EventId::from_u128(3));
    assert_eq!(p[0].epoch, Some(Epoch(9)));
    assert_eq!(p[0].expires_ms, Some(NOW + 1000));
    assert_eq!(p[0].jail.as_str(), "cluster");
    assert_eq!(p[1].event.ip.to_string(), "2001:db8::1");
    assert_eq!(p[1].epoch, None);
    assert_eq!(p[1].action(), Action::Unban);
    let known = |n| {
        s.known(&item(n, "cluster", Action::Ban, "203.0.113.3", Some(9)).event)
            .unwrap()
    };
    assert!(known(3));
    assert!(!known(4));
}

#[test]
fn settling_records_applied_bans_and_replaced_events() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    let old = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    let new = item(2, "cluster", Action::Unban, "203.0.113.1", Some(5));
    let other = item(3, "cluster", Action::Ban, "203.0.113.3", Some(5));
    for i in [&old, &new, &other] {
        s.add_pending(i, NOW).unwrap();
    }
    // The queue replaced `old` by `new`; `new` is applied.
    s.settle(std::slice::from_ref(&new), true, NOW).unwrap();
    let left: Vec<EventId> = s.pending().unwrap().iter().map(|i| i.event.id).collect();
    assert_eq!(left, [other.event.id]);
    s.settle(std::slice::from_ref(&other), true, NOW).unwrap();
    let held = s.held(Epoch(5)).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].ip.to_string(), "203.0.113.3");
    assert_eq!(held[0].id, other.event.id);
    assert_eq!(held[0].jail.as_str(), "sshd");
    assert_eq!(held[0].local_jail.as_str(), "cluster");
    assert_eq!(held[0].expires_ms, None);
    assert!(s.held(Epoch(6)).unwrap().is_empty());
    assert_eq!(
        s.held_locally(&JailName::new("cluster").unwrap(), other.event.ip)
            .unwrap(),
        1
    );
    s.learn_expiry(&other.event.jail, other.event.ip, other.event.id, NOW + 5)
        .unwrap();
    assert_eq!(s.held(Epoch(5)).unwrap()[0].expires_ms, Some(NOW + 5));
    // An unban of the same (jail, address) ends the held ban.
    let unban = item(4, "cluster", Action::Unban, "203.0.113.3", Some(5));
    s.settle(&[unban], true, NOW).unwrap();
    assert!(s.held(Epoch(5)).unwrap().is_empty());
    // Settled ids stay known; a ban given up is not held.
    let given_up = item(5, "cluster", Action::Ban, "203.0.113.5", Some(5));
    s.settle(std::slice::from_ref(&given_up), false, NOW)
        .unwrap();
    assert!(s.known(&given_up.event).unwrap());
    assert!(s.held(Epoch(5)).unwrap().is_empty());
    // Legacy bans (no epoch) are never held.
    s.settle(
        &[item(6, "cluster", Action::Ban, "203.0.113.6", None)],
        true,
        NOW,
    )
    .unwrap();
    assert_eq!(s.counts().unwrap().held, 0);
}

#[test]
fn pruning_keeps_recent_ids_and_live_bans() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    let day = ms(DONE_RETENTION);
    let old = item(1, "cluster", Action::Unban, "203.0.113.1", Some(1));
    s.settle(std::slice::from_ref(&old), true, NOW).unwrap();
    let mut expiring = item(2, "cluster", Action::Ban, "203.0.113.2", Some(1));
    expiring.expires_ms = Some(NOW + 10);
    let unknown = item(3, "cluster", Action::Ban, "203.0.113.3", Some(1));
    s.settle(&[expiring.clone(), unknown.clone()], true, NOW)
        .unwrap();
    s.add_pending(
        &item(4, "cluster", Action::Ban, "203.0.113.4", Some(1)),
        NOW,
    )
    .unwrap();
    assert_eq!(s.prune(NOW + 5).unwrap(), 0);
    // A day later: the done rows are gone, the expired ban too; the pending event
    // and the ban of unknown expiry stay.
    s.prune(NOW + day + 1).unwrap();
    assert!(!s.known(&old.event).unwrap());
    assert!(!s.known(&expiring.event).unwrap());
    assert!(s.known(&unknown.event).unwrap(), "held");
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending: 1,
            done: 0,
            held: 1
        }
    );
    s.prune(NOW + ms(HELD_UNKNOWN_RETENTION) + 1).unwrap();
    assert_eq!(s.counts().unwrap().held, 0);
}

fn corrupt_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".corrupt-"))
        .collect()
}

#[test]
fn unusable_files_are_moved_away_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(STATE_FILE);
    // Not a database at all.
    std::fs::write(&path, b"this is not SQLite, it is garbage of some length").unwrap();
    let mut s = open(tmp.path());
    assert!(s.pending().unwrap().is_empty());
    s.add_pending(&item(1, "cluster", Action::Ban, "203.0.113.1", None), NOW)
        .unwrap();
    drop(s);
    assert_eq!(corrupt_files(tmp.path()).len(), 1);

    // A database of something else.
    std::fs::remove_file(&path).unwrap();
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", path.display()));
    }
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let mut s = open(tmp.path());
    assert!(s.pending().unwrap().is_empty());
    drop(s);
    // A state of a newer schema.
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let mut s = open(tmp.path());
    assert!(s.pending().unwrap().is_empty());
    drop(s);
    assert_eq!(
        corrupt_files(tmp.path()).len(),
        3,
        "{:?}",
        corrupt_files(tmp.path())
    );
    // The new state is used normally.
    let s = open(tmp.path());
    s.add_pending(&item(2, "cluster", Action::Ban, "203.0.113.2", None), NOW)
        .unwrap();
}

#[test]
fn invalid_rows_are_dropped_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    s.add_pending(&item(1, "cluster", Action::Ban, "203.0.113.1", None), NOW)
        .unwrap();
    s.add_pending(&item(2, "cluster", Action::Ban, "203.0.113.2", None), NOW)
        .unwrap();
    s.conn
        .execute(
            "UPDATE events SET ip = 'not an ip' WHERE id = ?1",
            [EventId::from_u128(1).to_string()],
        )
        .unwrap();
    let p = s.pending().unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].event.id, EventId::from_u128(2));
    assert!(!s
        .known(&item(1, "cluster", Action::Ban, "203.0.113.1", None).event)
        .unwrap());
}

#[test]
fn batch_operations_match_the_single_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(3));
    let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(3));
    s.add_pending_all(&[a.clone(), b.clone()], NOW).unwrap();
    assert_eq!(s.pending().unwrap().len(), 2);
    s.settle(std::slice::from_ref(&a), true, NOW).unwrap();
    assert_eq!(
        s.known_all(&[
            &a.event,
            &item(99, "cluster", Action::Ban, "203.0.113.1", Some(3)).event,
            &b.event
        ])
        .unwrap(),
        [true, false, true]
    );
    s.learn_expiries(&[
        (&a.event.jail, a.event.ip, a.event.id, NOW + 7),
        // Another id for the same address: not the held ban, untouched.
        (&a.event.jail, a.event.ip, EventId::from_u128(98), NOW + 8),
    ])
    .unwrap();
    assert_eq!(s.held(Epoch(3)).unwrap()[0].expires_ms, Some(NOW + 7));
}

#[test]
fn a_state_transaction_holds_the_store_operations() {
    let (state, _dir) = State::temp();
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(1));
    let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(1));
    let known = state.transaction(|tx| {
        tx.with(|s| {
            assert!(!s.conn.is_autocommit(), "not in a transaction");
            s.add_pending_all(&[a.clone(), b.clone()], NOW)?;
            s.settle(std::slice::from_ref(&a), true, NOW)?;
            // Still inside the one transaction after the nested operations.
            assert!(!s.conn.is_autocommit());
            let c = item(3, "cluster", Action::Ban, "203.0.113.3", Some(1));
            s.known_all(&[&a.event, &b.event, &c.event])
        })
    });
    assert_eq!(known, [true, true, false]);
    let counts = state.with(|s| {
        assert!(s.conn.is_autocommit());
        s.counts()
    });
    assert_eq!(
        counts,
        Counts {
            pending: 1,
            done: 1,
            held: 1
        }
    );
}

#[test]
fn a_savepoint_not_committed_is_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(7));
    let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(7));
    // Alone (its own transaction), and inside an outer one.
    {
        let sp = Savepoint::new(&s.conn).unwrap();
        insert(&sp, &a, "pending", NOW).unwrap();
    }
    assert_eq!(s.counts().unwrap().pending, 0);
    s.conn.execute_batch("BEGIN").unwrap();
    {
        let sp = Savepoint::new(&s.conn).unwrap();
        insert(&sp, &a, "pending", NOW).unwrap();
        sp.commit().unwrap();
    }
    {
        let sp = Savepoint::new(&s.conn).unwrap();
        insert(&sp, &b, "pending", NOW).unwrap();
    }
    s.conn.execute_batch("COMMIT").unwrap();
    assert!(s.known(&a.event).unwrap());
    assert!(!s.known(&b.event).unwrap());
    assert!(s.conn.is_autocommit());
}

#[test]
fn pruning_keeps_the_newest_done_ids_when_there_are_too_many() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    let extra = 11; // the cut falls between two rows of the same time
    let total = KEEP_DONE + extra;
    {
        let tx = Savepoint::new(&s.conn).unwrap();
        let mut st = tx
            .prepare(
                "INSERT INTO events (id, state, local_jail, node, jail, action, ip, time_ms, \
                 seq, received_ms, done_ms) \
                 VALUES (?1, ?2, 'cluster', 'web2', 'sshd', 'ban', '203.0.113.1', 0, 0, 0, ?3)",
            )
            .unwrap();
        // Done times in pairs (ties broken by rowid), pending rows between.
        for i in 0..total {
            st.execute(params![
                EventId::from_u128(i as u128).to_string(),
                "done",
                sql_int(NOW - 1_000_000 + (i / 2) as u64)
            ])
            .unwrap();
            if i % 1000 == 0 {
                st.execute(params![
                    EventId::from_u128((1 << 64) + i as u128).to_string(),
                    "pending",
                    None::<i64>
                ])
                .unwrap();
            }
        }
        drop(st);
        tx.commit().unwrap();
    }
    let pending = s.counts().unwrap().pending;
    assert_eq!(s.prune(NOW).unwrap(), extra);
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending,
            done: KEEP_DONE as u64,
            held: 0
        }
    );
    // The oldest went, the next stayed.
    for i in 0..total {
        let mut e = item(0, "cluster", Action::Ban, "203.0.113.1", None).event;
        e.id = EventId::from_u128(i as u128);
        let known = s.known(&e).unwrap();
        assert_eq!(known, i >= extra, "{i}");
    }
    assert_eq!(s.prune(NOW).unwrap(), 0);
}

/// Settling an item settles its own pending row and the earlier ones of its key,
/// never a later one (a newer event still queued); an item with no row yet (the
/// executor settled it before the intake recorded it) is recorded done and
/// settles the earlier ones of its key as well.
#[test]
fn settling_stops_at_the_item_and_records_one_without_a_row() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = open(tmp.path());
    let ids = |s: &mut Store| -> Vec<EventId> {
        s.pending().unwrap().iter().map(|i| i.event.id).collect()
    };
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    let b = item(2, "cluster", Action::Unban, "203.0.113.1", Some(5));
    let c = item(3, "cluster", Action::Ban, "203.0.113.1", Some(5));
    let elsewhere = item(4, "other", Action::Ban, "203.0.113.1", Some(5));
    for i in [&a, &b, &c, &elsewhere] {
        s.add_pending(i, NOW).unwrap();
    }
    s.settle(std::slice::from_ref(&b), true, NOW).unwrap();
    assert_eq!(ids(&mut s), [c.event.id, elsewhere.event.id]);
    // Not recorded yet: recorded done, and `c` before it settled with it.
    let d = item(5, "cluster", Action::Ban, "203.0.113.1", Some(5));
    s.settle(std::slice::from_ref(&d), true, NOW).unwrap();
    assert_eq!(ids(&mut s), [elsewhere.event.id]);
    assert_eq!(s.counts().unwrap().done, 4);
    // Its pending record coming after leaves it done.
    s.add_pending(&d, NOW).unwrap();
    assert_eq!(ids(&mut s), [elsewhere.event.id]);
    assert!(s.known(&d.event).unwrap());
    assert_eq!(s.held(Epoch(5)).unwrap()[0].id, d.event.id);
}

#[test]
fn events_settled_later_are_written_before_any_other_use_in_order() {
    let (state, _dir) = State::temp();
    let ids = |state: &State| -> Vec<EventId> {
        state
            .with(|s| s.pending())
            .iter()
            .map(|i| i.event.id)
            .collect()
    };
    // `a` applied with no row (a lone ban queued before its record).
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    assert!(state.settle_later(vec![a.clone()], NOW));
    // Known at once, written later.
    assert!(state.known(&a.event));
    assert_eq!(state.written_counts(), Counts::default());
    // A later event of the same key is recorded pending: `a` is written first,
    // so its record does not settle `b` (written after it, `a`'s new row would
    // come after `b`'s and settle it unapplied).
    let b = item(2, "cluster", Action::Ban, "203.0.113.1", Some(5));
    state.with(|s| s.add_pending(&b, NOW));
    state.flush();
    assert_eq!(ids(&state), [b.event.id]);
    assert_eq!(
        state.written_counts(),
        Counts {
            pending: 1,
            done: 1,
            held: 1
        }
    );
    // A transaction writes them first too.
    let c = item(3, "cluster", Action::Ban, "203.0.113.3", Some(5));
    assert!(state.settle_later(vec![c.clone()], NOW));
    let held = state.transaction(|tx| tx.with(|s| s.held(Epoch(5))));
    assert_eq!(held.len(), 2, "{held:?}");
}

/// The `applied` lines of the events settled later are logged when their
/// records are written, in the order applied, together in one write; events
/// settled later without a line get none.
#[test]
fn applied_lines_are_logged_with_their_records_in_one_write() {
    #[derive(Default)]
    struct Writes(Vec<String>);
    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let writes = Arc::new(Mutex::new(Writes::default()));
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(f2b_common::log_batch::HoldingWriter::shared(Arc::clone(
            &writes,
        )))
        .finish();
    let applied = |writes: &Mutex<Writes>| -> Vec<String> {
        let w = writes.lock().unwrap();
        w.0.iter()
            .filter(|t| t.contains("executor: applied "))
            .cloned()
            .collect()
    };
    tracing::subscriber::with_default(subscriber, || {
        let (state, _dir) = State::temp();
        let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
        let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(5));
        let c = item(3, "cluster", Action::Unban, "203.0.113.3", Some(5));
        assert!(state.settle_applied_later(vec![a, b], "fail2ban-socket", NOW));
        assert!(!state.settle_later(vec![c.clone()], NOW));
        assert!(!state.settle_applied_later(vec![c], "log", NOW));
        assert!(applied(&writes).is_empty(), "logged before the records");
        state.flush();
        assert_eq!(state.written_counts().done, 3);
        let w = applied(&writes);
        assert_eq!(w.len(), 1, "one write: {w:?}");
        let lines: Vec<&str> = w[0].lines().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        for (line, (action, ip, via)) in lines.iter().zip([
            ("ban", "203.0.113.1", "fail2ban-socket"),
            ("ban", "203.0.113.2", "fail2ban-socket"),
            ("unban", "203.0.113.3", "log"),
        ]) {
            assert!(
                line.contains(&format!("action={action} jail=cluster ip={ip} node=web2")),
                "{line}"
            );
            assert!(line.ends_with(&format!("via={via}")), "{line}");
        }
        // Nothing waits any more: nothing more is logged.
        state.flush();
        assert_eq!(applied(&writes).len(), 1);
    });
}

#[test]
fn known_all_counts_the_events_settled_later_without_writing_them() {
    let (state, _dir) = State::temp();
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(5));
    let c = item(3, "cluster", Action::Ban, "203.0.113.3", Some(5));
    state.with(|s| s.add_pending(&b, NOW));
    assert!(state.settle_later(vec![a.clone()], NOW));
    assert!(!state.settle_later(vec![], NOW), "one was waiting already");
    assert_eq!(
        state.known_all(&[&a.event, &b.event, &c.event]),
        [true, true, false]
    );
    assert_eq!(state.written_counts().done, 0);
}

#[test]
fn events_settled_later_are_written_when_the_state_is_dropped_or_too_many_wait() {
    let dir = tempfile::tempdir().unwrap();
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    {
        let state = State::new(open(dir.path()));
        let copy = state.clone();
        assert!(state.settle_later(vec![a.clone()], NOW));
        drop(state);
        // Another holder still has it: not written yet.
        assert_eq!(copy.written_counts().done, 0);
    }
    let s = open(dir.path());
    assert!(s.known(&a.event).unwrap());
    assert_eq!(s.held(Epoch(5)).unwrap()[0].id, a.event.id);
    drop(s);

    let state = State::new(open(dir.path()));
    let many: Vec<Item> = (0..SETTLE_LATER_MAX as u32)
        .map(|n| {
            let ip = std::net::Ipv4Addr::from(0xC633_6400 + n).to_string();
            item(100 + u128::from(n), "cluster", Action::Ban, &ip, Some(5))
        })
        .collect();
    let (last, rest) = many.split_last().unwrap();
    assert!(state.settle_later(rest.to_vec(), NOW));
    assert_eq!(state.written_counts().done, 1);
    state.settle_later(vec![last.clone()], NOW);
    assert_eq!(
        state.written_counts().done,
        1 + SETTLE_LATER_MAX as u64,
        "the one that made {SETTLE_LATER_MAX} wait writes them all"
    );
}

#[test]
fn a_panic_in_a_state_transaction_rolls_it_back() {
    let (state, _dir) = State::temp();
    let a = item(1, "cluster", Action::Ban, "203.0.113.1", Some(5));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        state.transaction(|tx| {
            tx.with(|s| s.add_pending(&a, NOW));
            panic!("in the middle of a reconciliation");
        })
    }));
    assert!(panicked.is_err());
    // Nothing of it stays, and the next writes are committed.
    let b = item(2, "cluster", Action::Ban, "203.0.113.2", Some(5));
    assert!(state.settle_later(vec![b.clone()], NOW));
    state.flush();
    state.with(|s| {
        assert!(s.conn.is_autocommit(), "left inside the transaction");
        Ok(())
    });
    assert_eq!(
        state.written_counts(),
        Counts {
            pending: 0,
            done: 1,
            held: 1
        }
    );
}
