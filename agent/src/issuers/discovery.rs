//! The OpenID Provider's configuration document (OpenID Connect Discovery 1.0 §3, §4.3): its
//! `issuer` must be exactly the configured one (a document naming another issuer is not this
//! issuer's, however it was reached), and its `jwks_uri` must be HTTPS.

use serde::Deserialize;

use super::{
    Outcome,
    fetch::{FetchError, fail},
    source::HttpsUrl,
};

#[derive(Deserialize)]
struct Document {
    issuer: String,
    jwks_uri: String,
}

/// The `jwks_uri` of a discovery document fetched for `issuer`.
pub fn jwks_uri(body: &[u8], issuer: &str) -> Result<String, FetchError> {
    let doc: Document = serde_json::from_slice(body).map_err(|e| {
        fail(
            Outcome::NotJson,
            format!("the discovery document is not a JSON object with `issuer` and `jwks_uri` strings: {e}"),
        )
    })?;
    if doc.issuer != issuer {
        return Err(fail(
            Outcome::IssuerMismatch,
            format!(
                "the discovery document's issuer {:?} is not the configured {issuer:?} (compared exactly)",
                doc.issuer
            ),
        ));
    }
    HttpsUrl::parse(&doc.jwks_uri).map_err(|e| {
        fail(
            Outcome::InsecureJwksUri,
            format!("the discovery document's jwks_uri: {e}"),
        )
    })?;
    Ok(doc.jwks_uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://idp.example/realms/x";

    fn doc(issuer: &str, jwks_uri: &str) -> Vec<u8> {
        serde_json::json!({ "issuer": issuer, "jwks_uri": jwks_uri, "token_endpoint": "x" })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_jwks_uri_of_the_configured_issuer_is_taken() {
        let uri = "https://idp.example/realms/x/certs";
        assert_eq!(jwks_uri(&doc(ISS, uri), ISS).unwrap(), uri);
    }

    #[test]
    fn another_issuer_an_insecure_uri_or_no_json_is_refused_with_its_outcome() {
        let outcome = |body: &[u8]| jwks_uri(body, ISS).unwrap_err().outcome;
        let certs = "https://idp.example/certs";
        assert_eq!(
            outcome(&doc(&format!("{ISS}/"), certs)),
            Outcome::IssuerMismatch
        );
        assert_eq!(
            outcome(&doc("https://evil.example", certs)),
            Outcome::IssuerMismatch
        );
        assert_eq!(
            outcome(&doc(ISS, "http://idp.example/certs")),
            Outcome::InsecureJwksUri
        );
        assert_eq!(outcome(&doc(ISS, "/certs")), Outcome::InsecureJwksUri);
        assert_eq!(outcome(b"<html>"), Outcome::NotJson);
        assert_eq!(
            outcome(br#"{"issuer":"https://idp.example/realms/x"}"#),
            Outcome::NotJson
        );
    }
}
