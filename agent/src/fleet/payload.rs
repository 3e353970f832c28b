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
