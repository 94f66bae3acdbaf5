//! Herald on a real Kubernetes node, the way its users meet it: `helm
//! install` of the chart with the local images, every Deployment Ready
//! with its probes passing and no restarts, `kubectl apply` of a
//! WebhookEndpoint for a receiver pod going Active, and a task posted with
//! HTTP through the API's NodePort delivered to that pod, signed with the
//! secret of the Secret the endpoint references.
//!
//! Everything runs in the cluster (herald_testkit::Cluster): NATS
//! JetStream (deploy/nats/test-cluster), the receiver and the mail sink
//! are pods reached by their Service names; the test only talks to the
//! NodePort and reads the receiver's control API at its pod address.

use std::time::Duration;

use herald_core::signing::SigningSecret;
use herald_testkit::{
    Cluster, Images, NODE_NAME, RECEIVER_SERVICE, RemoteReceiver, http_client,
    verify_with_standardwebhooks, wait_until,
};
use serde_json::{Value, json};

use crate::{
    chart::{chart_without_nats_dependency, succeeded},
    harness::TEST_KEY,
};

const NAMESPACE: &str = "herald";
/// Pods start on 2 shared cores, several at once.
const ROLLOUT: Duration = Duration::from_secs(300);
const DELIVERY: Duration = Duration::from_secs(60);

/// The cluster's pod and Service ranges, where the receiver lives: the
/// webhook workers' SSRF guard refuses them unless allowed.
const SSRF_ALLOW: &str = "config.webhooks.ssrf.allow={10.77.0.0/24,10.77.1.0/24}";

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    succeeded(&format!("kubectl {args:?}"), &cluster.kubectl(args))
}

fn kubectl_json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(cluster, &all)).expect("kubectl prints JSON")
}

/// Every Herald image imported, NATS, the sinks and the chart installed.
async fn install(cluster: &Cluster, images: &Images) {
    for image in [
        images.herald(),
        images.nats_server(),
        images.mailpit(),
        images.test_receiver(),
    ] {
        cluster.import_image(&image.archive, &image.reference);
    }
    kubectl(cluster, &["create", "namespace", NAMESPACE]);
    // The chart's operator serves the users a namespace's annotation names
    // (docs/design.md, "Tenancy"): here, every user.
    kubectl(
        cluster,
        &["annotate", "namespace", NAMESPACE, "herald.dev/users=*"],
    );
    let volumes =
        herald_testkit::local_volumes(NODE_NAME, &cluster.dir().join("volumes"), 3, "4Gi");
    let sinks = herald_testkit::sinks_manifest(images, NAMESPACE);
    cluster.apply(&format!("{volumes}---\n{sinks}"));

    let mut nats = vec![
        "install".to_string(),
        "nats".to_string(),
        herald_testkit::nats_chart().display().to_string(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
    ];
    nats.extend(herald_testkit::nats_chart_values(images.nats_server(), 3));
    succeeded(
        "helm install of the test NATS",
        &cluster.control_plane().helm(&nats),
    );

    let chart = chart_without_nats_dependency(cluster.dir());
    let values = chart.join("ci/test-cluster-values.yaml");
    let herald = images.herald();
    succeeded(
        "helm install of the chart",
        &cluster.control_plane().helm([
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
            "--set",
            &format!("secrets.encryptionKey.value={TEST_KEY}"),
            "--set",
            SSRF_ALLOW,
        ]),
    );
}

/// Waits until every Deployment and StatefulSet in the namespace has all
/// its replicas ready; panics with the pods' states after `ROLLOUT`.
async fn wait_for_rollout(cluster: &Cluster) {
    let give_up = std::time::Instant::now() + ROLLOUT;
    loop {
        let workloads = kubectl_json(
            cluster,
            &["get", "deployments,statefulsets", "-n", NAMESPACE],
        );
        let items = workloads["items"].as_array().cloned().unwrap_or_default();
        let pending: Vec<String> = items
            .iter()
            .filter(|w| {
                let wanted = w["spec"]["replicas"].as_u64().unwrap_or(1);
                w["status"]["readyReplicas"].as_u64().unwrap_or(0) < wanted
            })
            .map(|w| w["metadata"]["name"].as_str().unwrap_or("?").to_string())
            .collect();
        if !items.is_empty() && pending.is_empty() {
            return;
        }
        if std::time::Instant::now() > give_up {
            let pods = kubectl(cluster, &["get", "pods", "-n", NAMESPACE, "-o", "wide"]);
            let events = kubectl(
                cluster,
                &["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"],
            );
            panic!("not ready after {ROLLOUT:?}: {pending:?}\n{pods}\n{events}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_on_a_node_and_delivers_a_task_posted_through_its_service() {
    let images = Images::load();
    let cluster = Cluster::start().await;
    let started = std::time::Instant::now();
    install(&cluster, &images).await;
    wait_for_rollout(&cluster).await;
    eprintln!("chart Ready in {:.1?}", started.elapsed());

    // Probes pass and nothing restarted on the way.
    let pods = kubectl_json(&cluster, &["get", "pods", "-n", NAMESPACE]);
    for pod in pods["items"].as_array().expect("a pod list") {
        let name = pod["metadata"]["name"].as_str().unwrap_or("?");
        for status in pod["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            assert_eq!(status["ready"], true, "{name} is ready: {status}");
            assert_eq!(
                status["restartCount"], 0,
                "{name} never restarted: {status}"
            );
        }
    }

    // The receiver pod, behind its Service, for a WebhookEndpoint that
    // signs with the secret of a Secret.
    let secret = SigningSecret::generate();
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: hook-secret, namespace: {NAMESPACE}}}\n\
         stringData: {{secret: {}}}\n",
        secret.expose()
    ));
    let url = format!("http://{RECEIVER_SERVICE}.{NAMESPACE}.svc.cluster.local/hooks");
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: orders, namespace: {NAMESPACE}}}\n\
         spec:\n  userId: 'k1'\n  url: '{url}'\n  email: ops@herald.test\n  secretRef: {{name: hook-secret}}\n"
    ));
    wait_until("the WebhookEndpoint to be Active", DELIVERY, || {
        let state = cluster.kubectl([
            "get",
            "whe",
            "orders",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.status.state}",
        ]);
        async move { (String::from_utf8_lossy(&state.stdout) == "Active").then_some(()) }
    })
    .await;
    let table = kubectl(&cluster, &["get", "whe", "-n", NAMESPACE]);
    assert!(table.contains("k1") && table.contains(&url), "{table}");

    // A task posted to the API's NodePort, from the host.
    let service = kubectl_json(&cluster, &["get", "service", "herald-api", "-n", NAMESPACE]);
    let node_port = service["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("the API Service has a NodePort");
    let api = format!("http://{}:{node_port}", cluster.node_address());
    let http = http_client();
    let response = http
        .post(format!("{api}/users/k1/tasks/echo"))
        .json(&json!({ "hello": "kubernetes" }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {api}: {e}"));
    assert_eq!(response.status().as_u16(), 201, "the task is accepted");
    let task: Value = response.json().await.expect("a JSON task");
    let id = task["id"].as_str().expect("the task has an id").to_string();

    let receiver_ip = kubectl(
        &cluster,
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            &format!("app={RECEIVER_SERVICE}"),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    );
    let receiver = RemoteReceiver::new(&format!("http://{receiver_ip}:8080"));
    let webhook = wait_until("the task's webhook at the receiver pod", DELIVERY, || {
        let receiver = receiver.clone();
        let id = id.clone();
        async move {
            receiver
                .received()
                .await
                .into_iter()
                .find(|w| w.path == "/hooks" && w.body.contains(&id))
        }
    })
    .await;
    verify_with_standardwebhooks(&secret.expose(), &webhook)
        .expect("signed with the secret of the referenced Secret");
}
