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
fn chart_without_nats_dependency(into: &Path) -> PathBuf {
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

fn succeeded(what: &str, output: &std::process::Output) -> String {
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
