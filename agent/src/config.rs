//! One configuration model for the agent, from four layers, each overriding the one before:
//! built-in defaults, a YAML file (`--config FILE` or `WIRESPAN_CONFIG`), the environment, and
//! the command line.
//!
//! Every setting has a path in the file (`sampling.keep_errors`) and an environment variable
//! made from it (`WIRESPAN_SAMPLING_KEEP_ERRORS`; lists are comma-separated). The
//! OpenTelemetry variables are read too: `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_{,TRACES_}PROTOCOL`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`.
//! `wirespan config print` shows the result.

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The effective configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which processes are traced: each kind of rule given narrows the set (a process must
    /// match one entry of every kind given). Empty: every process but wirespan.
    pub select: Selection,
    /// Processes never traced: matching any entry of any kind excludes.
    pub exclude: Selection,
    pub export: Export,
    pub sampling: Sampling,
    /// Route patterns such as `/users/{id}/orders/{order}`; paths they match are named by them,
    /// others by the built-in templating.
    pub routes: Vec<String>,
    pub capture: Capture,
    /// Export query parameter values as they are (by default each is `REDACTED`).
    pub keep_query_values: bool,
    pub kubernetes: Kubernetes,
    pub telemetry: Telemetry,
}

/// Rules that name processes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selection {
    /// Process ids.
    #[serde(deserialize_with = "numbers")]
    pub pids: Vec<u32>,
    /// Globs on the executable's path (`*` within a path segment, `**` across, `?` one char).
    pub exe: Vec<String>,
    /// Listening TCP ports or ranges (`8080`, `8000-8999`).
    pub ports: Vec<String>,
    /// Container ids (a prefix of at least 12 hex digits is enough).
    pub containers: Vec<String>,
    /// Globs on the process's cgroup path.
    pub cgroups: Vec<String>,
    /// Kubernetes namespaces.
    pub k8s_namespaces: Vec<String>,
    /// Globs on Kubernetes pod names.
    pub k8s_pods: Vec<String>,
    /// Kubernetes pod labels, `key=value` (or `key` for any value).
    pub k8s_labels: Vec<String>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Rules that need Kubernetes metadata.
    pub fn uses_kubernetes(&self) -> bool {
        !(self.k8s_namespaces.is_empty() && self.k8s_pods.is_empty() && self.k8s_labels.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Export {
    /// `otlp` (to `endpoint`), `embedded` (in-memory store and Jaeger UI), `none`. Default:
    /// `otlp` when an endpoint is set, else `embedded`.
    pub mode: Option<ExportMode>,
    /// Base OTLP endpoint, as `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is added for
    /// http/protobuf).
    pub endpoint: Option<String>,
    /// Full traces URL, as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is).
    pub traces_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (default).
    pub protocol: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Address of the embedded Jaeger UI.
    pub ui_address: SocketAddr,
    /// Traces kept in memory for the embedded UI.
    pub ui_max_traces: u32,
}

impl Default for Export {
    fn default() -> Self {
        Self {
            mode: None,
            endpoint: None,
            traces_endpoint: None,
            protocol: None,
            timeout_ms: None,
            ui_address: SocketAddr::from(([127, 0, 0, 1], 16686)),
            ui_max_traces: 1000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportMode {
    Otlp,
    Embedded,
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// As `OTEL_TRACES_SAMPLER`: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off, parentbased_traceidratio.
    pub sampler: String,
    /// As `OTEL_TRACES_SAMPLER_ARG`: the ratio for the traceidratio samplers (a number, or a
    /// string holding one: Helm's `--set` and environment variables give strings).
    #[serde(deserialize_with = "ratio")]
    pub arg: Option<f64>,
    /// Keep spans marked as errors whatever the sampler decided.
    pub keep_errors: bool,
    /// Keep spans at least this slow whatever the sampler decided.
    pub keep_slower_than_ms: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            sampler: "parentbased_always_on".into(),
            arg: None,
            keep_errors: false,
            keep_slower_than_ms: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Capture {
    /// Bytes copied from each read or write (the true length is always reported), max 8192.
    pub bytes: u32,
    /// Kernel ring buffer memory in MiB (a power of two), split among one ring per online CPU
    /// (at least 256 KiB each). The agent maps it once (4 MiB of its resident memory at the
    /// default); larger absorbs longer bursts.
    pub ring_mib: u32,
    /// Connections tracked at once; more are counted and ignored.
    pub max_connections: usize,
}

impl Default for Capture {
    fn default() -> Self {
        Self {
            bytes: wirespan_common::DEFAULT_CAPTURE,
            ring_mib: 4,
            max_connections: crate::trace::stitch::MAX_CONNECTIONS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kubernetes {
    /// `auto` (when running in a pod: `KUBERNETES_SERVICE_HOST` is set), `on`, `off`.
    pub metadata: String,
    /// The node whose pods are watched (the DaemonSet passes `spec.nodeName`).
    pub node_name: Option<String>,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Self {
            metadata: "auto".into(),
            node_name: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    /// Address of the agent's own endpoints: /healthz, /readyz, /metrics. None: not served.
    pub address: Option<SocketAddr>,
    /// `text` or `json` (one object per line).
    pub log_format: LogFormat,
    /// Print one line per span on standard output.
    pub log_spans: bool,
    /// Every this many seconds, one line of counters and table sizes.
    pub stats_every_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Accepts numbers or strings of digits (environment lists are strings).
fn numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        N(u32),
        S(String),
    }
    Vec::<N>::deserialize(d)?
        .into_iter()
        .map(|n| match n {
            N::N(n) => Ok(n),
            N::S(s) => s
                .trim()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a process id"))),
        })
        .collect()
}

/// A number, or a string that holds one.
fn ratio<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        N(f64),
        S(String),
    }
    match Option::<N>::deserialize(d)? {
        None => Ok(None),
        Some(N::N(n)) => Ok(Some(n)),
        Some(N::S(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a number"))),
    }
}

/// The OpenTelemetry variables and where they go.
const OTEL_VARS: &[(&str, &str)] = &[
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "export.endpoint"),
    (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "export.traces_endpoint",
    ),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "export.protocol"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "export.protocol"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "export.timeout_ms"),
    ("OTEL_TRACES_SAMPLER", "sampling.sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "sampling.arg"),
];

/// Settings given on the command line, as `(path, value)` pairs; lists replace lists.
pub type Overrides = Vec<(&'static str, Value)>;

/// The environment variable of a setting's path: `WIRESPAN_` and the path in capitals.
pub fn env_name(path: &str) -> String {
    format!("WIRESPAN_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Every leaf path of the configuration, with its default.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&path, child, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// A value from an environment variable, typed by the setting's default.
fn env_value(default: &Value, raw: &str) -> Value {
    let raw = raw.trim();
    let scalar = |s: &str| -> Value {
        match serde_json::from_str::<Value>(s) {
            Ok(v @ (Value::Bool(_) | Value::Number(_))) => v,
            _ => Value::String(s.to_string()),
        }
    };
    match default {
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Value::String(_) => Value::String(raw.to_string()),
        _ => scalar(raw),
    }
}

fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let map = node.as_object_mut().expect("made an object above");
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Deep merge: objects merge key by key, anything else in `over` replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// The environment layer.
fn env_layer(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Value> {
    let defaults = serde_json::to_value(Config::default()).expect("config serialises");
    let mut all = Vec::new();
    leaves("", &defaults, &mut all);
    let mut layer = Value::Object(Map::new());
    // OpenTelemetry's names first, so that WIRESPAN_* names win when both are set.
    for (var, path) in OTEL_VARS {
        if let Some(raw) = get(var).filter(|v| !v.trim().is_empty()) {
            let default = &all.iter().find(|(p, _)| p == path).expect("known path").1;
            if *path == "sampling.arg" && raw.trim().parse::<f64>().is_err() {
                anyhow::bail!("{var}={raw} is not a number");
            }
            set_path(&mut layer, path, env_value(default, &raw));
        }
    }
    for (path, default) in &all {
        if let Some(raw) = get(&env_name(path)) {
            set_path(&mut layer, path, env_value(default, &raw));
        }
    }
    Ok(layer)
}

impl Config {
    /// Resolves the layers. `file` is the YAML text of the configuration file, if any.
    pub fn resolve(
        file: Option<(&Path, &str)>,
        env: &dyn Fn(&str) -> Option<String>,
        cli: &Overrides,
    ) -> anyhow::Result<Self> {
        let mut value = serde_json::to_value(Config::default()).expect("config serialises");
        if let Some((path, text)) = file {
            let from_file: Value = serde_yaml_ng::from_str(text)
                .with_context(|| format!("{}: not valid YAML", path.display()))?;
            if !from_file.is_null() {
                // Checked alone first so that a typo is reported against the file.
                let _: Config = serde_json::from_value(from_file.clone())
                    .with_context(|| format!("{}", path.display()))?;
                merge(&mut value, from_file);
            }
        }
        merge(&mut value, env_layer(env)?);
        let mut cli_layer = Value::Object(Map::new());
        for (path, v) in cli {
            set_path(&mut cli_layer, path, v.clone());
        }
        // A traces URL from a lower layer does not outlive an endpoint given on the command
        // line.
        if cli.iter().any(|(p, _)| *p == "export.endpoint") {
            set_path(&mut cli_layer, "export.traces_endpoint", Value::Null);
        }
        merge(&mut value, cli_layer);
        let config: Config = serde_json::from_value(value)
            .context("the configuration (defaults, file, environment and flags together)")?;
        config.check()?;
        Ok(config)
    }

    /// Reads the file named by `--config` or `WIRESPAN_CONFIG`, then resolves.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        cli: &Overrides,
    ) -> anyhow::Result<Self> {
        let from_env = env("WIRESPAN_CONFIG").filter(|v| !v.trim().is_empty());
        let path = file
            .map(Path::to_path_buf)
            .or_else(|| from_env.map(Into::into));
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading the configuration file {}", p.display()))?;
                Self::resolve(Some((&p, &text)), env, cli)
            }
            None => Self::resolve(None, env, cli),
        }
    }

    /// Values no layer may give.
    fn check(&self) -> anyhow::Result<()> {
        if !self.capture.ring_mib.is_power_of_two() || self.capture.ring_mib > 1024 {
            anyhow::bail!(
                "capture.ring_mib must be a power of two up to 1024, got {}",
                self.capture.ring_mib
            );
        }
        if let Some(p) = &self.export.protocol
            && p != "grpc"
            && p != "http/protobuf"
        {
            anyhow::bail!("export.protocol {p} is not supported (use grpc or http/protobuf)");
        }
        if !["auto", "on", "off"].contains(&self.kubernetes.metadata.as_str()) {
            anyhow::bail!(
                "kubernetes.metadata must be auto, on or off, got {}",
                self.kubernetes.metadata
            );
        }
        for s in [&self.select, &self.exclude] {
            for p in &s.ports {
                crate::select::PortRange::parse(p)?;
            }
            for l in &s.k8s_labels {
                if l.trim().is_empty() {
                    anyhow::bail!("an empty Kubernetes label rule");
                }
            }
        }
        crate::sampling::Sampler::from_config(&self.sampling)?;
        for r in &self.routes {
            crate::http::routes::Pattern::parse(r)?;
        }
        Ok(())
    }

    /// The configuration as YAML, for `wirespan config print`.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("config serialises")
    }

    /// Where spans go.
    pub fn export_mode(&self) -> ExportMode {
        self.export.mode.unwrap_or(
            if self.export.endpoint.is_some() || self.export.traces_endpoint.is_some() {
                ExportMode::Otlp
            } else {
                ExportMode::Embedded
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const FILE: &str = "
select:
  exe: ['/usr/bin/python3*']
  ports: ['8000-8999']
exclude:
  pids: [1]
export:
  endpoint: http://file:4318
  protocol: grpc
sampling:
  sampler: traceidratio
  arg: 0.5
  keep_errors: true
routes: ['/users/{id}']
";

    fn resolve(file: Option<&str>, e: &dyn Fn(&str) -> Option<String>, cli: &Overrides) -> Config {
        Config::resolve(file.map(|t| (Path::new("test.yaml"), t)), e, cli).unwrap()
    }

    #[test]
    fn defaults_trace_everything_into_the_embedded_ui() {
        let c = resolve(None, &env(&[]), &vec![]);
        assert_eq!(c, Config::default());
        assert!(c.select.is_empty() && c.exclude.is_empty());
        assert_eq!(c.export_mode(), ExportMode::Embedded);
        assert_eq!(c.sampling.sampler, "parentbased_always_on");
    }

    #[test]
    fn the_file_overrides_defaults() {
        let c = resolve(Some(FILE), &env(&[]), &vec![]);
        assert_eq!(c.select.exe, ["/usr/bin/python3*"]);
        assert_eq!(c.select.ports, ["8000-8999"]);
        assert_eq!(c.exclude.pids, [1]);
        assert_eq!(c.export.endpoint.as_deref(), Some("http://file:4318"));
        assert_eq!(c.export_mode(), ExportMode::Otlp);
        assert_eq!(c.sampling.arg, Some(0.5));
        assert!(c.sampling.keep_errors);
        // Untouched settings keep their defaults.
        assert_eq!(c.capture.ring_mib, 4);
        assert_eq!(c.export.ui_max_traces, 1000);
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let e = env(&[
            ("WIRESPAN_SELECT_EXE", "/opt/*/bin/*, /usr/sbin/nginx"),
            ("WIRESPAN_SAMPLING_KEEP_ERRORS", "false"),
            ("WIRESPAN_CAPTURE_RING_MIB", "64"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("WIRESPAN_EXCLUDE_PIDS", "7,8"),
        ]);
        let c = resolve(Some(FILE), &e, &vec![]);
        assert_eq!(c.select.exe, ["/opt/*/bin/*", "/usr/sbin/nginx"]);
        assert_eq!(
            c.select.ports,
            ["8000-8999"],
            "not named in the environment"
        );
        assert!(!c.sampling.keep_errors);
        assert_eq!(c.capture.ring_mib, 64);
        assert_eq!(c.export.endpoint.as_deref(), Some("http://env:4317"));
        assert_eq!(c.export.protocol.as_deref(), Some("grpc"), "from the file");
        assert_eq!(c.sampling.arg, Some(0.25));
        assert_eq!(c.sampling.sampler, "traceidratio");
        assert_eq!(c.exclude.pids, [7, 8]);
    }

    #[test]
    fn wirespan_names_win_over_opentelemetry_names() {
        let e = env(&[
            ("OTEL_TRACES_SAMPLER", "always_off"),
            ("WIRESPAN_SAMPLING_SAMPLER", "always_on"),
        ]);
        assert_eq!(resolve(None, &e, &vec![]).sampling.sampler, "always_on");
    }

    #[test]
    fn the_command_line_overrides_everything() {
        let e = env(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://env:4318/v1/traces",
            ),
            ("WIRESPAN_SELECT_PORTS", "9000"),
        ]);
        let cli: Overrides = vec![
            ("export.endpoint", Value::from("http://cli:4318")),
            ("select.ports", serde_json::json!(["80", "443"])),
            ("sampling.sampler", Value::from("always_off")),
        ];
        let c = resolve(Some(FILE), &e, &cli);
        assert_eq!(c.export.endpoint.as_deref(), Some("http://cli:4318"));
        assert_eq!(
            c.export.traces_endpoint, None,
            "the flag's endpoint is the one used"
        );
        assert_eq!(c.select.ports, ["80", "443"]);
        assert_eq!(c.select.exe, ["/usr/bin/python3*"]);
        assert_eq!(c.sampling.sampler, "always_off");
    }

    #[test]
    fn mistakes_are_named() {
        let err = |file: Option<&str>, e: &'static [(&'static str, &'static str)]| {
            let e = env(e);
            format!(
                "{:#}",
                Config::resolve(file.map(|t| (Path::new("f.yaml"), t)), &e, &vec![]).unwrap_err()
            )
        };
        assert!(err(Some("selct:\n  exe: [a]\n"), &[]).contains("unknown field `selct`"));
        assert!(err(Some("select: [\n"), &[]).contains("not valid YAML"));
        assert!(err(Some("capture:\n  ring_mib: 3\n"), &[]).contains("power of two"));
        assert!(err(None, &[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("sometimes"));
        assert!(err(None, &[("OTEL_TRACES_SAMPLER_ARG", "half")]).contains("not a number"));
        assert!(err(None, &[("WIRESPAN_SELECT_PORTS", "80-70")]).contains("80-70"));
        assert!(err(None, &[("WIRESPAN_EXCLUDE_PIDS", "x")]).contains("not a process id"));
        assert!(err(Some("routes: ['/a/{']\n"), &[]).contains("/a/{"));
        assert!(err(Some("sampling:\n  arg: half\n"), &[]).contains("not a number"));
    }

    #[test]
    fn numbers_may_come_as_strings() {
        let c = resolve(
            Some("sampling:\n  arg: '0.1'\nexclude:\n  pids: ['7']\n"),
            &env(&[]),
            &vec![],
        );
        assert_eq!(c.sampling.arg, Some(0.1));
        assert_eq!(c.exclude.pids, [7]);
    }

    #[test]
    fn printing_and_reading_back_gives_the_same_configuration() {
        let c = resolve(Some(FILE), &env(&[]), &vec![]);
        let text = c.to_yaml();
        assert_eq!(resolve(Some(&text), &env(&[]), &vec![]), c);
    }

    #[test]
    fn every_setting_has_an_environment_variable() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut all = Vec::new();
        leaves("", &defaults, &mut all);
        let names: std::collections::HashSet<String> =
            all.iter().map(|(p, _)| env_name(p)).collect();
        assert!(names.contains("WIRESPAN_SELECT_K8S_LABELS"));
        assert!(names.contains("WIRESPAN_TELEMETRY_ADDRESS"));
        assert!(names.contains("WIRESPAN_KUBERNETES_NODE_NAME"));
        assert!(
            names.contains("WIRESPAN_CAPTURE_BYTES"),
            "the name the flag documents"
        );
        // No two settings share a variable.
        assert_eq!(names.len(), all.len());
    }
}
