//! The control socket's request decoder: serde_json into `Request`, as the control server
//! decodes a line. Whatever decodes must encode and decode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::control::protocol::{MAX_REQUEST_BYTES, Request};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_REQUEST_BYTES {
        return;
    }
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&req).expect("a request encodes");
        let back: Request = serde_json::from_slice(&again).expect("its encoding decodes");
        assert_eq!(back, req);
    }
});
