//! Loading the kernel programs, attaching them, and reading their events.

pub mod btf;
pub mod event;
pub mod layout;
pub mod probes;
pub mod ring;

use std::{future::Future, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, MapData, PerCpuArray},
    programs::TracePoint,
};
use tokio::io::{Interest, unix::AsyncFd};
use wirespan_common::{EventHeader, MAX_CAPTURE, Settings, lost, names, pid_filter};

pub use event::{DecodeError, Direction, EventKind, SocketEvent};
use layout::{KernelBtf, LayoutError};
use probes::{PROBES, Probe};
use ring::{Ring, RingError, Rings};

/// The kernel object built from `ebpf/` by build.rs. Empty when built with AYA_BUILD_SKIP.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wirespan"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this wirespan binary was built without its kernel programs (AYA_BUILD_SKIP); rebuild without it"
    )]
    NoObject,
    #[error(
        "kernel layout could not be derived, refusing to read this kernel's memory blindly: {0}"
    )]
    Layout(#[from] LayoutError),
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("nothing useful attached ({reason}); first failure: {first}")]
    NothingAttached { reason: String, first: String },
    #[error("capture-bytes must be between 0 and {max}, got {got}")]
    CaptureBytes { got: u32, max: usize },
    #[error("ring buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("ring buffer: {0}")]
    Ring(#[from] RingError),
}

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bytes copied per call (the rest is counted in the event's length).
    pub capture_bytes: u32,
    /// When non-empty, only these processes are traced.
    pub pids: Vec<u32>,
    /// Never traced (wirespan itself is always added).
    pub exclude_pids: Vec<u32>,
    /// Ring buffer bytes in all, split among the online CPUs' rings (see `ring_share`).
    pub ring_bytes: u32,
    /// Attach the programs but leave them inert (they return at once): the cost of the
    /// tracepoints alone, the benchmark's floor.
    pub inert: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            capture_bytes: wirespan_common::DEFAULT_CAPTURE,
            pids: Vec::new(),
            exclude_pids: Vec::new(),
            ring_bytes: 16 * 1024 * 1024,
            inert: false,
        }
    }
}

/// Receives what the capture loop reads.
pub trait EventSink {
    /// One ring buffer record, decoded (or why it could not be).
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>);
    /// The ring buffer has been drained; `lost` holds the kernel's loss counters so far.
    fn idle(&mut self, _lost: &Lost) {}
}

/// A probe that did not attach, and why.
#[derive(Clone, Debug)]
pub struct AttachFailure {
    pub program: &'static str,
    pub reason: String,
}

/// Kernel-side loss counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    pub ringbuf_full: u64,
    pub read_failed: u64,
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Capture {
    // Holds the programs and their links: dropping it detaches.
    _ebpf: Ebpf,
    events: Rings,
    lost: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pid_filter: Option<PidFilter>,
    pub attached: Vec<Probe>,
    pub failures: Vec<AttachFailure>,
}

impl Capture {
    /// Derives the kernel layout, loads the programs, fills the pid filter and attaches every
    /// probe it can. Fails only when what attached cannot see traffic.
    pub fn start(config: &CaptureConfig) -> Result<Self, CaptureError> {
        if EBPF_OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        if config.capture_bytes as usize > MAX_CAPTURE {
            return Err(CaptureError::CaptureBytes {
                got: config.capture_bytes,
                max: MAX_CAPTURE,
            });
        }
        let tracefs = layout::tracefs()?;
        let btf = KernelBtf::open(Path::new(KernelBtf::DEFAULT_PATH))?;
        let mut kernel_layout = layout::derive(&tracefs, &btf)?;
        // The parsed kernel BTF is tens of MiB; the layout is all the programs need from it.
        drop(btf);
        if config.inert {
            kernel_layout.valid = 0;
        }
        let cpus = aya::util::online_cpus().map_err(cpu_list_error)?;
        let possible = aya::util::nr_cpus().map_err(cpu_list_error)?;
        let ring_bytes = ring_share(config.ring_bytes, cpus.len());
        let settings = Settings {
            capture_bytes: config.capture_bytes,
            filter_mode: if config.pids.is_empty() {
                pid_filter::ALL_EXCEPT_IGNORED
            } else {
                pid_filter::ONLY_LISTED
            },
            wake_bytes: wake_bytes(ring_bytes),
        };
        // No kernel BTF for the loader: the programs read kernel structures at the offsets in
        // LAYOUT (derived above), not through CO-RE relocations, and parsing vmlinux BTF a
        // second time was most of the agent's start-up memory peak.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            // STAMPS is a task-local storage map, which aya creates but has no type for.
            .allow_unsupported_maps()
            .override_global(names::LAYOUT, &kernel_layout, true)
            .override_global(names::SETTINGS, &settings, true)
            .map_max_entries(names::EVENTS, possible as u32)
            .load(EBPF_OBJECT)?;
        // Before any program is attached: a record finds its CPU's ring from the start.
        let events = Rings::new(create_rings(&mut ebpf, &cpus, ring_bytes)?)?;
        log::debug!(
            "{} ring buffers of {} KiB, one per online CPU",
            events.count(),
            ring_bytes / 1024
        );

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("kernel-side logging unavailable: {e}");
                None
            }
        };

        {
            let map = ebpf.map_mut(names::PID_FILTER).ok_or(CaptureError::Map {
                name: names::PID_FILTER,
                source: aya::maps::MapError::InvalidName {
                    name: names::PID_FILTER.into(),
                },
            })?;
            let mut filter: HashMap<&mut MapData, u32, u32> =
                HashMap::try_from(map).map_err(|source| CaptureError::Map {
                    name: names::PID_FILTER,
                    source,
                })?;
            let me = std::process::id();
            for (pid, v) in config
                .pids
                .iter()
                .map(|&p| (p, pid_filter::TRACE))
                .chain(config.exclude_pids.iter().map(|&p| (p, pid_filter::IGNORE)))
                .chain([(me, pid_filter::IGNORE)])
            {
                filter
                    .insert(pid, v, 0)
                    .map_err(|source| CaptureError::Map {
                        name: names::PID_FILTER,
                        source,
                    })?;
            }
        }

        let mut attached = Vec::new();
        let mut failures = Vec::new();
        for probe in PROBES {
            // The exit program first: an enter without its exit would only write stamps no exit
            // takes.
            let mut programs = vec![];
            if let Some(exit) = probe.exit {
                programs.push((exit, format!("sys_exit_{}", probe.syscall)));
            }
            if let Some(enter) = probe.enter {
                programs.push((enter, format!("sys_enter_{}", probe.syscall)));
            }
            let mut ok = true;
            for (program, tracepoint) in programs {
                if let Err(reason) = attach(&mut ebpf, program, &tracepoint) {
                    log::warn!("probe {program} on syscalls:{tracepoint} not attached: {reason}");
                    failures.push(AttachFailure { program, reason });
                    ok = false;
                    break;
                }
            }
            if ok {
                attached.push(*probe);
            }
        }
        if let Err(reason) = probes::useful(&attached) {
            let first = failures
                .first()
                .map(|f| format!("{}: {}", f.program, f.reason))
                .unwrap_or_else(|| "none".into());
            return Err(CaptureError::NothingAttached { reason, first });
        }

        let lost = take_map(&mut ebpf, names::LOST)?;
        let pid_filter = take_map(&mut ebpf, names::PID_FILTER)
            .map(|map| PidFilter { map })
            .ok();
        Ok(Self {
            _ebpf: ebpf,
            events,
            lost,
            logger,
            pid_filter,
            attached,
            failures,
        })
    }

    /// The kernel's pid filter, for the process selector (once).
    pub fn take_pid_filter(&mut self) -> Option<PidFilter> {
        self.pid_filter.take()
    }

    /// Kernel-side losses so far.
    pub fn lost(&self) -> Lost {
        read_lost(&self.lost)
    }

    /// Reads events until `shutdown` completes, handing each decoded record to `sink`.
    pub async fn run(
        self,
        sink: &mut impl EventSink,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Lost, CaptureError> {
        let Self {
            _ebpf,
            events,
            lost,
            logger,
            ..
        } = self;
        // SAFETY: the registered descriptor (the rings' epoll set) is owned by the `Rings` the
        // AsyncFd takes ownership of, so it stays open for as long as it is registered.
        let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| CaptureError::Io(e.into()))?;
        let mut logger = match logger {
            Some(l) => Some(
                // SAFETY: as above; the logger owns its ring buffer's descriptor.
                unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                    .map_err(|e| CaptureError::Io(e.into()))?,
            ),
            None => None,
        };
        tokio::pin!(shutdown);
        // Sinks also get a regular idle call, so time-based work (deferred links, flushes)
        // happens when traffic stops.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Records are read in batches: when the kernel writes faster than the agent reads,
        // the rings never empty, and a drain that waited for that would never let the loop
        // see a stop signal or a tick. `behind` says the last batch left records in them.
        let mut behind = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Also a safety net: no record waits in a ring longer than a tick.
                    behind = !drain(events.get_mut(), sink);
                    sink.idle(&read_lost(&lost));
                }
                () = tokio::task::yield_now(), if behind => {
                    behind = !drain(events.get_mut(), sink);
                }
                guard = events.readable_mut(), if !behind => {
                    let mut guard = guard?;
                    if drain(guard.get_inner_mut(), sink) {
                        guard.clear_ready();
                        // The kernel wakes the reader only for a record written when the
                        // reader had caught up: one written after the drain above and before
                        // clear_ready had its wake-up cleared, and no later record would wake
                        // us either. Read once more after clearing.
                        behind = !drain(guard.get_inner_mut(), sink);
                    } else {
                        behind = true;
                    }
                    sink.idle(&read_lost(&lost));
                }
                guard = async {
                    match logger.as_mut() {
                        Some(l) => l.readable_mut().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                () = &mut shutdown => break,
            }
        }
        // Read what is in the rings so nothing accepted is dropped at shutdown. The programs
        // are still attached and under load the rings never empty: reading stops after a
        // second (full default rings take a fraction of that), within the 5 s a node agent
        // gets to stop.
        let stop_reading = std::time::Instant::now() + SHUTDOWN_DRAIN;
        while !drain(events.get_mut(), sink) && std::time::Instant::now() < stop_reading {}
        let total = read_lost(&lost);
        sink.idle(&total);
        Ok(total)
    }
}

/// Records read before the loop looks at its other inputs again.
const BATCH: usize = 4096;
/// At shutdown, how long the rings are read at most.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands up to `BATCH` records in the rings to the sink; true when they are empty.
fn drain(rings: &mut Rings, sink: &mut impl EventSink) -> bool {
    rings.drain(BATCH, |record| sink.event(SocketEvent::decode(record)))
}

/// The kernel's per-process filter: a process written in as ignored costs one map lookup per
/// socket call and sends nothing.
pub struct PidFilter {
    map: HashMap<MapData, u32, u32>,
}

impl PidFilter {
    /// Stops tracing a process in the kernel. False when the map is full.
    pub fn ignore(&mut self, pid: u32) -> bool {
        match self.map.insert(pid, pid_filter::IGNORE, 0) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("pid filter: {pid} not written: {e}");
                false
            }
        }
    }

    /// Removes a process's entry (it exited).
    pub fn forget(&mut self, pid: u32) {
        let _ = self.map.remove(&pid);
    }
}

/// An unreadable /sys/devices/system/cpu list, with its path.
fn cpu_list_error((path, e): (&'static str, std::io::Error)) -> CaptureError {
    CaptureError::Io(std::io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Each CPU's ring size: an equal share of `total` (a power of two, so the share is one when
/// the number of CPUs is), at least `MIN_RING`.
fn ring_share(total: u32, cpus: usize) -> u32 {
    let share = u64::from(total) / cpus.max(1) as u64;
    let share = if share.is_power_of_two() {
        share
    } else {
        // The largest power of two below it.
        1 << (63 - share.max(1).leading_zeros())
    };
    share.max(u64::from(MIN_RING)) as u32
}

/// The smallest ring a CPU gets: room for a large request head's records (1 + `MAX_MORE`
/// records of up to `MAX_CAPTURE` bytes) twice over.
const MIN_RING: u32 = 256 * 1024;

/// Creates a ring of `bytes` for each online CPU and puts it in the programs' `EVENTS` at the
/// CPU's index.
fn create_rings(ebpf: &mut Ebpf, cpus: &[u32], bytes: u32) -> Result<Vec<Ring>, CaptureError> {
    let map_error = |source| CaptureError::Map {
        name: names::EVENTS,
        source,
    };
    let outer = ebpf.map_mut(names::EVENTS).ok_or(CaptureError::Map {
        name: names::EVENTS,
        source: aya::maps::MapError::InvalidName {
            name: names::EVENTS.into(),
        },
    })?;
    let mut outer: ArrayOfMaps<&mut MapData, MapData> =
        ArrayOfMaps::try_from(outer).map_err(map_error)?;
    let mut rings = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let definition = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
            0,
            0,
            bytes,
            0,
        );
        let ring =
            MapData::create(definition, &format!("EVENTS_{cpu}"), None).map_err(map_error)?;
        outer.set(cpu, &ring, 0).map_err(map_error)?;
        rings.push(Ring::new(ring)?);
    }
    Ok(rings)
}

/// Bytes of records a CPU writes into its ring of `ring_bytes` between the wake-ups of the
/// agent it forces (`Settings::wake_bytes`): half of it, so that what it wrote since its last
/// wake-up does not fill it; at least one largest record.
fn wake_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 2).max((size_of::<EventHeader>() + MAX_CAPTURE) as u32)
}

fn read_lost(map: &PerCpuArray<MapData, u64>) -> Lost {
    let sum = |i: u32| {
        map.get(&i, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    };
    Lost {
        ringbuf_full: sum(lost::RINGBUF_FULL),
        read_failed: sum(lost::READ_FAILED),
    }
}

fn attach(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| "program missing from the object".to_string())?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| verifier_reason(&e))?;
    prog.attach("syscalls", tracepoint)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The verifier's last lines say why; the whole log is at debug level.
fn verifier_reason(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    log::debug!("{text}");
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(take(ebpf, name)?).map_err(|source| CaptureError::Map { name, source })
}

/// The object's map `name`, taken out of the loader.
fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cpu_wakes_the_agent_when_half_its_ring_is_written() {
        assert_eq!(wake_bytes(2 << 20), 1 << 20);
        // A tiny ring: never less than one largest record.
        let largest = (size_of::<EventHeader>() + MAX_CAPTURE) as u32;
        assert_eq!(wake_bytes(4096), largest);
    }

    #[test]
    fn the_ring_memory_is_split_among_the_cpus_in_powers_of_two() {
        assert_eq!(ring_share(4 << 20, 2), 2 << 20);
        assert_eq!(ring_share(4 << 20, 1), 4 << 20);
        // 4 MiB over 3 CPUs: 1 MiB each, the power of two below 1.33 MiB.
        assert_eq!(ring_share(4 << 20, 3), 1 << 20);
        assert_eq!(ring_share(64 << 20, 6), 8 << 20);
        // Many CPUs: each still gets room for a large request head.
        assert_eq!(ring_share(4 << 20, 64), MIN_RING);
        assert_eq!(ring_share(4 << 20, 0), 4 << 20);
    }
}
