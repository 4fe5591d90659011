//! What wirespan knows about a traced process: the OTLP resource its spans are exported under,
//! and whether its runtime multiplexes requests over threads.

use std::{
    collections::HashSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    http::attributes::Value,
    identity::{self, Pod, Pods},
};

/// Resource attributes and runtime facts of one process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub service_name: String,
    pub executable_name: String,
    pub executable_path: String,
    pub command_line: String,
    /// Extra attributes from the process's `OTEL_RESOURCE_ATTRIBUTES`.
    pub extra: Vec<(String, String)>,
    /// A Go binary: goroutines move between threads, so threads say nothing about requests.
    pub go: bool,
    /// From the process's cgroup.
    pub container_id: Option<String>,
    /// The process's Kubernetes pod and container, when metadata is on and the pod is known.
    pub pod: Option<Arc<Pod>>,
    pub container_name: Option<String>,
    /// In a pod that the metadata watcher has not reported yet: read again later.
    pub k8s_pending: bool,
}

/// Words that mark a command-line argument (or the value after it) as a secret.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api-key",
    "api_key",
    "credential",
    "authorization",
    "private",
    "cookie",
    "bearer",
    "auth",
];

/// Options whose next argument is a credential when it is `user:password` (`curl -u a:b`);
/// `python -u script.py` keeps its script.
const CREDENTIAL_OPTIONS: &[&str] = &["-u", "--user", "-U", "--proxy-user"];

fn is_secret_name(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| s.contains(w))
}

/// A URL argument with its query values and its user information replaced by `REDACTED`
/// (`curl 'http://u:p@host/login?password=x'`), as `url.query` is in spans.
fn redact_url(a: &str) -> Option<String> {
    let scheme_end = a.find("://")? + 3;
    let authority_end = a[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(a.len(), |i| scheme_end + i);
    let mut out = a[..scheme_end].to_string();
    match a[scheme_end..authority_end].rfind('@') {
        Some(at) => {
            out.push_str("REDACTED");
            out.push_str(&a[scheme_end + at..authority_end]);
        }
        None => out.push_str(&a[scheme_end..authority_end]),
    }
    let rest = &a[authority_end..];
    let (rest, fragment) = match rest.find('#') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            out.push_str(&crate::http::attributes::redact_query(query));
        }
        None => out.push_str(rest),
    }
    out.push_str(fragment);
    (out != a).then_some(out)
}

/// Redacts one argument: `name=value`, `Name: value` (a header given to curl or wget) and
/// `Bearer value` keep their name and lose their value when the name looks secret; URLs lose
/// their query values and user information.
fn redact_arg(a: &str) -> Option<String> {
    if let Some(url) = redact_url(a) {
        return Some(url);
    }
    let sep = a.find(['=', ':']);
    if let Some(i) = sep
        && is_secret_name(&a[..i])
    {
        return Some(format!("{}REDACTED", &a[..=i]));
    }
    if a.to_ascii_lowercase().contains("bearer ") {
        return Some("REDACTED".into());
    }
    None
}

/// Joins argv with spaces, replacing the values of secret-looking options (`--password=x`,
/// `--token x`, `PASSWORD=x`, `-H 'Authorization: Bearer x'`, `-u user:pass`) with `REDACTED`.
pub fn redact_command_line(args: &[String]) -> String {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    let mut hide_next_pair = false;
    for a in args {
        if hide_next || (hide_next_pair && a.contains(':')) {
            hide_next = false;
            hide_next_pair = false;
            out.push(redact_arg(a).unwrap_or_else(|| "REDACTED".to_string()));
            continue;
        }
        hide_next_pair = false;
        if let Some(r) = redact_arg(a) {
            out.push(r);
            continue;
        }
        if a.starts_with('-') && is_secret_name(a) {
            hide_next = true;
        } else if CREDENTIAL_OPTIONS.contains(&a.as_str()) {
            hide_next_pair = true;
        }
        out.push(a.clone());
    }
    out.join(" ")
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`, values percent-decoded).
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), percent_decode(v.trim().as_bytes())))
        })
        .collect()
}

/// `%XX` escapes decoded (as in `OTEL_RESOURCE_ATTRIBUTES`, OTLP headers and gRPC's
/// `grpc-message`); anything else kept as it is.
pub fn percent_decode(b: &[u8]) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The service name the process gives itself: `OTEL_SERVICE_NAME`, then `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub fn own_service_name(env: &[(String, String)]) -> Option<String> {
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(n) = get("OTEL_SERVICE_NAME").filter(|n| !n.trim().is_empty()) {
        return Some(n.trim().to_string());
    }
    get("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
        parse_resource_attributes(attrs)
            .into_iter()
            .find(|(k, v)| k == "service.name" && !v.is_empty())
            .map(|(_, v)| v)
    })
}

fn read_nul_list(path: &Path) -> Vec<String> {
    fs::read(path)
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an ELF file is a Go program (it has a `.go.buildinfo` section).
pub fn is_go_binary(path: &Path) -> bool {
    use object::{Object, ObjectSection};
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return false;
    };
    obj.sections()
        .any(|s| s.name().is_ok_and(|n| n == ".go.buildinfo"))
}

impl ProcessInfo {
    /// Reads /proc/PID. `comm` is the kernel's short name, used when /proc is gone already.
    /// `pods`: this node's pods, when Kubernetes metadata is on.
    pub fn read(proc_root: &Path, pid: u32, comm: &str, pods: Option<&Pods>) -> Self {
        let dir = proc_root.join(pid.to_string());
        let exe: PathBuf = fs::read_link(dir.join("exe")).unwrap_or_default();
        let exe_path = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        let executable_name = Path::new(&exe_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| comm.to_string());
        let env: Vec<(String, String)> = read_nul_list(&dir.join("environ"))
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                k.starts_with("OTEL_")
                    .then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        let extra = env
            .iter()
            .find(|(k, _)| k == "OTEL_RESOURCE_ATTRIBUTES")
            .map(|(_, v)| parse_resource_attributes(v))
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k != "service.name")
            .collect();
        let args = read_nul_list(&dir.join("cmdline"));
        let cgroup =
            identity::cgroup_path(&fs::read_to_string(dir.join("cgroup")).unwrap_or_default());
        let container_id = identity::container_id(&cgroup);
        let pod_uid = identity::pod_uid(&cgroup);
        let pod = pods.and_then(|p| p.find(container_id.as_deref(), pod_uid.as_deref()));
        let container_name = match (&pod, &container_id) {
            (Some(p), Some(id)) => p.container_name(id).map(str::to_string),
            _ => None,
        };
        let k8s_pending = pods.is_some() && pod.is_none() && (pod_uid.is_some());
        Self {
            pid,
            service_name: identity::service_name(
                own_service_name(&env).as_deref(),
                pod.as_deref(),
                container_name.as_deref(),
                &executable_name,
            ),
            go: is_go_binary(&dir.join("exe")),
            executable_name,
            executable_path: exe_path,
            command_line: redact_command_line(&args),
            extra,
            container_id,
            pod,
            container_name,
            k8s_pending,
        }
    }

    /// The OTLP resource attributes.
    pub fn resource(&self, host_name: &str) -> Vec<(String, Value)> {
        // The operator's instance id in a pod: namespace.pod.container.
        let instance = match (&self.pod, &self.container_name) {
            (Some(p), Some(c)) => format!("{}.{}.{c}", p.namespace, p.name),
            _ => format!("{host_name}:{}", self.pid),
        };
        let mut r: Vec<(String, Value)> = vec![
            (
                "service.name".into(),
                Value::Str(self.service_name.clone().into()),
            ),
            ("service.instance.id".into(), Value::Str(instance.into())),
            ("process.pid".into(), Value::Int(self.pid as i64)),
            (
                "process.executable.name".into(),
                Value::Str(self.executable_name.clone().into()),
            ),
            (
                "process.executable.path".into(),
                Value::Str(self.executable_path.clone().into()),
            ),
            (
                "process.command_line".into(),
                Value::Str(self.command_line.clone().into()),
            ),
            ("host.name".into(), Value::Str(host_name.to_string().into())),
            ("telemetry.sdk.name".into(), Value::Str("wirespan".into())),
            ("telemetry.sdk.language".into(), Value::Str("rust".into())),
            (
                "telemetry.sdk.version".into(),
                Value::Str(env!("CARGO_PKG_VERSION").into()),
            ),
        ];
        r.push(("host.arch".into(), Value::Str(host_arch().into())));
        if let Some(id) = host_id() {
            r.push(("host.id".into(), Value::Str(id.to_string().into())));
        }
        if let Some(id) = &self.container_id {
            r.push(("container.id".into(), Value::Str(id.clone().into())));
        }
        if let Some(p) = &self.pod {
            self.pod_resource(p, &mut r);
        }
        for (k, v) in &self.extra {
            if !r.iter().any(|(n, _)| n == k) {
                r.push((k.clone(), Value::Str(v.clone().into())));
            }
        }
        r
    }
}

impl ProcessInfo {
    /// `k8s.*` attributes, `service.namespace`, and the pod's
    /// `resource.opentelemetry.io/<attribute>` annotations (the operator's rule).
    fn pod_resource(&self, p: &Pod, r: &mut Vec<(String, Value)>) {
        let s = |v: &str| Value::Str(v.to_string().into());
        let namespace = p
            .annotation("resource.opentelemetry.io/service.namespace")
            .unwrap_or(&p.namespace);
        r.push(("service.namespace".into(), s(namespace)));
        r.push(("k8s.namespace.name".into(), s(&p.namespace)));
        r.push(("k8s.pod.name".into(), s(&p.name)));
        r.push(("k8s.pod.uid".into(), s(&p.uid)));
        if !p.node.is_empty() {
            r.push(("k8s.node.name".into(), s(&p.node)));
        }
        if let Some(c) = &self.container_name {
            r.push(("k8s.container.name".into(), s(c)));
        }
        if let Some((kind, name)) = &p.owner
            && kind == "ReplicaSet"
        {
            r.push(("k8s.replicaset.name".into(), s(name)));
        }
        if let Some((kind, name)) = p.workload() {
            r.push((format!("k8s.{kind}.name"), Value::Str(name.into())));
        }
        for (k, v) in &p.labels {
            r.push((format!("k8s.pod.label.{k}"), s(v)));
        }
        for (k, v) in &p.annotations {
            if let Some(attr) = k.strip_prefix("resource.opentelemetry.io/")
                && attr != "service.name"
                && attr != "service.namespace"
                && !r.iter().any(|(n, _)| n == attr)
            {
                r.push((attr.to_string(), s(v)));
            }
        }
    }
}

/// The machine's architecture by the semantic conventions' names.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "x86",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

/// /etc/machine-id, read once.
pub fn host_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// This host's name, from the kernel.
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The local endpoints of wirespan's own TCP sockets, so that a traced process's side of a
/// connection to wirespan (a local collector receiving our export) is never traced.
#[derive(Debug)]
pub struct OwnSockets {
    /// Our listening sockets' addresses: any connection to one of them is ours.
    listening: HashSet<SocketAddr>,
    /// Our connections, as (our end, the other end). A connection is ours only when both
    /// ends match: a port of a connection we closed may be reused by another process at once,
    /// and that connection must not be taken for ours.
    connected: HashSet<(SocketAddr, SocketAddr)>,
    /// Inodes of our sockets when the sets were built.
    inodes: HashSet<u64>,
    refreshed: Option<Instant>,
}

impl Default for OwnSockets {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnSockets {
    pub fn new() -> Self {
        Self {
            listening: HashSet::new(),
            connected: HashSet::new(),
            inodes: HashSet::new(),
            refreshed: None,
        }
    }

    fn known(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.listening.contains(&remote) || self.connected.contains(&(remote, local))
    }

    /// Whether a traced connection from `local` to `remote`, first seen at `seen`, has
    /// wirespan at its other end. Re-reads /proc at most every 100 ms on a miss, so a miss is
    /// only final (`Some(false)`) once our sockets were read after `seen`: until then it is
    /// `None`, and the caller asks again at the connection's later events. (Our end of a
    /// connection exists before the far end's accept or first byte is seen, so a read after
    /// `seen` cannot miss it.)
    pub fn is_own(&mut self, local: SocketAddr, remote: SocketAddr, seen: Instant) -> Option<bool> {
        let (local, remote) = (canonical(local), canonical(remote));
        if self.known(local, remote) {
            return Some(true);
        }
        if let Some(t) = self.refreshed
            && t.elapsed() < Duration::from_millis(100)
        {
            return (t >= seen).then_some(false);
        }
        self.refresh();
        Some(self.known(local, remote))
    }

    fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        let inodes = own_socket_inodes();
        // /proc/net/tcp lists every socket of the namespace: read it only when our own sockets
        // changed, not on every connection we do not recognise.
        if inodes == self.inodes {
            return;
        }
        self.listening.clear();
        self.connected.clear();
        for file in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
            let Ok(text) = fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let Some(e) = parse_proc_net_line(line) else {
                    continue;
                };
                if !inodes.contains(&e.inode) {
                    continue;
                }
                if e.state == LISTEN {
                    self.listening.insert(canonical(e.local));
                } else {
                    self.connected
                        .insert((canonical(e.local), canonical(e.remote)));
                }
            }
        }
        self.inodes = inodes;
    }
}

/// The inode numbers of this process's sockets (a socket's inode is the number in its
/// `socket:[N]` link and in /proc/net/tcp): `fstat` of each descriptor listed in
/// /proc/self/fd. Reading each descriptor's link instead went through procfs's path lookup and
/// dentry cache, 12% of the agent's CPU at 100 new connections a second (docs/BENCHMARKS.md).
fn own_socket_inodes() -> HashSet<u64> {
    fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: fstat only writes the stat it is given, and fails for a descriptor that
            // is not open (one closed since the listing); one opened again since is ours too.
            (unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0)
                // SAFETY: fstat succeeded, so it filled the stat.
                .then(|| unsafe { st.assume_init() })
        })
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .map(|st| st.st_ino)
        .collect()
}

/// TCP state LISTEN in /proc/net/tcp.
const LISTEN: u8 = 0x0A;

/// One line of /proc/net/tcp{,6}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcNetEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One line of /proc/net/tcp{,6}: local and remote address, state, inode.
pub fn parse_proc_net_line(line: &str) -> Option<ProcNetEntry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    Some(ProcNetEntry {
        local: parse_hex_endpoint(f.get(1)?)?,
        remote: parse_hex_endpoint(f.get(2)?)?,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them.
fn parse_hex_endpoint(s: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = s.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip: std::net::IpAddr = match ip_hex.len() {
        8 => {
            let v = u32::from_str_radix(ip_hex, 16).ok()?;
            std::net::Ipv4Addr::from(v.to_le_bytes()).into()
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip_hex[8 * i..8 * i + 8], 16).ok()?;
                b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            std::net::Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn service_name_rules_in_order() {
        assert_eq!(
            own_service_name(&env(&[
                ("OTEL_SERVICE_NAME", "checkout"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=other")
            ]))
            .as_deref(),
            Some("checkout")
        );
        assert_eq!(
            own_service_name(&env(&[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,service.name=pay%20ments"
            )]))
            .as_deref(),
            Some("pay ments")
        );
        assert_eq!(own_service_name(&env(&[("OTEL_SERVICE_NAME", " ")])), None);
    }

    #[test]
    fn command_line_secrets_are_redacted() {
        let args: Vec<String> = [
            "app",
            "--password",
            "hunter2",
            "--db-token=abc",
            "API_KEY=x",
            "--port",
            "80",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_command_line(&args),
            "app --password REDACTED --db-token=REDACTED API_KEY=REDACTED --port 80"
        );
        let curl: Vec<String> = [
            "curl",
            "-H",
            "Authorization: Bearer abc",
            "-H",
            "Cookie: sid=xyz",
            "-H",
            "Accept: */*",
            "-u",
            "me:pw",
            "http://h/p",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let python: Vec<String> = ["python3", "-u", "app.py", "--port", "80"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(redact_command_line(&python), "python3 -u app.py --port 80");
        assert_eq!(
            redact_command_line(&curl),
            "curl -H Authorization:REDACTED -H Cookie:REDACTED -H Accept: */* -u REDACTED http://h/p"
        );
        // URLs: query values and user information, wherever the URL sits.
        let urls: Vec<String> = [
            "curl",
            "http://127.0.0.1:8080/login?password=s3cret&user=a#top",
            "--url=https://me:pw@example.com:8443/x?token=t",
            "ftp://anon@host/file",
            "http://h/plain",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_command_line(&urls),
            "curl http://127.0.0.1:8080/login?password=REDACTED&user=REDACTED#top \
             --url=https://REDACTED@example.com:8443/x?token=REDACTED ftp://REDACTED@host/file \
             http://h/plain"
        );
    }

    #[test]
    fn proc_net_tcp_lines() {
        let v4 = "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_proc_net_line(v4),
            Some(ProcNetEntry {
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                state: LISTEN,
                inode: 12345
            })
        );
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_proc_net_line(v6),
            Some(ProcNetEntry {
                local: "[::1]:8080".parse().unwrap(),
                remote: "[::1]:54321".parse().unwrap(),
                state: 1,
                inode: 777
            })
        );
    }

    #[test]
    fn own_socket_inodes_are_those_of_the_descriptors_links() {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let ino: u64 = link
            .to_str()
            .and_then(|s| s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .unwrap();
        let inodes = own_socket_inodes();
        assert!(inodes.contains(&ino), "{ino} not in {inodes:?}");
        drop(listener);
        assert!(!own_socket_inodes().contains(&ino));
    }

    #[test]
    fn this_test_binary_is_not_go_and_own_sockets_are_found() {
        assert!(!is_go_binary(Path::new("/proc/self/exe")));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = listener.local_addr().unwrap();
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut own = OwnSockets::new();
        let now = Instant::now;
        let before = now();
        // A connection to our listener, from anywhere.
        assert_eq!(own.is_own(elsewhere, ours, before), Some(true));
        assert_eq!(own.is_own(ours, elsewhere, before), Some(false));
        // A connection we made: only its exact other end is ours.
        let client = std::net::TcpStream::connect(ours).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (mine, theirs) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        // Seen within 100 ms of the last read of our sockets: not known yet, rather than
        // "not ours" for good (the far end of an export connection made just then).
        let seen = now();
        assert_eq!(own.is_own(theirs, mine, seen), None);
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(
            own.is_own(theirs, mine, seen),
            Some(true),
            "the far end of our connection"
        );
        // Another connection that happens to use our port, to somewhere else: not ours (the
        // case of a port we closed being reused by a traced process).
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(own.is_own(other, mine, seen), Some(false));
        drop(accepted);
    }

    #[test]
    fn resource_names_wirespan_as_the_sdk() {
        let info = ProcessInfo {
            pid: 7,
            service_name: "svc".into(),
            executable_name: "svc".into(),
            executable_path: "/bin/svc".into(),
            command_line: "svc".into(),
            extra: vec![("deployment.environment".into(), "prod".into())],
            container_id: Some("c0ffee".into()),
            ..Default::default()
        };
        let r = info.resource("node1");
        let get = |k: &str| r.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("telemetry.sdk.name"),
            Some(Value::Str("wirespan".into()))
        );
        assert_eq!(get("process.pid"), Some(Value::Int(7)));
        assert_eq!(
            get("service.instance.id"),
            Some(Value::Str("node1:7".into()))
        );
        assert_eq!(
            get("deployment.environment"),
            Some(Value::Str("prod".into()))
        );
        assert_eq!(get("container.id"), Some(Value::Str("c0ffee".into())));
        assert_eq!(get("host.arch"), Some(Value::Str(host_arch().into())));
        assert_eq!(get("k8s.pod.name"), None);
    }

    #[test]
    fn pod_resource_by_the_operators_rules() {
        let pod = Pod {
            uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            name: "orders-7d9f8b6c5-x2x4q".into(),
            namespace: "shop".into(),
            node: "node1".into(),
            labels: vec![("app.kubernetes.io/name".into(), "orders".into())],
            annotations: vec![
                (
                    "resource.opentelemetry.io/deployment.environment".into(),
                    "prod".into(),
                ),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{...}".into(),
                ),
            ],
            owner: Some(("ReplicaSet".into(), "orders-7d9f8b6c5".into())),
            containers: vec![("c0ffee".into(), "app".into())],
        };
        let info = ProcessInfo {
            pid: 7,
            service_name: "orders".into(),
            container_id: Some("c0ffee".into()),
            pod: Some(Arc::new(pod)),
            container_name: Some("app".into()),
            ..Default::default()
        };
        let r = info.resource("node1");
        let get = |k: &str| r.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let s = |v: &str| Some(Value::Str(v.to_string().into()));
        assert_eq!(
            get("service.instance.id"),
            s("shop.orders-7d9f8b6c5-x2x4q.app")
        );
        assert_eq!(get("service.namespace"), s("shop"));
        assert_eq!(get("k8s.namespace.name"), s("shop"));
        assert_eq!(get("k8s.deployment.name"), s("orders"));
        assert_eq!(get("k8s.replicaset.name"), s("orders-7d9f8b6c5"));
        assert_eq!(get("k8s.container.name"), s("app"));
        assert_eq!(get("k8s.node.name"), s("node1"));
        assert_eq!(get("k8s.pod.label.app.kubernetes.io/name"), s("orders"));
        assert_eq!(get("deployment.environment"), s("prod"));
        assert!(
            !r.iter().any(|(k, _)| k.contains("last-applied")),
            "only the operator's resource annotations"
        );
    }
}
