use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use tollgate_common::{
    Counter, REASON_COUNT, Reason,
    parse::{Frame, PacketView, parse},
};

/// Per-CPU packets and bytes per verdict reason. Name: `map_names::REASON_COUNTERS`.
#[map]
static REASON_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// The frame between `data` and `data_end`. Every load is bounds-checked against `data_end`
/// right before the access, in the shape the verifier tracks (packet pointer + constant size
/// compared with `data_end`).
struct XdpFrame {
    start: usize,
    end: usize,
}

impl PacketView for XdpFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: [p, p + N) lies inside the frame (checked above); the read is unaligned
        // because headers after VLAN tags or IP options have no alignment guarantee.
        Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    }
}

#[xdp]
pub fn tollgate(ctx: XdpContext) -> u32 {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let reason = match parse(&frame) {
        Ok(Frame::NotIp(_)) => Reason::NotIp,
        Ok(Frame::Ip(p)) if p.fragment == tollgate_common::parse::Fragment::Later => {
            Reason::NonFirstFragment
        }
        Ok(Frame::Ip(_)) => Reason::Unprotected,
        Err(r) => r,
    };
    count(reason, frame.len() as u64);
    reason.verdict() as u32
}

#[inline(always)]
fn count(reason: Reason, bytes: u64) {
    if let Some(c) = REASON_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and XDP runs with preemption
        // disabled, so the plain read-modify-write cannot race.
        unsafe { (*c).add(bytes) };
    }
}

/// Passes everything: the baseline the benchmark compares the real program against.
#[xdp]
pub fn tollgate_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier refuses code paths that could panic
    // only if they are not statically removed, and there is no unwinding in BPF.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
