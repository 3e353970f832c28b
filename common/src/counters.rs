//! Value layout of the per-CPU counter maps.

/// Packets and bytes, one slot per CPU in the kernel; userspace sums the slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the whole frame as XDP sees it (Ethernet header included, no FCS).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

impl Counter {
    /// Adds one packet of `bytes` bytes.
    #[inline(always)]
    pub fn add(&mut self, bytes: u64) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(bytes);
    }

    /// Sums per-CPU slots (or any other set of counters).
    pub fn sum<'a>(slots: impl IntoIterator<Item = &'a Counter>) -> Counter {
        slots
            .into_iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets.wrapping_add(c.packets),
                bytes: acc.bytes.wrapping_add(c.bytes),
            })
    }

    /// What was counted since `earlier` (a reading of the same counter); wraps like the
    /// kernel's counters do.
    pub fn delta(&self, earlier: &Counter) -> Counter {
        Counter {
            packets: self.packets.wrapping_sub(earlier.packets),
            bytes: self.bytes.wrapping_sub(earlier.bytes),
        }
    }

    /// Adds `other` in (a delta into a window's total).
    pub fn accumulate(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

// SAFETY: `Counter` is `repr(C)`, `Copy`, made of two `u64`s with no padding (size asserted
// above), so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_sum() {
        let mut a = Counter::default();
        a.add(60);
        a.add(1514);
        let b = Counter {
            packets: 3,
            bytes: 100,
        };
        assert_eq!(
            Counter::sum([&a, &b]),
            Counter {
                packets: 5,
                bytes: 1674
            }
        );
    }

    #[test]
    fn delta_and_accumulate() {
        let before = Counter {
            packets: u64::MAX,
            bytes: 10,
        };
        let after = Counter {
            packets: 1,
            bytes: 30,
        };
        let d = after.delta(&before);
        assert_eq!(
            d,
            Counter {
                packets: 2,
                bytes: 20
            }
        );
        let mut total = before;
        total.accumulate(&d);
        assert_eq!(total, after);
    }

    #[test]
    fn wraps_instead_of_panicking() {
        let mut a = Counter {
            packets: u64::MAX,
            bytes: u64::MAX,
        };
        a.add(2);
        assert_eq!(
            a,
            Counter {
                packets: 0,
                bytes: 1
            }
        );
    }
}
