//! The XDP object built by `build.rs`, embedded in the binary.

/// The ELF object holding the `tollgate` and `tollgate_noop` XDP programs and their maps.
pub fn bytes() -> &'static [u8] {
    // Aligned so that aya can parse the ELF in place.
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate"))
}
