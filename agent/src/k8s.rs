//! Pod metadata from the Kubernetes API server: a list, then a watch, of the pods scheduled on
//! this node only (`fieldSelector=spec.nodeName=NODE`), with the pod's service account. Pods
//! are indexed by container id and pod UID for [`crate::identity`].

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::identity::{Pod, Pods};

const ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Makes ring the process's TLS crypto provider (the OTLP exporter's HTTP client and the API
/// server client share rustls). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client of the API server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token_file: std::path::PathBuf,
}

impl Client {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's
    /// CA and token.
    pub fn in_cluster() -> anyhow::Result<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set (not running in a pod)")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let ca = std::fs::read(Path::new(ACCOUNT).join("ca.crt"))
            .with_context(|| format!("reading {ACCOUNT}/ca.crt"))?;
        Self::new(
            format!("https://{host}:{port}"),
            &ca,
            Path::new(ACCOUNT).join("token"),
        )
    }

    pub fn new(
        base: String,
        ca_pem: &[u8],
        token_file: std::path::PathBuf,
    ) -> anyhow::Result<Self> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.context("the cluster CA certificate")?)
                .context("the cluster CA certificate")?;
        }
        if roots.is_empty() {
            anyhow::bail!("no certificate in the cluster CA file");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("the API server client")?;
        Ok(Self {
            http,
            base,
            token_file,
        })
    }

    async fn get(&self, path_and_query: &str) -> anyhow::Result<reqwest::Response> {
        // Bound service account tokens rotate: read the file for each request.
        let token = std::fs::read_to_string(&self.token_file).unwrap_or_default();
        let mut req = self.http.get(format!("{}{path_and_query}", self.base));
        if !token.trim().is_empty() {
            req = req.bearer_auth(token.trim());
        }
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!(
                "GET {path_and_query}: {status}: {}",
                body.chars().take(300).collect::<String>()
            );
        }
        Ok(resp)
    }
}

/// Reads a pod object of the API (`v1.Pod` as JSON).
pub fn pod_from_json(v: &Value) -> Option<Pod> {
    let meta = v.get("metadata")?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let map = |v: Option<&Value>| -> Vec<(String, String)> {
        v.and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let owner = meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .and_then(|refs| {
            refs.iter()
                .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
                .or_else(|| refs.first())
        })
        .map(|r| (s(r.get("kind")), s(r.get("name"))));
    let status = v.get("status");
    let mut containers = Vec::new();
    for key in [
        "containerStatuses",
        "initContainerStatuses",
        "ephemeralContainerStatuses",
    ] {
        for c in status
            .and_then(|st| st.get(key))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // "containerd://<id>", "cri-o://<id>", "docker://<id>".
            let id = s(c.get("containerID"));
            if let Some((_, id)) = id.split_once("://")
                && !id.is_empty()
            {
                containers.push((id.to_ascii_lowercase(), s(c.get("name"))));
            }
        }
    }
    let uid = s(meta.get("uid"));
    if uid.is_empty() {
        return None;
    }
    Some(Pod {
        uid,
        name: s(meta.get("name")),
        namespace: s(meta.get("namespace")),
        node: s(v.get("spec").and_then(|sp| sp.get("nodeName"))),
        labels: map(meta.get("labels")),
        annotations: map(meta.get("annotations")),
        owner,
        containers,
    })
}

/// One line of a watch stream: what to do with the index.
#[derive(Debug, PartialEq)]
pub enum WatchEvent {
    Upsert(Pod, String),
    Delete(String, String),
    /// The resource version is too old (410): list again.
    Expired,
    Bookmark(String),
    Other,
}

pub fn watch_event(line: &[u8]) -> WatchEvent {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return WatchEvent::Other;
    };
    let obj = v.get("object");
    let version = obj
        .and_then(|o| o.get("metadata"))
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match v.get("type").and_then(Value::as_str) {
        Some("ADDED" | "MODIFIED") => match obj.and_then(pod_from_json) {
            Some(p) => WatchEvent::Upsert(p, version),
            None => WatchEvent::Other,
        },
        Some("DELETED") => match obj.and_then(pod_from_json) {
            Some(p) => WatchEvent::Delete(p.uid, version),
            None => WatchEvent::Other,
        },
        Some("BOOKMARK") => WatchEvent::Bookmark(version),
        Some("ERROR") => {
            if obj.and_then(|o| o.get("code")).and_then(Value::as_u64) == Some(410) {
                WatchEvent::Expired
            } else {
                WatchEvent::Other
            }
        }
        _ => WatchEvent::Other,
    }
}

fn field_selector(node: &str) -> String {
    let mut out = String::from("spec.nodeName%3D");
    for b in node.bytes() {
        if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Lists this node's pods, then follows the watch; relists when the watch expires or fails.
pub fn spawn_watch(client: Client, node: String, pods: Arc<Pods>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match list_and_watch(&client, &node, &pods).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    log::warn!("Kubernetes pod metadata: {e:#}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}

async fn list_and_watch(client: &Client, node: &str, pods: &Pods) -> anyhow::Result<()> {
    let selector = field_selector(node);
    let body = client
        .get(&format!("/api/v1/pods?fieldSelector={selector}"))
        .await?
        .bytes()
        .await?;
    let list: Value = serde_json::from_slice(&body).context("the pod list")?;
    let items: Vec<Pod> = list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(pod_from_json)
        .collect();
    log::info!("Kubernetes: {} pods on node {node}", items.len());
    pods.replace(items);
    let mut version = list
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    loop {
        let mut resp = client
            .get(&format!(
                "/api/v1/pods?fieldSelector={selector}&watch=1&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={version}"
            ))
            .await?;
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                match watch_event(&line) {
                    WatchEvent::Upsert(p, v) => {
                        pods.upsert(p);
                        version = v;
                    }
                    WatchEvent::Delete(uid, v) => {
                        pods.remove(&uid);
                        version = v;
                    }
                    WatchEvent::Bookmark(v) => version = v,
                    WatchEvent::Expired => return Ok(()),
                    WatchEvent::Other => {}
                }
            }
            if buf.len() > 16 << 20 {
                anyhow::bail!("a watch event over 16 MiB");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as `kubectl get pod -o json` prints it (trimmed to the fields read).
    const POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {
        "name": "orders-7d9f8b6c5-x2x4q", "namespace": "shop",
        "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "resourceVersion": "123456",
        "labels": {"app.kubernetes.io/name": "orders", "pod-template-hash": "7d9f8b6c5"},
        "annotations": {"resource.opentelemetry.io/service.name": "orders-api"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "name": "orders-7d9f8b6c5", "uid": "x", "controller": true, "blockOwnerDeletion": true}]
      },
      "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "orders:1"}]},
      "status": {
        "phase": "Running",
        "initContainerStatuses": [{"name": "migrate",
          "containerID": "containerd://aaaa9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"}],
        "containerStatuses": [{"name": "app", "ready": true,
          "containerID": "containerd://3F2A9C1B7D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8"},
          {"name": "sidecar", "ready": false}]
      }
    }"#;

    #[test]
    fn pods_from_the_api() {
        let pod = pod_from_json(&serde_json::from_str(POD).unwrap()).unwrap();
        assert_eq!(pod.name, "orders-7d9f8b6c5-x2x4q");
        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.node, "node-1");
        assert_eq!(
            pod.owner,
            Some(("ReplicaSet".into(), "orders-7d9f8b6c5".into()))
        );
        assert_eq!(pod.workload(), Some(("deployment", "orders".into())));
        assert_eq!(
            pod.container_name("3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"),
            Some("app"),
            "ids are matched in lower case"
        );
        assert_eq!(
            pod.containers.len(),
            2,
            "a container not started has no id yet"
        );
        assert_eq!(pod.label("app.kubernetes.io/name"), Some("orders"));
    }

    #[test]
    fn watch_lines() {
        let line = |t: &str| format!("{{\"type\":\"{t}\",\"object\":{POD}}}").replace('\n', " ");
        match watch_event(line("ADDED").as_bytes()) {
            WatchEvent::Upsert(p, v) => {
                assert_eq!(p.namespace, "shop");
                assert_eq!(v, "123456");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            watch_event(line("DELETED").as_bytes()),
            WatchEvent::Delete(uid, _) if uid == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
        ));
        let expired = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","message":"too old resource version: 1 (2)","reason":"Expired","code":410}}"#;
        assert_eq!(watch_event(expired), WatchEvent::Expired);
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"999"}}}"#;
        assert_eq!(watch_event(bookmark), WatchEvent::Bookmark("999".into()));
        assert_eq!(watch_event(b"not json"), WatchEvent::Other);
    }

    #[test]
    fn node_names_are_escaped() {
        assert_eq!(
            field_selector("node-1.example"),
            "spec.nodeName%3Dnode-1.example"
        );
        assert_eq!(field_selector("a&b=c"), "spec.nodeName%3Da%26b%3Dc");
    }

    #[test]
    fn a_client_needs_a_certificate() {
        let err = Client::new("https://x".into(), b"", "/nonexistent".into())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
