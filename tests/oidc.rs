//! Identity providers as operators run them (#13), against a real OpenID Provider.

use tollgate_tests::{
    lab::Lab,
    oidc::{IdpClient, OidcLab, POOL_A, ProviderSpec, claims_of, header_of},
};

#[test]
fn lab_smoke() {
    let spec = ProviderSpec::new(
        "RS256",
        vec![IdpClient::new(
            "gold-svc",
            serde_json::json!({"groups": ["gold"]}),
        )],
    );
    let o = OidcLab::new(Lab::new(), spec);
    let t = o.token("gold-svc", POOL_A);
    eprintln!("{} {}", header_of(&t), claims_of(&t));
    let out = o
        .lab
        .server
        .command("curl")
        .args(["-sS", "--cacert"])
        .arg(&o.ca.pem)
        .arg(format!("{}/jwks", o.issuer))
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{:?} {}", o.counts(), o.rotate());
}
