//! The config loader (`tollgate::config::Config::parse`) on arbitrary text: an error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tollgate::config::Config::parse(text, "fuzz.toml");
    }
});
