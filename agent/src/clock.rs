//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps monotonic nanoseconds to Unix-epoch nanoseconds with one offset measured at start.
///
/// The offset is taken between two monotonic reads that bracket one realtime read, so it is
/// off by at most half the bracket; an NTP step after start is not followed (spans keep their
/// relative order and durations, which is what a trace needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    /// Measures the offset now.
    pub fn measure() -> Self {
        let before = monotonic_ns();
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as i128;
        let after = monotonic_ns();
        let mono = (i128::from(before) + i128::from(after)) / 2;
        Self::from_pair(mono as u64, real)
    }

    /// From one simultaneous pair of readings.
    pub fn from_pair(monotonic_ns: u64, unix_ns: i128) -> Self {
        Self {
            offset_ns: unix_ns - i128::from(monotonic_ns),
        }
    }

    /// Unix-epoch nanoseconds of a kernel monotonic timestamp (0 if it would precede 1970).
    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        let v = i128::from(monotonic_ns) + self.offset_ns;
        v.clamp(0, i128::from(u64::MAX)) as u64
    }

    pub fn to_system_time(&self, monotonic_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.to_unix_ns(monotonic_ns))
    }
}

/// CLOCK_MONOTONIC now, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_offset_at_nanosecond_precision() {
        let clock = WallClock::from_pair(5_000_000_000, 1_700_000_000_000_000_000);
        assert_eq!(clock.to_unix_ns(5_000_000_000), 1_700_000_000_000_000_000);
        assert_eq!(clock.to_unix_ns(5_000_000_123), 1_700_000_000_000_000_123);
        assert_eq!(clock.to_unix_ns(4_000_000_000), 1_699_999_999_000_000_000);
    }

    #[test]
    fn clamps_instead_of_wrapping() {
        let clock = WallClock::from_pair(10, 5);
        assert_eq!(clock.to_unix_ns(0), 0);
    }

    #[test]
    fn measured_clock_agrees_with_system_time() {
        let clock = WallClock::measure();
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let got = i128::from(clock.to_unix_ns(monotonic_ns()));
        assert!(
            (got - now_unix).abs() < 50_000_000,
            "off by {} ns",
            got - now_unix
        );
    }
}
