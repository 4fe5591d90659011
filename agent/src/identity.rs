//! Who a process is: its container (from its cgroup), its Kubernetes pod, and the service name
//! the OpenTelemetry operator would give it.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

/// The cgroup path to match rules against: the unified (v2) hierarchy's, else a v1 hierarchy
/// that every container runtime sets (pids, memory, cpu, the systemd name), else the first.
pub fn cgroup_path(cgroup_file: &str) -> String {
    let mut lines: Vec<(&str, &str)> = Vec::new();
    for line in cgroup_file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        lines.push((controllers, path));
    }
    if let Some((_, p)) = lines.iter().find(|(c, _)| c.is_empty()) {
        // A v2 line in a hybrid system is "/" when only v1 controllers hold the container.
        if *p != "/" || lines.len() == 1 {
            return p.to_string();
        }
    }
    for wanted in ["pids", "memory", "cpu", "name=systemd"] {
        if let Some((_, p)) = lines
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == wanted))
        {
            return p.to_string();
        }
    }
    lines
        .first()
        .map(|(_, p)| p.to_string())
        .unwrap_or_default()
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id in a cgroup path: the last segment that is, or ends in, 64 hex digits
/// (`/docker/<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`, `/kubepods/.../pod<uid>/<id>`). CRI-O's `crio-conmon-<id>` is the
/// container's monitor process, not the container.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    cgroup_path.rsplit('/').find_map(|segment| {
        let s = segment.strip_suffix(".scope").unwrap_or(segment);
        if s.contains("conmon") {
            return None;
        }
        let candidate = s.rsplit(['-', ':']).next().unwrap_or(s);
        is_container_id(candidate).then(|| candidate.to_ascii_lowercase())
    })
}

/// The pod UID in a Kubernetes cgroup path: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _>.slice` (systemd driver).
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').find_map(|segment| {
        let s = segment.strip_suffix(".slice").unwrap_or(segment);
        let at = s.rfind("pod")?;
        let uid = s[at + 3..].replace('_', "-");
        let ok = uid.len() == 36
            && uid.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        ok.then_some(uid)
    })
}

/// What Kubernetes says about one pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// The controller: (kind, name), with a ReplicaSet made of a Deployment named as such.
    pub owner: Option<(String, String)>,
    /// (container id, container name) of each container that runs or ran.
    pub containers: Vec<(String, String)>,
}

impl Pod {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|(id, _)| id == container_id)
            .map(|(_, n)| n.as_str())
    }

    /// Deployment, StatefulSet, DaemonSet, CronJob or Job that owns the pod, as
    /// (kind, name). A ReplicaSet's Deployment is its name without the pod-template hash; a
    /// Job's CronJob its name without the schedule suffix (both as the operator derives them).
    pub fn workload(&self) -> Option<(&'static str, String)> {
        let (kind, name) = self.owner.as_ref()?;
        let strip_suffix = |n: &str| match n.rsplit_once('-') {
            Some((base, suffix))
                if !base.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Some(base.to_string())
            }
            _ => None,
        };
        match kind.as_str() {
            "ReplicaSet" => strip_suffix(name).map(|n| ("deployment", n)),
            "Deployment" => Some(("deployment", name.clone())),
            "StatefulSet" => Some(("statefulset", name.clone())),
            "DaemonSet" => Some(("daemonset", name.clone())),
            "Job" => match strip_suffix(name) {
                Some(base) if name[base.len() + 1..].bytes().all(|b| b.is_ascii_digit()) => {
                    Some(("cronjob", base))
                }
                _ => Some(("job", name.clone())),
            },
            "CronJob" => Some(("cronjob", name.clone())),
            _ => None,
        }
    }
}

/// The pods of this node, filled by the Kubernetes watcher, read when a process is first seen.
#[derive(Debug, Default)]
pub struct Pods {
    inner: RwLock<PodIndex>,
}

#[derive(Debug, Default)]
struct PodIndex {
    by_uid: HashMap<String, Arc<Pod>>,
    by_container: HashMap<String, Arc<Pod>>,
    /// The watch has listed the node's pods at least once.
    synced: bool,
}

impl Pods {
    pub fn upsert(&self, pod: Pod) {
        let pod = Arc::new(pod);
        let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = idx.by_uid.insert(pod.uid.clone(), pod.clone()) {
            for (id, _) in &old.containers {
                idx.by_container.remove(id);
            }
        }
        for (id, _) in &pod.containers {
            idx.by_container.insert(id.clone(), pod.clone());
        }
    }

    pub fn remove(&self, uid: &str) {
        let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = idx.by_uid.remove(uid) {
            for (id, _) in &old.containers {
                idx.by_container.remove(id);
            }
        }
    }

    /// Replaces everything (a fresh list).
    pub fn replace(&self, pods: Vec<Pod>) {
        {
            let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
            idx.by_uid.clear();
            idx.by_container.clear();
            idx.synced = true;
        }
        for p in pods {
            self.upsert(p);
        }
    }

    pub fn synced(&self) -> bool {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).synced
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_uid
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pod of a process, by container id, else by the pod UID in its cgroup.
    pub fn find(&self, container_id: Option<&str>, pod_uid: Option<&str>) -> Option<Arc<Pod>> {
        let idx = self.inner.read().unwrap_or_else(|e| e.into_inner());
        container_id
            .and_then(|id| idx.by_container.get(id))
            .or_else(|| pod_uid.and_then(|u| idx.by_uid.get(u)))
            .cloned()
    }
}

/// `service.name` by the OpenTelemetry operator's rules, first found wins: the process's
/// `OTEL_SERVICE_NAME` or `service.name` in `OTEL_RESOURCE_ATTRIBUTES` (`from_process`), the pod
/// annotation `resource.opentelemetry.io/service.name`, the label `app.kubernetes.io/name`,
/// the owning workload, the pod, the container, the executable.
pub fn service_name(
    from_process: Option<&str>,
    pod: Option<&Pod>,
    container: Option<&str>,
    executable: &str,
) -> String {
    let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    from_process
        .and_then(nonempty)
        .or_else(|| {
            let pod = pod?;
            pod.annotation("resource.opentelemetry.io/service.name")
                .and_then(nonempty)
                .or_else(|| pod.label("app.kubernetes.io/name").and_then(nonempty))
                .or_else(|| pod.workload().map(|(_, n)| n))
                .or_else(|| nonempty(&pod.name))
        })
        .or_else(|| container.and_then(nonempty))
        .unwrap_or_else(|| executable.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    /// /proc/PID/cgroup as written by real hosts of each runtime (ids replaced by `ID`).
    fn samples() -> Vec<(&'static str, String, Option<&'static str>)> {
        vec![
            (
                "docker, cgroup v1",
                format!(
                    "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n10:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
                ),
                None,
            ),
            (
                "docker, cgroup v2, systemd driver",
                format!("0::/system.slice/docker-{ID}.scope\n"),
                None,
            ),
            (
                "docker, cgroup v2, cgroupfs driver (container's own namespace)",
                format!("0::/docker/{ID}\n"),
                None,
            ),
            (
                "containerd in Kubernetes, cgroup v1, cgroupfs driver",
                format!(
                    "11:memory:/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{ID}\n4:pids:/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{ID}\n"
                ),
                Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            ),
            (
                "containerd in Kubernetes, cgroup v2, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{ID}.scope\n"
                ),
                Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            ),
            (
                "cri-o, cgroup v2, systemd driver",
                format!(
                    "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/crio-{ID}.scope\n"
                ),
                Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            ),
            (
                "podman, cgroup v2",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
                ),
                None,
            ),
            (
                "containerd (nerdctl), cgroup v2",
                format!("0::/system.slice/nerdctl-{ID}.scope\n"),
                None,
            ),
            (
                "Amazon ECS, cgroup v1",
                format!("9:memory:/ecs/5a0d5ceddf6c44c1928d367a815d890f/{ID}\n"),
                None,
            ),
        ]
    }

    #[test]
    fn container_ids_of_every_runtime() {
        for (name, file, uid) in samples() {
            let path = cgroup_path(&file);
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{name}: {path}");
            assert_eq!(pod_uid(&path).as_deref(), uid, "{name}");
        }
    }

    #[test]
    fn no_container_outside_containers() {
        for file in [
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/system.slice/nginx.service\n",
            "0::/init.scope\n",
            "12:pids:/user.slice\n0::/user.slice/user-1000.slice\n",
            "",
            "garbage without colons\n",
            // CRI-O's monitor of a container is not the container.
            &format!("0::/kubepods.slice/crio-conmon-{ID}.scope\n"),
            // 63 hex digits.
            &format!("0::/docker/{}\n", &ID[1..]),
        ] {
            assert_eq!(container_id(&cgroup_path(file)), None, "{file:?}");
        }
    }

    #[test]
    fn the_unified_hierarchy_is_preferred() {
        let hybrid = format!("5:pids:/docker/{ID}\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            cgroup_path(&hybrid),
            format!("/system.slice/docker-{ID}.scope")
        );
        let v1_only = format!("5:pids:/docker/{ID}\n0::/\n");
        assert_eq!(cgroup_path(&v1_only), format!("/docker/{ID}"));
    }

    fn pod() -> Pod {
        Pod {
            uid: "u".into(),
            name: "orders-7d9f8b6c5-x2x4q".into(),
            namespace: "shop".into(),
            node: "n1".into(),
            labels: vec![],
            annotations: vec![],
            owner: Some(("ReplicaSet".into(), "orders-7d9f8b6c5".into())),
            containers: vec![(ID.into(), "app".into())],
        }
    }

    #[test]
    fn service_names_follow_the_operator_rules_in_order() {
        let mut p = pod();
        p.annotations.push((
            "resource.opentelemetry.io/service.name".into(),
            "ann".into(),
        ));
        p.labels
            .push(("app.kubernetes.io/name".into(), "label".into()));
        assert_eq!(
            service_name(Some("env"), Some(&p), Some("app"), "exe"),
            "env"
        );
        assert_eq!(service_name(Some(" "), Some(&p), Some("app"), "exe"), "ann");
        p.annotations.clear();
        assert_eq!(service_name(None, Some(&p), Some("app"), "exe"), "label");
        p.labels.clear();
        assert_eq!(service_name(None, Some(&p), Some("app"), "exe"), "orders");
        p.owner = None;
        assert_eq!(
            service_name(None, Some(&p), Some("app"), "exe"),
            "orders-7d9f8b6c5-x2x4q"
        );
        assert_eq!(service_name(None, None, Some("app"), "exe"), "app");
        assert_eq!(service_name(None, None, None, "exe"), "exe");
    }

    #[test]
    fn workloads_from_owners() {
        let with = |kind: &str, name: &str| {
            let mut p = pod();
            p.owner = Some((kind.into(), name.into()));
            p.workload()
        };
        assert_eq!(
            with("ReplicaSet", "orders-7d9f8b6c5"),
            Some(("deployment", "orders".into()))
        );
        assert_eq!(
            with("StatefulSet", "db"),
            Some(("statefulset", "db".into()))
        );
        assert_eq!(with("DaemonSet", "ds"), Some(("daemonset", "ds".into())));
        assert_eq!(
            with("Job", "report-28745880"),
            Some(("cronjob", "report".into()))
        );
        assert_eq!(with("Job", "migrate"), Some(("job", "migrate".into())));
        assert_eq!(with("Node", "n1"), None);
    }

    #[test]
    fn pods_are_found_by_container_then_uid() {
        let pods = Pods::default();
        pods.upsert(pod());
        assert_eq!(pods.find(Some(ID), None).unwrap().name, pod().name);
        assert_eq!(pods.find(None, Some("u")).unwrap().namespace, "shop");
        assert!(pods.find(Some("other"), None).is_none());
        pods.remove("u");
        assert!(pods.find(Some(ID), None).is_none());
        assert!(pods.is_empty());
    }
}
