//! Which processes are traced.
//!
//! The agent decides for a process when its first event arrives. A process that is not
//! selected is written into the kernel's pid filter as ignored, so its calls stop costing
//! anything; until then its events are dropped here. Decisions that depend on facts that can
//! change (the ports a process listens on, a pod the watcher has not reported yet) are taken
//! again at most once a second. Processes that exit are forgotten, in the kernel too.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustc_hash::FxHashMap;

use crate::{
    capture::{EventKind, PidFilter, SocketEvent},
    config::Selection,
    identity::{self, Pod, Pods},
};

/// A TCP port or an inclusive range of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let bad = || anyhow::anyhow!("`{s}` is not a port or a range of ports like 8000-8999");
        let (a, b) = match s.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let first: u16 = a.parse().map_err(|_| bad())?;
        let last: u16 = b.parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(Self { first, last })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// Glob match: `*` any run of characters but `/`, `**` any run, `?` one character but `/`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = &p[2..];
                (0..=t.len()).any(|i| go(rest, &t[i..]))
            }
            Some(b'*') => {
                let rest = &p[1..];
                for i in 0..=t.len() {
                    if go(rest, &t[i..]) {
                        return true;
                    }
                    if t.get(i) == Some(&b'/') {
                        break;
                    }
                }
                false
            }
            Some(b'?') => t.first().is_some_and(|&c| c != b'/') && go(&p[1..], &t[1..]),
            Some(&c) => t.first() == Some(&c) && go(&p[1..], &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// What selection rules look at.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub pid: u32,
    pub exe: String,
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// TCP ports the process listens on (or accepted a connection on).
    pub ports: Vec<u16>,
    pub pod: Option<Arc<Pod>>,
}

impl Facts {
    /// Reads what /proc says about a process.
    pub fn read(proc_root: &Path, pid: u32, with_ports: bool) -> Self {
        let dir = proc_root.join(pid.to_string());
        let exe = fs::read_link(dir.join("exe"))
            .map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
            .unwrap_or_default();
        let cgroup =
            identity::cgroup_path(&fs::read_to_string(dir.join("cgroup")).unwrap_or_default());
        Self {
            pid,
            exe,
            container_id: identity::container_id(&cgroup),
            pod_uid: identity::pod_uid(&cgroup),
            cgroup,
            ports: if with_ports {
                listening_ports(&dir)
            } else {
                Vec::new()
            },
            pod: None,
        }
    }
}

/// Ports of the listening TCP sockets a process holds: its socket inodes, looked up in its
/// network namespace's /proc/PID/net/tcp and tcp6 (state 0A is LISTEN).
pub fn listening_ports(proc_dir: &Path) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else {
        return Vec::new();
    };
    let mut inodes: Vec<u64> = fds
        .filter_map(|e| {
            let target = fs::read_link(e.ok()?.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    inodes.sort_unstable();
    let mut ports = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(text) = fs::read_to_string(proc_dir.join(table)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Ok(inode) = f[9].parse::<u64>() else {
                continue;
            };
            if inodes.binary_search(&inode).is_ok()
                && let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// One side's rules, parsed.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pids: Vec<u32>,
    exe: Vec<String>,
    ports: Vec<PortRange>,
    containers: Vec<String>,
    cgroups: Vec<String>,
    namespaces: Vec<String>,
    pods: Vec<String>,
    labels: Vec<(String, Option<String>)>,
}

/// A rule's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Yes,
    No,
    /// Not known yet (Kubernetes metadata still missing).
    Unknown,
}

impl Rules {
    pub fn new(s: &Selection) -> anyhow::Result<Self> {
        Ok(Self {
            pids: s.pids.clone(),
            exe: s.exe.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| PortRange::parse(p))
                .collect::<Result<_, _>>()?,
            containers: s
                .containers
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect(),
            cgroups: s.cgroups.clone(),
            namespaces: s.k8s_namespaces.clone(),
            pods: s.k8s_pods.clone(),
            labels: s
                .k8s_labels
                .iter()
                .map(|l| match l.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                    None => (l.trim().to_string(), None),
                })
                .collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.exe.is_empty()
            && self.ports.is_empty()
            && self.containers.is_empty()
            && self.cgroups.is_empty()
            && self.k8s_empty()
    }

    fn k8s_empty(&self) -> bool {
        self.namespaces.is_empty() && self.pods.is_empty() && self.labels.is_empty()
    }

    pub fn uses_ports(&self) -> bool {
        !self.ports.is_empty()
    }

    /// Each kind of rule given, answered for these facts.
    fn answers(&self, f: &Facts, k8s_synced: bool) -> Vec<Answer> {
        let yes = |b: bool| if b { Answer::Yes } else { Answer::No };
        let mut out = Vec::new();
        if !self.pids.is_empty() {
            out.push(yes(self.pids.contains(&f.pid)));
        }
        if !self.exe.is_empty() {
            out.push(yes(self.exe.iter().any(|g| glob_match(g, &f.exe))));
        }
        if !self.ports.is_empty() {
            out.push(yes(self
                .ports
                .iter()
                .any(|r| f.ports.iter().any(|&p| r.contains(p)))));
        }
        if !self.containers.is_empty() {
            out.push(yes(f.container_id.as_deref().is_some_and(|id| {
                self.containers
                    .iter()
                    .any(|c| c.len() >= 12 && id.starts_with(c.as_str()))
            })));
        }
        if !self.cgroups.is_empty() {
            out.push(yes(self.cgroups.iter().any(|g| glob_match(g, &f.cgroup))));
        }
        if !self.k8s_empty() {
            // A process in a pod the watcher has not reported yet cannot be answered.
            let in_pod = f.pod_uid.is_some() || f.container_id.is_some();
            let pod = match &f.pod {
                Some(p) => Some(p),
                None if in_pod && !k8s_synced => {
                    out.push(Answer::Unknown);
                    return out;
                }
                None => None,
            };
            if !self.namespaces.is_empty() {
                out.push(yes(pod.is_some_and(|p| {
                    self.namespaces.iter().any(|n| *n == p.namespace)
                })));
            }
            if !self.pods.is_empty() {
                out.push(yes(pod.is_some_and(|p| {
                    self.pods.iter().any(|g| glob_match(g, &p.name))
                })));
            }
            if !self.labels.is_empty() {
                out.push(yes(pod.is_some_and(|p| {
                    self.labels.iter().any(|(k, v)| match (p.label(k), v) {
                        (Some(have), Some(want)) => have == want,
                        (Some(_), None) => true,
                        (None, _) => false,
                    })
                })));
            }
        }
        out
    }
}

/// Includes and excludes together.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub include: Rules,
    pub exclude: Rules,
}

/// The decision for one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Trace,
    Ignore,
    /// Not yet known: events are dropped until it is.
    Unknown,
}

impl Policy {
    pub fn new(include: &Selection, exclude: &Selection) -> anyhow::Result<Self> {
        Ok(Self {
            include: Rules::new(include)?,
            exclude: Rules::new(exclude)?,
        })
    }

    /// Every kind of include rule given must match; any exclude rule that matches excludes.
    pub fn verdict(&self, f: &Facts, k8s_synced: bool) -> Verdict {
        let ex = self.exclude.answers(f, k8s_synced);
        if ex.contains(&Answer::Yes) {
            return Verdict::Ignore;
        }
        let inc = self.include.answers(f, k8s_synced);
        if inc.contains(&Answer::No) {
            return Verdict::Ignore;
        }
        if inc.contains(&Answer::Unknown) || ex.contains(&Answer::Unknown) {
            return Verdict::Unknown;
        }
        Verdict::Trace
    }

    /// Whether a verdict may change while the process lives (listening ports, pod metadata).
    fn may_change(&self, f: &Facts, verdict: Verdict) -> bool {
        verdict == Verdict::Unknown
            || self.include.uses_ports()
            || self.exclude.uses_ports()
            || ((f.pod.is_none())
                && (f.container_id.is_some() || f.pod_uid.is_some())
                && !(self.include.k8s_empty() && self.exclude.k8s_empty()))
    }
}

struct Decision {
    verdict: Verdict,
    /// Process start time (clock ticks since boot), to notice a reused pid.
    start: u64,
    /// When (agent ns) to decide again; 0: final.
    recheck_at: u64,
    /// Written into the kernel's filter.
    in_kernel: bool,
}

/// Counters for the metrics endpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelectStats {
    pub traced: u64,
    pub ignored: u64,
    pub events_dropped: u64,
}

/// Decides per process and keeps the kernel's filter in step.
pub struct Selector {
    policy: Policy,
    decisions: FxHashMap<u32, Decision>,
    kernel: Option<PidFilter>,
    pods: Option<Arc<Pods>>,
    proc_root: PathBuf,
    /// No rule at all: every event passes (decided once, checked per event).
    all: bool,
    started: std::time::Instant,
    /// A coarse clock (ns since `started`), advanced by `sweep`: no clock read per event.
    now: u64,
    last_sweep: u64,
    /// Pids given on the command line are decided in the kernel already; never swept.
    fixed: Vec<u32>,
    pub stats: SelectStats,
}

const RECHECK_NS: u64 = 1_000_000_000;
const SWEEP_NS: u64 = 2_000_000_000;

/// Start time of a process (field 22 of /proc/PID/stat), 0 when it is gone.
pub fn start_time(proc_root: &Path, pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(19))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Selector {
    pub fn new(
        policy: Policy,
        kernel: Option<PidFilter>,
        pods: Option<Arc<Pods>>,
        fixed: Vec<u32>,
    ) -> Self {
        Self {
            all: policy.include.is_empty() && policy.exclude.is_empty(),
            policy,
            decisions: FxHashMap::default(),
            kernel,
            pods,
            proc_root: PathBuf::from("/proc"),
            started: std::time::Instant::now(),
            now: 0,
            last_sweep: 0,
            fixed,
            stats: SelectStats::default(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.decisions.len()
    }

    /// Whether this event's process is traced.
    pub fn admit(&mut self, ev: &SocketEvent<'_>) -> bool {
        if self.all {
            return true;
        }
        let now = self.now;
        let pid = ev.header.pid;
        // A server accepting on a selected port is selected at once.
        let accepted_port = matches!(ev.kind, EventKind::Accept).then(|| ev.local().port());
        let due = match self.decisions.get(&pid) {
            None => true,
            Some(d) => {
                (d.recheck_at != 0 && now >= d.recheck_at)
                    || (d.verdict != Verdict::Trace
                        && accepted_port.is_some()
                        && self.policy.include.uses_ports())
            }
        };
        if due {
            self.decide(pid, accepted_port, now);
        }
        let traced = self
            .decisions
            .get(&pid)
            .is_some_and(|d| d.verdict == Verdict::Trace);
        if !traced {
            self.stats.events_dropped += 1;
        }
        traced
    }

    fn decide(&mut self, pid: u32, accepted_port: Option<u16>, now: u64) {
        let uses_ports = self.policy.include.uses_ports() || self.policy.exclude.uses_ports();
        let mut facts = Facts::read(&self.proc_root, pid, uses_ports);
        if let Some(p) = accepted_port
            && !facts.ports.contains(&p)
        {
            facts.ports.push(p);
        }
        let synced = self.pods.as_ref().is_none_or(|p| p.synced());
        if let Some(pods) = &self.pods {
            facts.pod = pods.find(facts.container_id.as_deref(), facts.pod_uid.as_deref());
        }
        let verdict = self.policy.verdict(&facts, synced);
        let may_change = self.policy.may_change(&facts, verdict);
        let start = start_time(&self.proc_root, pid);
        let previous = self.decisions.get(&pid).map(|d| d.verdict);
        if previous != Some(verdict) {
            match verdict {
                Verdict::Trace => self.stats.traced += 1,
                Verdict::Ignore => self.stats.ignored += 1,
                Verdict::Unknown => {}
            }
            log::debug!("process {pid} ({}): {verdict:?}", facts.exe);
        }
        // Only a final "no" goes to the kernel: a process that may still become traced keeps
        // sending events so that its first traced request is seen.
        let mut in_kernel = self.decisions.get(&pid).is_some_and(|d| d.in_kernel);
        if verdict == Verdict::Ignore
            && !may_change
            && !in_kernel
            && start != 0
            && let Some(k) = &mut self.kernel
        {
            in_kernel = k.ignore(pid);
        }
        self.decisions.insert(
            pid,
            Decision {
                verdict,
                start,
                recheck_at: if may_change { now + RECHECK_NS } else { 0 },
                in_kernel,
            },
        );
    }

    /// Advances the clock, and forgets processes that exited (or whose pid now names another
    /// process), here and in the kernel. Cheap to call often: sweeps at most every two seconds.
    pub fn sweep(&mut self) {
        self.now = self.started.elapsed().as_nanos() as u64;
        let now = self.now;
        if self.all || now < self.last_sweep + SWEEP_NS {
            return;
        }
        self.last_sweep = now;
        let root = &self.proc_root;
        let mut gone = Vec::new();
        for (&pid, d) in &self.decisions {
            if start_time(root, pid) != d.start || d.start == 0 {
                gone.push((pid, d.in_kernel));
            }
        }
        for (pid, in_kernel) in gone {
            self.decisions.remove(&pid);
            if in_kernel
                && !self.fixed.contains(&pid)
                && let Some(k) = &mut self.kernel
            {
                k.forget(pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges() {
        assert_eq!(
            PortRange::parse("8080").unwrap(),
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        let r = PortRange::parse(" 8000 - 8999 ").unwrap();
        assert!(r.contains(8000) && r.contains(8999) && !r.contains(9000));
        for bad in ["", "0", "80-70", "http", "70000", "1-2-3"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("/usr/bin/python3*", "/usr/bin/python3.11"));
        assert!(!glob_match("/usr/bin/python3*", "/usr/bin/python3/x"));
        assert!(glob_match("**/nginx", "/usr/sbin/nginx"));
        assert!(glob_match("/opt/*/bin/*", "/opt/app/bin/server"));
        assert!(!glob_match("/opt/*/bin/*", "/opt/a/b/bin/server"));
        assert!(glob_match(
            "/usr/bin/node?",
            "/usr/bin/nodejs"[..14].as_ref()
        ));
        assert!(glob_match("*", "curl"));
        assert!(!glob_match("nginx", "/usr/sbin/nginx"));
    }

    fn facts() -> Facts {
        Facts {
            pid: 42,
            exe: "/usr/bin/python3.11".into(),
            cgroup: "/system.slice/docker-abc.scope".into(),
            container_id: Some(
                "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8".into(),
            ),
            pod_uid: None,
            ports: vec![8080],
            pod: None,
        }
    }

    fn policy(include: Selection, exclude: Selection) -> Policy {
        Policy::new(&include, &exclude).unwrap()
    }

    #[test]
    fn kinds_narrow_entries_widen() {
        let f = facts();
        let v = |inc: Selection| policy(inc, Selection::default()).verdict(&f, true);
        assert_eq!(v(Selection::default()), Verdict::Trace);
        let exe = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            v(Selection {
                exe: exe(&["/usr/sbin/nginx", "/usr/bin/python3*"]),
                ..Default::default()
            }),
            Verdict::Trace
        );
        assert_eq!(
            v(Selection {
                exe: exe(&["/usr/bin/python3*"]),
                ports: vec!["9000-9100".into()],
                ..Default::default()
            }),
            Verdict::Ignore,
            "the port rule narrows"
        );
        assert_eq!(
            v(Selection {
                ports: vec!["9000".into(), "8000-8100".into()],
                containers: vec!["3f2a9c1b7d4e".into()],
                ..Default::default()
            }),
            Verdict::Trace
        );
        assert_eq!(
            v(Selection {
                containers: vec!["3f2a".into()],
                ..Default::default()
            }),
            Verdict::Ignore,
            "too short a prefix to name a container"
        );
        assert_eq!(
            v(Selection {
                cgroups: vec!["/system.slice/docker-*".into()],
                ..Default::default()
            }),
            Verdict::Trace
        );
    }

    #[test]
    fn any_exclusion_wins() {
        let f = facts();
        let p = policy(
            Selection {
                exe: vec!["/usr/bin/*".into()],
                ..Default::default()
            },
            Selection {
                ports: vec!["8080".into()],
                ..Default::default()
            },
        );
        assert_eq!(p.verdict(&f, true), Verdict::Ignore);
        let p = policy(
            Selection::default(),
            Selection {
                pids: vec![41],
                ..Default::default()
            },
        );
        assert_eq!(p.verdict(&f, true), Verdict::Trace);
    }

    #[test]
    fn kubernetes_rules_wait_for_the_pod() {
        let mut f = facts();
        let p = policy(
            Selection {
                k8s_namespaces: vec!["shop".into()],
                k8s_labels: vec!["tier=web".into()],
                ..Default::default()
            },
            Selection::default(),
        );
        assert_eq!(p.verdict(&f, false), Verdict::Unknown);
        assert_eq!(
            p.verdict(&f, true),
            Verdict::Ignore,
            "listed, and not a pod"
        );
        f.pod = Some(Arc::new(Pod {
            namespace: "shop".into(),
            labels: vec![("tier".into(), "web".into())],
            ..Default::default()
        }));
        assert_eq!(p.verdict(&f, true), Verdict::Trace);
        f.pod = Some(Arc::new(Pod {
            namespace: "shop".into(),
            labels: vec![("tier".into(), "db".into())],
            ..Default::default()
        }));
        assert_eq!(p.verdict(&f, true), Verdict::Ignore);
    }

    #[test]
    fn listening_ports_of_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let ports = listening_ports(Path::new("/proc/self"));
        assert!(ports.contains(&port), "{ports:?} lacks {port}");
        assert_eq!(
            ports.iter().filter(|&&p| p == port).count(),
            1,
            "the accepted socket is not a listener"
        );
    }

    #[test]
    fn start_times_tell_processes_apart() {
        let me = std::process::id();
        let t = start_time(Path::new("/proc"), me);
        assert!(t > 0);
        assert_eq!(start_time(Path::new("/proc"), me), t);
        assert_eq!(start_time(Path::new("/proc"), u32::MAX), 0);
    }
}
