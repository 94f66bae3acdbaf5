//! Herald on a real single-node Kubernetes (herald_testkit::Cluster): the
//! images of scripts/build-images.sh imported into the node, the test NATS
//! (three JetStream servers on local volumes), mailpit and the receiver as
//! pods, and the chart installed with helm, used the way its users do:
//! `kubectl apply` of a WebhookEndpoint, a task posted through the API's
//! NodePort, the webhook delivered to the receiver pod, signed.

use std::time::Duration;

use herald_testkit::{
    Cluster, Images, NODE_NAME, RemoteReceiver, http_client, local_volumes, nats_chart,
    nats_chart_values, sinks_manifest, verify_with_standardwebhooks, wait_until,
};
use serde_json::Value;

use crate::harness::TEST_KEY;

const NAMESPACE: &str = "herald";
const READY: Duration = Duration::from_secs(300);
const DELIVERY: Duration = Duration::from_secs(120);
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn ok(what: &str, output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json_of(cluster: &Cluster, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    serde_json::from_str(&ok(&format!("kubectl {args:?}"), cluster.kubectl(&full))).unwrap()
}

/// `kubectl wait` on every Deployment of the namespace being Available: a
/// condition with a deadline.
fn wait_for_deployments(cluster: &Cluster) {
    ok(
        "every Deployment Available",
        cluster.kubectl([
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "-n",
            NAMESPACE,
            &format!("--timeout={}s", READY.as_secs()),
        ]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_on_a_node_and_delivers_a_task_posted_through_its_service_signed() {
    let images = Images::load();
    let cluster = Cluster::start().await;
    for image in [
        images.herald(),
        images.nats_server(),
        images.mailpit(),
        images.test_receiver(),
    ] {
        cluster.import_image(&image.archive, &image.reference);
    }
    ok("kubectl create namespace", cluster.kubectl(["create", "namespace", NAMESPACE]));

    // NATS: three JetStream servers on local volumes.
    cluster.apply(&local_volumes(
        NODE_NAME,
        &cluster.dir().join("nats-volumes"),
        3,
        "4Gi",
    ));
    let mut nats = vec![
        "install".to_string(),
        "nats".to_string(),
        nats_chart().display().to_string(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
    ];
    nats.extend(nats_chart_values(images.nats_server(), 3));
    ok("helm install nats", cluster.control_plane().helm(&nats));
    for i in 0..3 {
        cluster
            .wait_for_pod_ready(NAMESPACE, &format!("nats-{i}"), READY)
            .await;
    }

    // The mail sink and the receiver.
    cluster.apply(&sinks_manifest(&images, NAMESPACE));

    // Herald, with the test cluster's values.
    let chart = crate::chart::chart_without_nats_dependency(cluster.dir());
    let values = chart.join("ci/test-cluster-values.yaml");
    let herald = images.herald();
    ok(
        "helm install herald",
        cluster.control_plane().helm([
            "install",
            "herald",
            &chart.display().to_string(),
            "--namespace",
            NAMESPACE,
            "-f",
            &values.display().to_string(),
            "--set",
            &format!("image.tag={}", herald.tag()),
            "--set",
            &format!("secrets.encryptionKey.value={TEST_KEY}"),
            // The receiver pod and its Service are in the cluster's ranges.
            "--set-json",
            &format!(
                "config.webhooks.ssrf.allow={}",
                serde_json::json!(cluster.cluster_ranges())
            ),
            "--set-json",
            &format!("operator.tenancy.namespaces={{\"{NAMESPACE}\":[\"*\"]}}"),
        ]),
    );
    wait_for_deployments(&cluster);
    let pods = json_of(&cluster, &["get", "pods", "-n", NAMESPACE]);
    for pod in pods["items"].as_array().unwrap() {
        let name = pod["metadata"]["name"].as_str().unwrap();
        for status in pod["status"]["containerStatuses"].as_array().unwrap() {
            assert_eq!(status["restartCount"], 0, "{name} restarted: {status}");
        }
    }

    // A WebhookEndpoint for the receiver pod, by its Service name.
    cluster.apply(&format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: signing, namespace: {NAMESPACE}}}
stringData: {{secret: {SIGNING_SECRET}}}
---
apiVersion: herald.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: user-1, namespace: {NAMESPACE}}}
spec:
  userId: \"1\"
  url: http://receiver.{NAMESPACE}.svc/hooks/user-1
  email: user1@example.com
  secretRef: {{name: signing, key: secret}}
"
    ));
    wait_until("WebhookEndpoint user-1 Active", READY, || async {
        let endpoint = json_of(&cluster, &["get", "whe", "user-1", "-n", NAMESPACE]);
        (endpoint["status"]["state"] == "Active").then_some(())
    })
    .await;
    let columns = ok("kubectl get whe", cluster.kubectl(["get", "whe", "-n", NAMESPACE]));
    assert!(columns.contains("STATE") && columns.contains("Active"), "{columns}");

    // A task through the API's NodePort, from the host.
    let service = json_of(&cluster, &["get", "service", "herald-api", "-n", NAMESPACE]);
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let api = format!("http://{}:{node_port}", cluster.node_address());
    let accepted = http_client()
        .post(format!("{api}/users/1/tasks/transcode"))
        .json(&serde_json::json!({"file": "movie.mp4"}))
        .send()
        .await
        .unwrap();
    assert!(accepted.status().is_success(), "{}", accepted.status());

    // Delivered to the receiver pod, signed with the Secret's key.
    let receiver_pods = json_of(&cluster, &["get", "pods", "-n", NAMESPACE, "-l", "app=receiver"]);
    let receiver_ip = receiver_pods["items"][0]["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    let receiver = RemoteReceiver::new(&format!("http://{receiver_ip}:8080"));
    let received = receiver.wait_for(1, DELIVERY).await;
    assert_eq!(received[0].path, "/hooks/user-1");
    verify_with_standardwebhooks(SIGNING_SECRET, &received[0])
        .unwrap_or_else(|e| panic!("the webhook's signature: {e}"));
}
