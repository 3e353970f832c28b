//! What each kind of entry carries (the entry's `payload`, JSON): one place for the fields a
//! node publishes and another reads. Every time in a payload is on the wall clock (the only
//! clock nodes share, like a token's `exp`); a node converts it to its own agent time when it
//! installs the change, so a later step of its wall clock moves nothing.
//!
//! Parsing is strict (`deny_unknown_fields`): the entry verified under the pool key, so a
//! payload that does not parse is a bug or a newer node's format, refused `bad_payload` and
//! counted, never half applied.

use std::net::IpAddr;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A token bind: the token itself (every node verifies it again before installing anything)
/// and the address it was bound from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub token: String,
    pub address: IpAddr,
}

/// A token id revoked until `until_wall_ms` (when the token could have expired anyway).
/// The applier reads `until_wall_ms` by that name (`fleet::apply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub until_wall_ms: u64,
    pub reason: String,
}

/// Every token of an identity issued (`iat`) up to `cutoff_wall_ms` revoked. No end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRevocation {
    pub cutoff_wall_ms: u64,
    pub reason: String,
}

/// An identity quarantined, until `until_wall_ms` or released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    pub until_wall_ms: Option<u64>,
    pub reason: String,
}

/// A quarantine lifted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub reason: String,
}

/// An entry's subject is part of a Redis field name and must be printable ASCII without
/// spaces (`fleet::entry`); identities and token ids are any string a token's claims hold
/// (`Zoë`, `a b`). So a subject that is not printable ASCII, or that starts with `~`, travels
/// as `~` and the hex of its bytes: every name can be published, and read back exactly.
pub fn encode_subject(s: &str) -> String {
    let plain = !s.is_empty() && !s.starts_with('~') && s.bytes().all(|c| c.is_ascii_graphic());
    if plain {
        return s.to_owned();
    }
    let mut out = String::with_capacity(1 + 2 * s.len());
    out.push('~');
    for b in s.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The name an encoded subject stands for; `None` for a `~` form that is not hex of UTF-8.
pub fn decode_subject(s: &str) -> Option<String> {
    let Some(hex) = s.strip_prefix('~') else {
        return Some(s.to_owned());
    };
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

pub fn encode<T: Serialize>(p: &T) -> String {
    serde_json::to_string(p).expect("payloads serialize")
}

pub fn decode<T: DeserializeOwned>(payload: &str) -> Option<T> {
    serde_json::from_str(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_subject_and_reads_back() {
        for name in [
            "alice",
            "tok-1",
            "sha256:ab",
            "Zoë",
            "a b",
            "~tilde",
            "x\ty",
        ] {
            let wire = encode_subject(name);
            assert!(wire.bytes().all(|c| c.is_ascii_graphic()), "{wire}");
            assert_eq!(decode_subject(&wire).as_deref(), Some(name));
        }
        assert_eq!(encode_subject("alice"), "alice");
        assert_eq!(decode_subject("~zz"), None);
        assert_eq!(decode_subject("~ff"), None);
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let r = Revocation {
            until_wall_ms: 5,
            reason: "leak".into(),
        };
        assert_eq!(decode::<Revocation>(&encode(&r)), Some(r));
        assert_eq!(
            decode::<Revocation>(r#"{"until_wall_ms":5,"reason":"x","extra":1}"#),
            None
        );
        let b: Option<Binding> = decode(r#"{"token":"t","address":"198.18.0.1"}"#);
        assert_eq!(b.unwrap().address, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(decode::<Binding>(r#"{"token":"t","address":"nope"}"#), None);
    }
}
