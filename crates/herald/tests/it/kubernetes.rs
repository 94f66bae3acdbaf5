//! Herald on a real single-node Kubernetes (herald_testkit::Cluster): the
//! images of scripts/build-images.sh imported into the node, the test NATS
//! (three JetStream servers on local volumes), mailpit and the receiver as
//! pods, and the chart installed with helm, used the way its users do:
//! `kubectl apply` of a WebhookEndpoint, a task posted through the API's
//! NodePort, the webhook delivered to the receiver pod, signed; the webhook
//! workers scaled to three under load, each delivering and nothing lost or
//! delivered twice under two webhook-ids; a failing
//! receiver turning the endpoint Failing and its owner mailed through the
//! mailpit pod; the operator's leader deleted and another pod leading;
//! `helm upgrade` of a config value replacing every Deployment's pods;
//! `helm uninstall` leaving only the CRD and the users' WebhookEndpoints.

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
async fn the_chart_on_a_node_delivers_signed_turns_failing_fails_over_and_rolls_on_config_change() {
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
    ok(
        "kubectl create namespace",
        cluster.kubectl(["create", "namespace", NAMESPACE]),
    );

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
            // The demo handler's pretend work, short: the load below is
            // a few hundred tasks a second.
            "--set",
            "config.tasks.transcode_duration=10ms",
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
    let columns = ok(
        "kubectl get whe",
        cluster.kubectl(["get", "whe", "-n", NAMESPACE]),
    );
    eprintln!(
        "$ kubectl get deploy,pods -n {NAMESPACE}\n{}\n$ kubectl get whe -n {NAMESPACE}\n{columns}",
        ok(
            "kubectl get deploy,pods",
            cluster.kubectl(["get", "deploy,pods", "-n", NAMESPACE])
        )
    );
    assert!(
        columns.contains("STATE") && columns.contains("Active"),
        "{columns}"
    );

    // A task through the API's NodePort, from the host.
    let service = json_of(&cluster, &["get", "service", "herald-api", "-n", NAMESPACE]);
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let api = format!("http://{}:{node_port}", cluster.node_address());
    post_task(&api, "1").await;

    // Delivered to the receiver pod, signed with the Secret's key.
    let receiver =
        RemoteReceiver::new(&format!("http://{}:8080", pod_ip(&cluster, "app=receiver")));
    let received = receiver.wait_for(1, DELIVERY).await;
    assert_eq!(received[0].path, "/hooks/user-1");
    verify_with_standardwebhooks(SIGNING_SECRET, &received[0])
        .unwrap_or_else(|e| panic!("the webhook's signature: {e}"));

    // The webhook workers scaled to three under a steady load: every
    // replica delivers, nothing is lost, no task is delivered under two
    // webhook-ids.
    ok(
        "kubectl scale of the webhook workers",
        cluster.kubectl([
            "scale",
            "deploy/herald-worker-webhooks",
            "--replicas=3",
            "-n",
            NAMESPACE,
        ]),
    );
    ok(
        "three webhook workers",
        cluster.kubectl([
            "rollout",
            "status",
            "deploy/herald-worker-webhooks",
            "-n",
            NAMESPACE,
            &format!("--timeout={}s", READY.as_secs()),
        ]),
    );
    const LOAD: usize = 1500;
    let started = std::time::Instant::now();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..LOAD {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let url = format!("{api}/users/1/tasks/transcode");
        posts.spawn(async move {
            let status = http_client()
                .post(url)
                .json(&serde_json::json!({"file": "movie.mp4"}))
                .send()
                .await
                .map(|r| r.status().as_u16());
            drop(permit);
            status
        });
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    while let Some(status) = posts.join_next().await {
        let status = match status.unwrap() {
            Ok(code) => code.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *statuses.entry(status).or_default() += 1;
    }
    let posting = started.elapsed();
    assert_eq!(
        statuses.get("202").copied().unwrap_or_default()
            + statuses.get("201").copied().unwrap_or_default()
            + statuses.get("200").copied().unwrap_or_default(),
        LOAD,
        "every task accepted: {statuses:?}"
    );
    let received = wait_until("every task of the load delivered", DELIVERY, || async {
        let received = receiver.received().await;
        let ids: std::collections::HashSet<String> = received
            .iter()
            .filter(|w| w.path == "/hooks/user-1")
            .map(|w| w.headers["webhook-id"].clone())
            .collect();
        (ids.len() > LOAD).then_some(received)
    })
    .await;
    let delivering = started.elapsed();
    let ids: std::collections::HashSet<&str> = received
        .iter()
        .filter(|w| w.path == "/hooks/user-1")
        .map(|w| w.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(ids.len(), LOAD + 1, "one webhook-id per task");
    let mut per_pod = Vec::new();
    let webhook_pods = json_of(
        &cluster,
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=worker-webhooks",
        ],
    );
    for pod in webhook_pods["items"].as_array().unwrap() {
        let ip = pod["status"]["podIP"].as_str().unwrap();
        let metrics = http_client()
            .get(format!("http://{ip}:8081/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let delivered: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("herald_webhook_attempts_total{outcome=\"delivered\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        per_pod.push((
            pod["metadata"]["name"].as_str().unwrap().to_string(),
            delivered,
        ));
    }
    eprintln!(
        "load: {LOAD} tasks posted in {posting:.1?} ({:.0}/s), all delivered after {delivering:.1?}; {} requests for {} webhook-ids; delivered per webhook pod: {per_pod:?}",
        LOAD as f64 / posting.as_secs_f64(),
        received.len(),
        ids.len()
    );
    assert_eq!(per_pod.len(), 3, "{per_pod:?}");
    assert!(
        per_pod.iter().all(|(_, delivered)| *delivered > 0.0),
        "every replica delivers: {per_pod:?}"
    );

    // A failing receiver: an endpoint with a short retry schedule turns
    // Failing, and once its attempts are exhausted its owner's mail is in
    // the mailpit pod.
    receiver
        .set_behaviour(&herald_testkit::ReceiverBehaviour::Status(500))
        .await;
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: user-2, namespace: {NAMESPACE}}}
spec:
  userId: \"2\"
  url: http://receiver.{NAMESPACE}.svc/hooks/user-2
  email: user2@example.com
  secretRef: {{name: signing, key: secret}}
  retry: {{schedule: [1s, 1s]}}
"
    ));
    wait_until("WebhookEndpoint user-2 Active", READY, || async {
        let endpoint = json_of(&cluster, &["get", "whe", "user-2", "-n", NAMESPACE]);
        (endpoint["status"]["state"] == "Active").then_some(())
    })
    .await;
    post_task(&api, "2").await;
    wait_until("WebhookEndpoint user-2 Failing", READY, || async {
        let endpoint = json_of(&cluster, &["get", "whe", "user-2", "-n", NAMESPACE]);
        (endpoint["status"]["state"] == "Failing").then_some(())
    })
    .await;
    let mailpit = format!(
        "http://{}:8025/api/v1/messages",
        pod_ip(&cluster, "app=mailpit")
    );
    wait_until(
        "the failure mail to user2@example.com",
        DELIVERY,
        || async {
            let messages: Value = http_client()
                .get(&mailpit)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            messages["messages"]
                .as_array()?
                .iter()
                .any(|m| {
                    m["To"]
                        .as_array()
                        .is_some_and(|to| to.iter().any(|a| a["Address"] == "user2@example.com"))
                })
                .then_some(())
        },
    )
    .await;
    receiver
        .set_behaviour(&herald_testkit::ReceiverBehaviour::Ok)
        .await;

    // The operator's leader killed: the standby takes the Lease, and
    // status keeps updating (a new endpoint becomes Active).
    let holder = |cluster: &Cluster| {
        json_of(
            cluster,
            &["get", "lease", "herald-operator", "-n", NAMESPACE],
        )["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let leader = holder(&cluster);
    assert!(
        leader.starts_with("herald-operator-"),
        "the Lease's holder: {leader:?}"
    );
    let operators: Vec<String> = pod_names(&cluster)
        .into_iter()
        .filter(|pod| pod.starts_with("herald-operator-"))
        .collect();
    assert_eq!(operators.len(), 2, "a leader and a standby: {operators:?}");
    assert!(
        operators.contains(&leader),
        "{leader} is one of {operators:?}"
    );
    let standby = operators
        .into_iter()
        .find(|pod| *pod != leader)
        .expect("a standby operator pod");
    let killed = std::time::Instant::now();
    ok(
        "kubectl delete pod of the leader",
        cluster.kubectl(["delete", "pod", &leader, "-n", NAMESPACE, "--wait=false"]),
    );
    let new_leader = wait_until("another operator pod to lead", READY, || async {
        let now = holder(&cluster);
        (!now.is_empty() && now != leader).then_some(now)
    })
    .await;
    eprintln!(
        "operator: leader {leader} deleted; {new_leader} ({}) leads after {:.1?}",
        if new_leader == standby {
            "the standby"
        } else {
            "its replacement"
        },
        killed.elapsed()
    );
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: user-3, namespace: {NAMESPACE}}}
spec:
  userId: \"3\"
  url: http://receiver.{NAMESPACE}.svc/hooks/user-3
  email: user3@example.com
  secretRef: {{name: signing, key: secret}}
"
    ));
    wait_until(
        "WebhookEndpoint user-3 Active under the new leader",
        READY,
        || async {
            let endpoint = json_of(&cluster, &["get", "whe", "user-3", "-n", NAMESPACE]);
            (endpoint["status"]["state"] == "Active").then_some(())
        },
    )
    .await;
    wait_for_deployments(&cluster);

    // helm upgrade changing a config value rolls every Deployment's pods.
    let before = pod_names(&cluster);
    ok(
        "helm upgrade with a changed config value",
        cluster.control_plane().helm([
            "upgrade",
            "herald",
            &chart.display().to_string(),
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            // Helm 4 applies server-side: the replicas `kubectl scale` set
            // above belong to kubectl now, and a different value from the
            // chart would be refused as a conflict. The values say 3 too.
            "--set",
            "workers.webhooks.replicas=3",
            "--set",
            "config.log.filter=herald=debug\\,info",
        ]),
    );
    for deployment in DEPLOYMENTS {
        ok(
            &format!("rollout of {deployment}"),
            cluster.kubectl([
                "rollout",
                "status",
                &format!("deployment/{deployment}"),
                "-n",
                NAMESPACE,
                &format!("--timeout={}s", READY.as_secs()),
            ]),
        );
    }
    let after = pod_names(&cluster);
    for deployment in DEPLOYMENTS {
        let old: Vec<&String> = before
            .iter()
            .filter(|p| p.starts_with(deployment))
            .collect();
        assert!(
            !old.is_empty() && old.iter().all(|pod| !after.contains(pod)),
            "{deployment}: every pod replaced after the config change; before {before:?}, after {after:?}"
        );
    }

    // helm uninstall: nothing the chart made is left but the CRD (helm
    // never deletes crds/) and the WebhookEndpoints users made.
    ok(
        "helm uninstall",
        cluster
            .control_plane()
            .helm(["uninstall", "herald", "--namespace", NAMESPACE, "--wait"]),
    );
    let selector = "app.kubernetes.io/instance=herald";
    let left = ok(
        "kubectl get of what the chart made",
        cluster.kubectl([
            "get",
            "deploy,rs,svc,cm,secret,sa,role,rolebinding,pdb",
            "-n",
            NAMESPACE,
            "-l",
            selector,
            "-o",
            "name",
        ]),
    );
    let cluster_left = ok(
        "kubectl get of the chart's cluster objects",
        cluster.kubectl([
            "get",
            "clusterrole,clusterrolebinding",
            "-l",
            selector,
            "-o",
            "name",
        ]),
    );
    assert!(
        left.trim().is_empty() && cluster_left.trim().is_empty(),
        "left after helm uninstall:\n{left}{cluster_left}"
    );
    ok(
        "the CRD stays",
        cluster.kubectl(["get", "crd", "webhookendpoints.herald.dev"]),
    );
    let endpoints = json_of(&cluster, &["get", "whe", "-n", NAMESPACE]);
    eprintln!(
        "after helm uninstall: CRD webhookendpoints.herald.dev and WebhookEndpoints {:?} remain",
        endpoints["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!(
                "{} (finalizers {})",
                e["metadata"]["name"], e["metadata"]["finalizers"]
            ))
            .collect::<Vec<_>>()
    );
}

const DEPLOYMENTS: [&str; 5] = [
    "herald-api",
    "herald-worker-tasks",
    "herald-worker-webhooks",
    "herald-worker-mail",
    "herald-operator",
];

async fn post_task(api: &str, user: &str) {
    let accepted = http_client()
        .post(format!("{api}/users/{user}/tasks/transcode"))
        .json(&serde_json::json!({"file": "movie.mp4"}))
        .send()
        .await
        .unwrap();
    assert!(accepted.status().is_success(), "{}", accepted.status());
}

fn pod_ip(cluster: &Cluster, selector: &str) -> String {
    let pods = json_of(cluster, &["get", "pods", "-n", NAMESPACE, "-l", selector]);
    pods["items"][0]["status"]["podIP"]
        .as_str()
        .unwrap_or_else(|| panic!("no pod IP for {selector}: {pods}"))
        .to_string()
}

/// The names of the Herald pods that are not being deleted.
fn pod_names(cluster: &Cluster) -> Vec<String> {
    let pods = json_of(cluster, &["get", "pods", "-n", NAMESPACE]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|pod| pod["metadata"]["name"].as_str())
        .filter(|name| name.starts_with("herald-"))
        .map(str::to_string)
        .collect()
}
