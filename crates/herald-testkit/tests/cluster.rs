//! The test cluster is a real one: its node is Ready, pods from a local
//! image run non-root on a read-only root filesystem on the pod network,
//! reach a Service by its DNS name through CoreDNS and kube-proxy, a
//! NodePort answers from the host, and nothing a pod sends leaves the
//! machine. When it is dropped, nothing of it is left.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use herald_testkit::{Cluster, NODE_NAME, TEST_POD_IMAGE, http_client};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;
use serde_json::{Value, json};

/// What the kubelet, libcni and containerd make at fixed paths.
const FIXED_PATHS: [&str; 4] = [
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/lib/cni",
    "/sys/fs/cgroup/cpu/k8s.io",
];
const POD_DEADLINE: Duration = Duration::from_secs(90);
/// TEST-NET-3 (RFC 5737): nobody's address, and not this machine's network
/// (which may be TEST-NET-1).
const OUTSIDE: &str = "203.0.113.7:80";

/// A pod of the test image running `args`, as locked down as Herald's pods
/// are: non-root, read-only root filesystem, no capabilities, no privilege
/// escalation; the image imported, never pulled.
fn pod(name: &str, labels: Value, args: &[&str], restart: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default", "labels": labels },
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
            },
            "containers": [{
                "name": "main",
                "image": TEST_POD_IMAGE,
                "imagePullPolicy": "Never",
                "args": args,
                "securityContext": {
                    "readOnlyRootFilesystem": true,
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                },
            }],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_cluster_runs_pods_serves_services_by_name_and_keeps_traffic_inside() {
    // Paths outside its directory the cluster removes again if it made them.
    let fixed_paths_before: Vec<&str> = FIXED_PATHS
        .into_iter()
        .filter(|path| std::path::Path::new(path).exists())
        .collect();
    let started = Instant::now();
    let cluster = Cluster::start().await;
    eprintln!("bring-up took {:.1?}", started.elapsed());
    let dir = cluster.dir().to_path_buf();
    let client = cluster.client().await;

    let node = Api::<Node>::all(client.clone())
        .get(NODE_NAME)
        .await
        .expect("the node is registered");
    let conditions = node
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "node {NODE_NAME} is Ready: {conditions:#?}"
    );

    // A server pod behind one Service, which has a ClusterIP and a NodePort.
    let mut web = pod(
        "web",
        json!({ "app": "web" }),
        &["serve", ":8080", "hello from web"],
        "Always",
    );
    web["spec"]["containers"][0]["readinessProbe"] =
        json!({ "httpGet": { "path": "/", "port": 8080 }, "periodSeconds": 1 });
    cluster.apply(&web.to_string());
    cluster.apply(
        &json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "type": "NodePort",
                "selector": { "app": "web" },
                "ports": [{ "port": 80, "targetPort": 8080 }],
            },
        })
        .to_string(),
    );
    let web = cluster
        .wait_for_pod_ready("default", "web", POD_DEADLINE)
        .await;
    let web_ip = web
        .status
        .and_then(|status| status.pod_ip)
        .expect("the pod has an address");
    assert!(
        web_ip.starts_with("10.77.0."),
        "the pod is on the pod network, not the host's: {web_ip}"
    );

    // The host reaches the NodePort on the node's address, once kube-proxy
    // has programmed the web pod as the Service's endpoint (it follows the
    // pod's readiness a moment later; until then the Service refuses).
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get("web")
        .await
        .expect("the Service exists");
    let node_port = service
        .spec
        .and_then(|spec| spec.ports)
        .and_then(|ports| ports.first().and_then(|port| port.node_port))
        .expect("the Service has a NodePort");
    let url = format!("http://{}:{node_port}/", cluster.node_address());
    let body = herald_testkit::wait_until(
        "the NodePort to answer from the host",
        POD_DEADLINE,
        || async {
            let response = http_client()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            response.text().await.ok()
        },
    )
    .await;
    assert_eq!(body, "hello from web", "the NodePort answers from the host");

    // Another pod finds it by name (CoreDNS) and reaches it through its
    // ClusterIP (the same kube-proxy rules, now programmed).
    cluster.apply(
        &pod(
            "client",
            json!({ "app": "client" }),
            &["get", "http://web.default.svc.cluster.local/"],
            "Never",
        )
        .to_string(),
    );
    let (code, message) = cluster
        .wait_for_pod_exit("default", "client", POD_DEADLINE)
        .await;
    assert_eq!(
        (code, message.as_str()),
        (0, "hello from web"),
        "the client pod reached the Service by its DNS name"
    );

    // A pod trying an address outside the machine is stopped on the host,
    // at once, by the isolation rule (its counter moves), not by a timeout.
    let rejected_before = cluster.rejected_pod_packets();
    cluster.apply(
        &pod(
            "escape",
            json!({ "app": "escape" }),
            &["dial", OUTSIDE],
            "Never",
        )
        .to_string(),
    );
    let (code, message) = cluster
        .wait_for_pod_exit("default", "escape", POD_DEADLINE)
        .await;
    assert_eq!(code, 1, "the connection to {OUTSIDE} failed: {message}");
    assert!(
        message.contains("no route to host"),
        "the host rejected it rather than letting it time out: {message}"
    );
    assert!(
        cluster.rejected_pod_packets() > rejected_before,
        "the isolation rule rejected the packet ({message})"
    );

    // Cluster DNS answers for the cluster only: any other name is refused,
    // not forwarded to the host's resolver.
    assert!(
        cluster
            .resolve("kubernetes.default.svc.cluster.local")
            .await
            .is_some_and(|addresses| !addresses.is_empty()),
        "CoreDNS answers for the kubernetes Service"
    );
    assert_eq!(
        cluster.resolve("example.com").await,
        None,
        "CoreDNS answers nothing outside the cluster zone"
    );

    let stopping = Instant::now();
    drop(cluster);
    eprintln!("teardown took {:.1?}", stopping.elapsed());
    assert_nothing_left(&dir, &fixed_paths_before);
}

/// The bridge, kube-proxy's and our chains, the directory and every
/// process naming it are gone.
fn assert_nothing_left(dir: &std::path::Path, fixed_paths_before: &[&str]) {
    let link = Command::new("ip")
        .args(["link", "show", "herald0"])
        .output()
        .expect("ip runs");
    assert!(!link.status.success(), "the bridge is gone");
    for program in ["iptables-save", "ip6tables-save"] {
        let rules = Command::new(program).output().expect("iptables-save runs");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            !rules.contains("KUBE-") && !rules.contains("HERALD-"),
            "no cluster chains are left ({program}):\n{rules}"
        );
    }
    for fixed in FIXED_PATHS
        .into_iter()
        .filter(|path| !fixed_paths_before.contains(path))
    {
        assert!(!std::path::Path::new(fixed).exists(), "{fixed} is removed");
    }
    let results = std::fs::read_dir("/var/lib/cni/results")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("herald-test-"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(results.is_empty(), "no CNI results are cached: {results:?}");
    assert!(!dir.exists(), "{} is removed", dir.display());
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmdline).contains(&needle),
                "process {:?} outlived the cluster: {}",
                entry.file_name(),
                String::from_utf8_lossy(&cmdline)
            );
        }
    }
}
