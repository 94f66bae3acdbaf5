//! The Helm chart installed into a real API server (which validates every
//! object server-side), and the operator's ServiceAccount checked with
//! `kubectl auth can-i`: what it uses, and nothing more.
//!
//! Nothing runs the pods (no kubelet here); the operator's behaviour under
//! its own permissions is covered by running it with this ServiceAccount.

use std::path::{Path, PathBuf};

use herald_testkit::ControlPlane;

const NAMESPACE: &str = "herald";
const OPERATOR: &str = "system:serviceaccount:herald:herald-operator";

/// A copy of the chart without the optional NATS dependency, which would
/// have to be downloaded (`helm dependency build`) before helm renders it.
pub(crate) fn chart_without_nats_dependency(into: &Path) -> PathBuf {
    let source = herald_testkit::workspace_root().join("deploy/helm/herald");
    let chart = into.join("herald");
    copy_dir(&source, &chart);
    let manifest = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .scan(false, |in_dependencies, line| {
            if line.starts_with("dependencies:") {
                *in_dependencies = true;
            } else if *in_dependencies && !line.starts_with(' ') && !line.starts_with('-') {
                *in_dependencies = false;
            }
            Some((!*in_dependencies).then_some(line))
        })
        .flatten()
        .collect();
    std::fs::write(&manifest, kept.join("\n")).unwrap();
    chart
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub(crate) fn succeeded(what: &str, output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_chart_installs_and_the_operator_may_do_what_it_needs_and_no_more() {
    let cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().unwrap();
    let chart = chart_without_nats_dependency(dir.path());
    let install = cp.helm([
        "install",
        "herald",
        &chart.display().to_string(),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "nats.url=nats://nats.herald.svc:4222",
    ]);
    let notes = succeeded("helm install", &install);
    assert!(
        notes.contains("WebhookEndpoint"),
        "NOTES.txt says what to do next:\n{notes}"
    );
    let deployments = succeeded(
        "kubectl get deployments",
        &cp.kubectl(["get", "deployments", "-n", NAMESPACE, "-o", "name"]),
    );
    for role in [
        "api",
        "worker-tasks",
        "worker-webhooks",
        "worker-mail",
        "operator",
    ] {
        assert!(
            deployments.contains(&format!("deployment.apps/herald-{role}")),
            "{deployments}"
        );
    }
    succeeded(
        "the CRD from the chart",
        &cp.kubectl(["get", "crd", "webhookendpoints.herald.dev"]),
    );

    // "yes" or "no" from kubectl; anything else (a typo in a resource, an
    // unreachable server) fails the test rather than counting as "no".
    let can = |args: &[&str]| {
        let mut full = vec!["auth", "can-i", "--as", OPERATOR];
        full.extend_from_slice(args);
        let output = cp.kubectl(&full);
        match String::from_utf8_lossy(&output.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => panic!(
                "kubectl auth can-i {args:?} answered {other:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    };
    let own_namespace = format!("namespaces/{NAMESPACE}");
    let may = [
        &["watch", "webhookendpoints.herald.dev", "-n", NAMESPACE][..],
        &["patch", "webhookendpoints.herald.dev", "-n", NAMESPACE],
        &[
            "patch",
            "webhookendpoints.herald.dev/status",
            "-n",
            NAMESPACE,
        ],
        &["get", "secrets", "-n", NAMESPACE],
        &["watch", "secrets", "-n", NAMESPACE],
        &["create", "secrets", "-n", NAMESPACE],
        &["create", "events.events.k8s.io", "-n", NAMESPACE],
        &["create", "leases.coordination.k8s.io", "-n", NAMESPACE],
        // Its own Lease, watched by name while it waits to lead.
        &[
            "watch",
            "leases.coordination.k8s.io/herald-operator",
            "-n",
            NAMESPACE,
        ],
        // Tenancy grants: the herald.dev/users annotation of its Namespace.
        &["get", &own_namespace],
        &["watch", &own_namespace],
    ];
    for args in may {
        assert!(can(args), "the operator may not {args:?}");
    }
    let may_not = [
        &["delete", "secrets", "-n", NAMESPACE][..],
        &["update", "secrets", "-n", NAMESPACE],
        &["get", "secrets", "-n", "kube-system"],
        &["create", "secrets", "-n", "default"],
        &["patch", "webhookendpoints.herald.dev", "-n", "default"],
        &["create", "deployments.apps", "-n", NAMESPACE],
        &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
        &["update", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["watch", "leases.coordination.k8s.io", "-n", NAMESPACE],
        &["*", "*", "--all-namespaces"],
        // Grants are the admin's: read only, and only the watched namespace.
        &["patch", &own_namespace],
        &["get", "namespaces/kube-system"],
    ];
    for args in may_not {
        assert!(!can(args), "the operator may {args:?}");
    }

    succeeded(
        "helm uninstall",
        &cp.helm(["uninstall", "herald", "--namespace", NAMESPACE]),
    );
}

/// What the Kubernetes tests install, as the API server takes it: the test
/// NATS (three servers on local volumes), the mail sink and receiver pods,
/// and the chart with the test cluster's values (local images never
/// pulled, a NodePort API Service, two operator replicas). The API server
/// validates every object and allocates the node port; the pods themselves
/// run in the cluster tests.
#[tokio::test]
async fn the_test_cluster_objects_are_accepted_with_local_images_and_a_node_port() {
    let images = herald_testkit::Images::load();
    let cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().unwrap();
    succeeded(
        "kubectl create namespace",
        &cp.kubectl(["create", "namespace", NAMESPACE]),
    );

    let objects = dir.path().join("objects.yaml");
    let volumes = herald_testkit::local_volumes("node-1", &dir.path().join("volumes"), 3, "4Gi");
    let sinks = herald_testkit::sinks_manifest(&images, NAMESPACE);
    std::fs::write(&objects, format!("{volumes}---\n{sinks}")).unwrap();
    succeeded(
        "kubectl apply of the volumes and sinks",
        &cp.kubectl(["apply", "-f", &objects.display().to_string()]),
    );
    for i in 0..3 {
        let volume = dir.path().join(format!("volumes/nats-{i}"));
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&volume).unwrap());
        assert_eq!(owner, herald_testkit::IMAGE_USER, "{}", volume.display());
    }

    let mut nats = vec![
        "install".to_string(),
        "nats".to_string(),
        herald_testkit::nats_chart().display().to_string(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
    ];
    nats.extend(herald_testkit::nats_chart_values(images.nats_server(), 3));
    succeeded("helm install of the test NATS", &cp.helm(&nats));
    let statefulset = succeeded(
        "kubectl get statefulset nats",
        &cp.kubectl(["get", "statefulset", "nats", "-n", NAMESPACE, "-o", "json"]),
    );
    let statefulset: serde_json::Value = serde_json::from_str(&statefulset).unwrap();
    assert_eq!(statefulset["spec"]["replicas"], 3);
    assert_eq!(
        statefulset["spec"]["template"]["spec"]["containers"][0]["image"],
        images.nats_server().reference.as_str()
    );
    assert_eq!(
        statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        herald_testkit::LOCAL_STORAGE_CLASS
    );

    let chart = chart_without_nats_dependency(dir.path());
    let values = chart.join("ci/test-cluster-values.yaml");
    let herald = images.herald();
    succeeded(
        "helm install with the test cluster's values",
        &cp.helm([
            "install",
            "herald",
            &chart.display().to_string(),
            "--namespace",
            NAMESPACE,
            "-f",
            &values.display().to_string(),
            "--set",
            &format!("image.repository={}", herald.repository()),
            "--set",
            &format!("image.tag={}", herald.tag()),
        ]),
    );
    let deployments = succeeded(
        "kubectl get deployments",
        &cp.kubectl(["get", "deployments", "-n", NAMESPACE, "-o", "json"]),
    );
    let deployments: serde_json::Value = serde_json::from_str(&deployments).unwrap();
    let mut herald_pods = 0;
    for deployment in deployments["items"].as_array().unwrap() {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["imagePullPolicy"], "Never", "{name}");
        if name.starts_with("herald-") {
            herald_pods += 1;
            assert_eq!(container["image"], herald.reference.as_str(), "{name}");
        }
        if name == "herald-operator" {
            assert_eq!(deployment["spec"]["replicas"], 2, "a leader and a standby");
        }
    }
    assert_eq!(herald_pods, 5);
    let service = succeeded(
        "kubectl get service herald-api",
        &cp.kubectl([
            "get",
            "service",
            "herald-api",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ]),
    );
    let service: serde_json::Value = serde_json::from_str(&service).unwrap();
    assert_eq!(service["spec"]["type"], "NodePort");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!(
        (30000..=32767).contains(&node_port),
        "the API server allocated a node port: {node_port}"
    );
}
