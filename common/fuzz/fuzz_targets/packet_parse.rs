//! The packet parser (the host build of `tollgate_common::parse::parse`, the code the XDP
//! program runs) must never panic and must only report what lies inside the frame: a parsed
//! packet's transport offset is within the frame, its VLAN count within the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_common::parse::{Frame, MAX_VLAN_TAGS, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Ip(p)) = parse(data) {
        assert!(usize::from(p.vlan_tags) <= MAX_VLAN_TAGS);
        assert!(usize::from(p.l4_offset) <= data.len());
    }
});
