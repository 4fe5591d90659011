//! The reading end of the kernel's `BPF_MAP_TYPE_RINGBUF`, mapped once.
//!
//! The kernel maps a ring's data pages twice in a row so that a record that runs past the end
//! reads on contiguously, and readers usually map both copies (aya and libbpf do): every data
//! page is then resident twice in the reader, 8 MiB of RSS for the default 4 MiB ring. Here the
//! data is mapped once and the rare record that wraps (one per pass over the ring at most) is
//! copied out of its two parts.
//!
//! Publishing the consumer position after each record (as aya does) is a store to the page
//! every producer reads before it writes a record: its cache line would go back and forth
//! between the agent's CPU and the traced programs' for each record. The position is
//! published every [`PUBLISH_EVERY`] bytes, and whenever the reader stops; producers see the
//! ring that much fuller, a sliver of it.
//!
//! Protocol (kernel/bpf/ringbuf.c): a consumer page (read-write, `consumer_pos`), then a
//! producer page (`producer_pos`), then the data; each record is an 8-byte header (length,
//! `BPF_RINGBUF_BUSY_BIT` while the producer writes it, `BPF_RINGBUF_DISCARD_BIT`) and its
//! bytes, rounded up to 8.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use aya::maps::{MapData, MapType};

const HEADER: usize = 8;
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
/// Bytes read before the consumer position is published (besides at every stop).
const PUBLISH_EVERY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("the map is not a ring buffer")]
    NotARing,
    #[error("ring size {0} is not a power-of-two multiple of the page size")]
    Size(usize),
    #[error("mapping the ring: {0}")]
    Map(std::io::Error),
    #[error("reading the ring's size: {0}")]
    Info(aya::maps::MapError),
    #[error("watching the rings (epoll): {0}")]
    Epoll(std::io::Error),
}

/// One shared mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: i32, offset: usize) -> Result<Self, RingError> {
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel checks the offset
        // and length against the ring (remap_vmalloc_range) and fails otherwise.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RingError::Map(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(RingError::Map(std::io::Error::other("null")))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and is not used after.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The reader of one ring; one thread reads it.
pub struct Ring {
    consumer: Mapping,
    /// The producer page, then the data (`size` bytes, once).
    producer: Mapping,
    size: usize,
    page: usize,
    /// Where the next record starts.
    pos: usize,
    /// The length of the record last handed out: skipped at the next read, once it is done
    /// with.
    held: usize,
    /// `consumer_pos` as last published.
    published: usize,
    /// The producer position last read: records before it are written or being written.
    producer_pos: usize,
    /// The next record as `locate` found it, until it is read.
    ahead: Option<(usize, usize, usize)>,
    /// A wrapped record, put together.
    wrapped: Vec<u8>,
    /// A header made no sense: reading stopped (said once; the kernel counts what it cannot
    /// write from then on as lost).
    stopped: bool,
    map: MapData,
}

// SAFETY: the mappings belong to the ring alone and are only read or written through it; the
// kernel side is synchronised by the acquire and release accesses below.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring `map`, of the size the kernel says it has.
    pub fn new(map: MapData) -> Result<Self, RingError> {
        let info = map.info().map_err(RingError::Info)?;
        if !matches!(info.map_type(), Ok(MapType::RingBuf)) {
            return Err(RingError::NotARing);
        }
        let size = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if !size.is_power_of_two() || size < page {
            return Err(RingError::Size(size));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page)?;
        let mut ring = Self {
            consumer,
            producer,
            size,
            page,
            pos: 0,
            held: 0,
            published: 0,
            producer_pos: 0,
            ahead: None,
            wrapped: Vec::new(),
            stopped: false,
            map,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        ring.producer_pos = ring.pos;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the kernel's `unsigned long consumer_pos`,
        // page-aligned; the kernel reads it with acquire loads.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn load_producer_pos(&self) -> usize {
        // SAFETY: as for `consumer_pos`; the kernel stores `producer_pos` with release.
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    fn data(&self) -> &[u8] {
        // SAFETY: the data follows the producer page in the mapping and is `size` bytes long;
        // the bytes of a record are read only after its header was seen committed (acquire).
        unsafe { std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(self.page), self.size) }
    }

    fn header(&self, offset: usize) -> u32 {
        // SAFETY: offset is 8-aligned and below `size`; the kernel commits a header with an
        // atomic exchange.
        let header = unsafe {
            &*self
                .producer
                .ptr
                .as_ptr()
                .add(self.page + offset)
                .cast::<AtomicU32>()
        };
        header.load(Ordering::Acquire)
    }

    /// Publishes how far the records were read: the kernel may write over them now.
    pub fn publish(&mut self) {
        self.pos += std::mem::take(&mut self.held);
        if self.published != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// Takes in the records written so far: `read` and `peek_u64` see no later ones. The
    /// producer position is read once per pass over the rings, not at each record: it is a
    /// line the programs write for every record.
    pub fn refresh(&mut self) {
        self.producer_pos = self.load_producer_pos();
    }

    /// The next committed record, if any. The record before it is done with when this is
    /// called again.
    pub fn read(&mut self) -> Option<&[u8]> {
        let (start, len, step) = self.locate()?;
        self.held = step;
        self.ahead = None;
        if start + len <= self.size {
            return Some(&self.data()[start..start + len]);
        }
        let first = self.size - start;
        let mut wrapped = std::mem::take(&mut self.wrapped);
        wrapped.clear();
        wrapped.extend_from_slice(&self.data()[start..]);
        wrapped.extend_from_slice(&self.data()[..len - first]);
        self.wrapped = wrapped;
        Some(&self.wrapped)
    }

    /// The first 8 bytes of the next committed record, as a number (an event's timestamp;
    /// 0 for a shorter record), without taking it: `read` returns that record next.
    pub fn peek_u64(&mut self) -> Option<u64> {
        let (start, len, _) = self.locate()?;
        if len < 8 {
            return Some(0);
        }
        // A record starts 8-aligned and the ring's size is a multiple of 8: its first 8 bytes
        // never run past the end.
        let bytes: [u8; 8] = self.data()[start..start + 8].try_into().ok()?;
        Some(u64::from_ne_bytes(bytes))
    }

    /// Where the next committed record's bytes start in the data, its length and the step to
    /// the one after it. The record handed out last is done with; calling this again before
    /// `read` finds the same record.
    fn locate(&mut self) -> Option<(usize, usize, usize)> {
        if self.stopped {
            return None;
        }
        if let Some(found) = self.ahead {
            // Peeked at and not read yet (the merge peeks at every ring for each record).
            return Some(found);
        }
        self.pos += std::mem::take(&mut self.held);
        if self.pos - self.published >= PUBLISH_EVERY {
            self.publish();
        }
        loop {
            if self.pos == self.producer_pos {
                // Caught up with the last `refresh`: let the producers see all the room there
                // is. A record written from here on is read after the next one (the programs
                // decide their wake-ups themselves, and the reading loop reads once more after
                // it clears its readiness).
                self.publish();
                return None;
            }
            let mask = self.size - 1;
            let offset = self.pos & mask;
            let header = self.header(offset);
            if header & BUSY != 0 {
                // Being written; a later read sees it.
                self.publish();
                return None;
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            let step = (HEADER + len).next_multiple_of(8);
            if len > self.size - HEADER {
                // Not a record this ring could hold: the reader is lost. Never seen; stop
                // reading rather than hand out garbage.
                log::error!(
                    "ring buffer: a record of {len} bytes at {offset} cannot be: stopped reading events"
                );
                self.stopped = true;
                return None;
            }
            if header & DISCARD != 0 {
                self.pos += step;
                continue;
            }
            let found = ((offset + HEADER) & mask, len, step);
            self.ahead = Some(found);
            return Some(found);
        }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

/// The rings of all CPUs, read as one stream, and one descriptor that is readable when any of
/// them has been woken (an epoll set of their descriptors).
///
/// Each CPU's ring holds its records in the order that CPU wrote them; a thread that moved to
/// another CPU between two calls has the first in one ring and the second in another. The
/// records are handed out merged by their timestamps (each ring's next record, the earliest
/// first), and a read stops at records stamped after it started (`horizon`). A thread's next
/// call is stamped after its last one was written, so when the later one is handed out the
/// earlier one was already in its ring, and its timestamp is lower: a thread's records come
/// in order. Across threads the order is the timestamps', within the few records a CPU wrote
/// out of order (a sending call is stamped at its start and written at its end).
pub struct Rings {
    rings: Vec<Ring>,
    epoll: std::os::fd::OwnedFd,
}

impl Rings {
    pub fn new(rings: Vec<Ring>) -> Result<Self, RingError> {
        use std::os::fd::FromRawFd;
        // SAFETY: no preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(RingError::Epoll(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        for ring in &rings {
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            // SAFETY: both descriptors are open; the event is read during the call.
            if unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    ring.as_raw_fd(),
                    &mut event,
                )
            } < 0
            {
                return Err(RingError::Epoll(std::io::Error::last_os_error()));
            }
        }
        Ok(Self { rings, epoll })
    }

    /// How many rings there are (one per online CPU).
    pub fn count(&self) -> usize {
        self.rings.len()
    }

    /// Hands at most `max` records to `f`, merged as described above; true when none is left
    /// that was written before the call.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> bool {
        let horizon = monotonic_ns();
        for ring in &mut self.rings {
            ring.refresh();
        }
        let mut caught_up = false;
        for _ in 0..max {
            let mut next: Option<(usize, u64)> = None;
            for (i, ring) in self.rings.iter_mut().enumerate() {
                if let Some(ts) = ring.peek_u64()
                    && ts < horizon
                    && next.is_none_or(|(_, best)| ts < best)
                {
                    next = Some((i, ts));
                }
            }
            let Some((i, _)) = next else {
                caught_up = true;
                break;
            };
            if let Some(record) = self.rings[i].read() {
                f(record);
            }
        }
        for ring in &mut self.rings {
            ring.publish();
        }
        caught_up
    }
}

impl AsRawFd for Rings {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the programs' `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
