//! Benchmark-only programs for `cargo xtask bench` (tests/bench_xdp.rs). The agent never
//! loads them; their two tiny maps are created with the object and stay empty.
//!
//! The spread rotator: non-live BPF_PROG_TEST_RUN copies the frame into the kernel once and
//! runs the program `repeat` times on that same buffer, so a program that rewrites the frame
//! sees its own last write on the next run. The rotator keeps the index of the current source
//! in the frame itself (the low 32 bits of the IPv6 source address), steps it with a stride
//! coprime to the table size, and tail-calls the program under test: a million repeats then
//! visit a million different bound addresses, so every lookup misses the cache as a real
//! flood's would, instead of hitting one hot key.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};

/// The program the rotator hands each frame to (slot 0), set by the bench before each run.
#[map]
static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The rotation: slot 0 the number of sources N, slot 1 the stride P (P < N, coprime to N;
/// N = 1 with P = 0 keeps one source).
#[map]
static BENCH_SPREAD: Array<u32> = Array::with_max_entries(2, 0);

/// Ethernet (14) + the IPv6 header's offset of the source (8) + 12: the source's low word.
const SRC_LOW_WORD: usize = 14 + 8 + 12;

/// Steps the frame's IPv6 source to the next of N addresses, then runs the program under
/// test on it. Aborts when the frame is too short or the slot is empty (the bench checks
/// every run's verdicts through the counters, so an abort cannot pass unnoticed).
#[xdp]
pub fn bench_rotate(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + SRC_LOW_WORD + 4 > end {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(n), Some(p)) = (BENCH_SPREAD.get(0), BENCH_SPREAD.get(1)) else {
        return xdp_action::XDP_ABORTED;
    };
    let (n, p) = (*n, *p);
    let word = (start + SRC_LOW_WORD) as *mut [u8; 4];
    // SAFETY: the four bytes lie inside the frame (checked above); the frame is writable.
    unsafe {
        let idx = u32::from_be_bytes(core::ptr::read_unaligned(word));
        // idx < n and p < n, so one subtraction brings the sum back under n.
        let mut next = idx.wrapping_add(p);
        if next >= n {
            next = next.wrapping_sub(n);
        }
        core::ptr::write_unaligned(word, next.to_be_bytes());
        BENCH_NEXT.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

/// Drops everything: the live-frames bench's floor for a flood (the cheapest drop XDP has).
#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}
