//! The Kubernetes test control plane against itself: real etcd, real
//! kube-apiserver, real kubectl and helm from `make tools`.

use std::{process::Output, time::Duration};

use herald_testkit::ControlPlane;

/// Panics with what the command printed unless it succeeded; returns stdout.
fn succeeded(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the output is UTF-8")
}

#[tokio::test]
async fn kubectl_applies_and_reads_back_a_config_map_then_drop_stops_everything() {
    let plane = ControlPlane::start().await;

    // The server reports the clean version the install script stamps in
    // (helm parses it).
    let version = succeeded("kubectl version", plane.kubectl(["version", "-o", "json"]));
    let version: serde_json::Value = serde_json::from_str(&version).expect("version is JSON");
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.37.2");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.37.2");

    let manifest = tempfile::NamedTempFile::new().expect("cannot create a temporary file");
    std::fs::write(
        manifest.path(),
        "apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  name: herald-settings\n  namespace: default\n\
         data:\n  greeting: hello from herald\n",
    )
    .expect("cannot write the manifest");
    let applied = succeeded(
        "kubectl apply",
        plane.kubectl(["apply", "-f", manifest.path().to_str().expect("UTF-8 path")]),
    );
    assert_eq!(applied.trim(), "configmap/herald-settings created");

    let greeting = succeeded(
        "kubectl get",
        plane.kubectl([
            "get",
            "configmap",
            "herald-settings",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.greeting}",
        ]),
    );
    assert_eq!(greeting, "hello from herald");

    // Dropping stops both servers: their ports stop answering.
    let ports = ports_of(&plane);
    drop(plane);
    assert_nothing_listens(&ports).await;
}

#[tokio::test]
async fn a_panic_while_it_runs_still_stops_the_control_plane() {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let plane = ControlPlane::start().await;
        sender.send(ports_of(&plane)).expect("the test is waiting");
        panic!("a deliberate panic with the control plane running");
    });
    let failure = test.await.expect_err("the task panicked");
    assert!(failure.is_panic(), "the task ended by {failure}");
    let ports = receiver
        .await
        .expect("the task sent its ports before panicking");
    assert_nothing_listens(&ports).await;
}

/// The API server's and etcd's ports.
fn ports_of(plane: &ControlPlane) -> Vec<u16> {
    [plane.server_url(), plane.etcd_url().to_string()]
        .iter()
        .map(|url| {
            url.rsplit(':')
                .next()
                .and_then(|port| port.parse().ok())
                .unwrap_or_else(|| panic!("no port in {url}"))
        })
        .collect()
}

async fn assert_nothing_listens(ports: &[u16]) {
    for port in ports {
        let address = format!("127.0.0.1:{port}");
        assert!(
            tokio::net::TcpStream::connect(&address).await.is_err(),
            "something still listens on {address} after the control plane was dropped"
        );
    }
}

#[tokio::test]
async fn rbac_forbids_an_unprivileged_user_what_admin_and_a_bound_group_may_do() {
    let plane = ControlPlane::start().await;
    let can_list_secrets = |kubeconfig: &std::path::Path| {
        let output = plane.kubectl_as(kubeconfig, ["auth", "can-i", "list", "secrets"]);
        // `can-i` exits 0 for yes and 1 for no; anything else is an error.
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(
            matches!(output.status.code(), Some(0 | 1)),
            "kubectl auth can-i failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            output.status.success(),
            answer == "yes",
            "exit status and answer disagree: {answer}"
        );
        answer
    };

    assert_eq!(can_list_secrets(plane.kubeconfig_path()), "yes");

    let alice = plane.kubeconfig_for("alice", &[]);
    assert_eq!(can_list_secrets(&alice), "no");
    let listed = plane.kubectl_as(&alice, ["get", "secrets", "-n", "default"]);
    assert!(!listed.status.success(), "alice could list secrets");
    let refusal = String::from_utf8_lossy(&listed.stderr);
    assert!(
        refusal.contains("Forbidden") && refusal.contains("\"alice\""),
        "not an RBAC refusal for alice: {refusal}"
    );

    // Several groups, each from one O of the client certificate: binding any
    // one of them grants what the binding says.
    let bob = plane.kubeconfig_for(
        "system:serviceaccount:herald:operator",
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:herald",
            "herald-operators",
        ],
    );
    let whoami = succeeded(
        "kubectl auth whoami",
        plane.kubectl_as(&bob, ["auth", "whoami", "-o", "json"]),
    );
    let whoami: serde_json::Value = serde_json::from_str(&whoami).expect("whoami is JSON");
    assert_eq!(
        whoami["status"]["userInfo"]["username"],
        "system:serviceaccount:herald:operator"
    );
    assert_eq!(
        whoami["status"]["userInfo"]["groups"],
        serde_json::json!([
            "system:serviceaccounts",
            "system:serviceaccounts:herald",
            "herald-operators",
            "system:authenticated"
        ])
    );
    assert_eq!(can_list_secrets(&bob), "no");
    succeeded(
        "kubectl create clusterrole",
        plane.kubectl([
            "create",
            "clusterrole",
            "secret-reader",
            "--verb=list",
            "--resource=secrets",
        ]),
    );
    succeeded(
        "kubectl create clusterrolebinding",
        plane.kubectl([
            "create",
            "clusterrolebinding",
            "operators-read-secrets",
            "--clusterrole=secret-reader",
            "--group=herald-operators",
        ]),
    );
    // RBAC reads bindings through an informer: allow it a moment.
    herald_testkit::wait_until(
        "the new binding to take effect",
        Duration::from_secs(30),
        || {
            let answer = can_list_secrets(&bob);
            async move { (answer == "yes").then_some(()) }
        },
    )
    .await;
    assert_eq!(can_list_secrets(&alice), "no");
}

#[tokio::test]
async fn helm_installs_a_chart_into_the_control_plane() {
    let plane = ControlPlane::start().await;
    let chart = tempfile::tempdir().expect("cannot create a temporary directory");
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: herald-probe\nversion: 0.1.0\nkubeVersion: \">=1.37.0-0\"\n",
    )
    .expect("cannot write Chart.yaml");
    std::fs::create_dir(chart.path().join("templates")).expect("cannot create templates/");
    std::fs::write(
        chart.path().join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\n\
         data:\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )
    .expect("cannot write the template");

    // kubeVersion in Chart.yaml makes helm check the server's /version.
    succeeded(
        "helm install",
        plane.helm([
            "install",
            "probe",
            chart.path().to_str().expect("UTF-8 path"),
            "--namespace",
            "default",
        ]),
    );
    let kube = succeeded(
        "kubectl get",
        plane.kubectl([
            "get",
            "configmap",
            "probe-probe",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.kube}",
        ]),
    );
    assert_eq!(kube, "v1.37.2");
    let releases = succeeded("helm list", plane.helm(["list", "-n", "default", "-q"]));
    assert_eq!(releases.trim(), "probe");
}
