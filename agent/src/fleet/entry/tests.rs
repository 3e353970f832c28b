use std::os::unix::fs::PermissionsExt;

use super::*;

const KEY: [u8; 32] = [7; 32];

fn key() -> PoolKey {
    PoolKey::from_bytes(&KEY, "pool-a").unwrap()
}

fn entry() -> Entry {
    Entry {
        kind: Kind::Revocation,
        pool: "pool-a".into(),
        origin: "node-1".into(),
        seq: 42,
        wall_ms: 1_764_600_000_000,
        subject: "tok-123".into(),
        payload: r#"{"token_id":"tok-123","until_ms":1764603600000}"#.into(),
    }
}

/// The stored fields as owned pairs, for editing one.
fn fields(s: &Signed) -> Vec<(String, Vec<u8>)> {
    s.to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn verify(k: &PoolKey, f: &[(String, Vec<u8>)]) -> Result<Verified, Refusal> {
    k.verify_fields(f.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

#[test]
fn signed_entry_round_trips_through_fields_and_snapshot_value() {
    let k = key();
    let s = k.sign(entry()).unwrap();
    let v = verify(&k, &fields(&s)).unwrap();
    assert_eq!(v.entry(), &entry());
    let v = k
        .verify_snapshot(b"revocation:tok-123", s.to_snapshot_value().as_bytes())
        .unwrap();
    assert_eq!(v.into_entry(), entry());
}

#[test]
fn tampering_with_any_field_is_refused_bad_mac() {
    let k = key();
    let good = fields(&k.sign(entry()).unwrap());
    // A valid other value for each signed field (other pool is its own refusal, below).
    let edits: [(&str, &[u8]); 6] = [
        (field::KIND, b"quarantine"),
        (field::ORIGIN, b"node-2"),
        (field::SEQ, b"43"),
        (field::WALL_MS, b"1764600000001"),
        (field::SUBJECT, b"tok-124"),
        (
            field::PAYLOAD,
            br#"{"token_id":"tok-124","until_ms":1764603600000}"#,
        ),
    ];
    for (name, value) in edits {
        let mut f = good.clone();
        f.iter_mut().find(|(k, _)| k == name).unwrap().1 = value.to_vec();
        assert_eq!(verify(&k, &f), Err(Refusal::BadMac), "edited {name}");
    }
    // The MAC itself, one bit flipped.
    let mut f = good.clone();
    let mac = &mut f.iter_mut().find(|(k, _)| k == field::MAC).unwrap().1;
    mac[0] = if mac[0] == b'0' { b'1' } else { b'0' };
    assert_eq!(verify(&k, &f), Err(Refusal::BadMac));
}

#[test]
fn another_key_or_pool_is_refused() {
    let s = key().sign(entry()).unwrap();
    let other_key = PoolKey::from_bytes(&[8; 32], "pool-a").unwrap();
    assert_eq!(verify(&other_key, &fields(&s)), Err(Refusal::BadMac));
    // Same key, another pool: refused before the MAC, with its own label.
    let other_pool = PoolKey::from_bytes(&KEY, "pool-b").unwrap();
    assert_eq!(verify(&other_pool, &fields(&s)), Err(Refusal::OtherPool));
    let mut f = fields(&s);
    f.iter_mut().find(|(k, _)| k == field::POOL).unwrap().1 = b"pool-b".to_vec();
    assert_eq!(verify(&key(), &f), Err(Refusal::OtherPool));
}

#[test]
fn canonical_encoding_does_not_let_bytes_move_between_fields() {
    // Same concatenated text, different split: length prefixes make the MACs differ.
    let a = Entry {
        origin: "node-1".into(),
        subject: "ab".into(),
        ..entry()
    };
    let b = Entry {
        origin: "node-1a".into(),
        subject: "b".into(),
        ..entry()
    };
    assert_ne!(key().sign(a).unwrap().mac, key().sign(b).unwrap().mac);
}

#[test]
fn unknown_kind_oversized_payload_and_malformed_fields_have_their_labels() {
    let k = key();
    let good = fields(&k.sign(entry()).unwrap());
    let set = |name: &str, value: &[u8]| {
        let mut f = good.clone();
        f.iter_mut().find(|(k, _)| k == name).unwrap().1 = value.to_vec();
        verify(&k, &f)
    };
    assert_eq!(set(field::KIND, b"grant"), Err(Refusal::UnknownKind));
    assert_eq!(set(field::KIND, b"Revocation"), Err(Refusal::UnknownKind));
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert_eq!(set(field::PAYLOAD, &big), Err(Refusal::PayloadTooLarge));
    for (name, bad) in [
        (field::SEQ, &b"-1"[..]),
        (field::SEQ, b"042"),
        (field::SEQ, b"99999999999999999999"),
        (field::WALL_MS, b""),
        (field::ORIGIN, b"node 1"),
        (field::POOL, b""),
        (field::SUBJECT, b"a b"),
        (field::MAC, b"zz"),
        (field::PAYLOAD, b"\xff"),
    ] {
        assert_eq!(set(name, bad), Err(Refusal::Malformed), "{name}={bad:?}");
    }
    // Missing, repeated and extra fields.
    let mut f = good.clone();
    f.retain(|(k, _)| k != field::SEQ);
    assert_eq!(verify(&k, &f), Err(Refusal::Malformed));
    let mut f = good.clone();
    f.push((field::SEQ.into(), b"42".to_vec()));
    assert_eq!(verify(&k, &f), Err(Refusal::Malformed));
    let mut f = good.clone();
    f.push(("grant".into(), b"all".to_vec()));
    assert_eq!(verify(&k, &f), Err(Refusal::Malformed));
}

#[test]
fn sign_refuses_what_no_node_would_accept() {
    let k = key();
    let not_object = Entry {
        payload: "[1]".into(),
        ..entry()
    };
    assert_eq!(k.sign(not_object), Err(Refusal::BadPayload));
    let other_pool = Entry {
        pool: "pool-b".into(),
        ..entry()
    };
    assert_eq!(k.sign(other_pool), Err(Refusal::OtherPool));
}

#[test]
fn snapshot_value_under_another_field_is_misplaced() {
    let k = key();
    let s = k.sign(entry()).unwrap().to_snapshot_value();
    assert_eq!(
        k.verify_snapshot(b"revocation:tok-999", s.as_bytes()),
        Err(Refusal::Misplaced)
    );
    assert_eq!(
        k.verify_snapshot(b"revocation:tok-123", b"not json"),
        Err(Refusal::Malformed)
    );
}

#[test]
fn release_shares_the_quarantine_slot() {
    let q = Entry {
        kind: Kind::Quarantine,
        subject: "198.18.0.7".into(),
        ..entry()
    };
    let r = Entry {
        kind: Kind::Release,
        ..q.clone()
    };
    assert_eq!(q.snapshot_field(), r.snapshot_field());
    assert_eq!(q.snapshot_field(), "quarantine:198.18.0.7");
}

#[test]
fn labels_are_unique_and_stable() {
    let labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels,
        [
            "malformed",
            "unknown_kind",
            "payload_too_large",
            "other_pool",
            "bad_mac",
            "bad_payload",
            "misplaced"
        ]
    );
    for k in Kind::ALL {
        assert_eq!(Kind::from_label(k.label().as_bytes()), Some(k));
    }
}

#[test]
fn key_loader_refuses_short_keys_loose_files_and_non_hex() {
    let dir = std::env::temp_dir().join(format!("tollgate-poolkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let good = dir.join("good.key");
    write_key_file(&good).unwrap();
    let k = PoolKey::load(&good, "pool-a").unwrap();
    assert!(!format!("{k:?}").contains(std::fs::read_to_string(&good).unwrap().trim()));

    let short = write("short.key", &"ab".repeat(31), 0o600);
    assert!(matches!(
        PoolKey::load(&short, "pool-a"),
        Err(KeyError::TooShort { len: 31, .. })
    ));
    let loose = write("loose.key", &"ab".repeat(32), 0o644);
    let err = PoolKey::load(&loose, "pool-a").unwrap_err();
    assert!(
        matches!(err, KeyError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
    let text = write(
        "text.key",
        "correct horse battery staple correct horse",
        0o600,
    );
    assert!(matches!(
        PoolKey::load(&text, "pool-a"),
        Err(KeyError::NotHex { .. })
    ));
    // Group-readable is fine (a `tollgate` group may share it).
    write("group.key", &"ab".repeat(32), 0o640);
    PoolKey::load(&dir.join("group.key"), "pool-a").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
