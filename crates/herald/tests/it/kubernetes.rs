//! Herald on a real Kubernetes node, the way its users meet it: `helm
//! install` of the chart with the local images, every Deployment Ready
//! with its probes passing and no restarts, `kubectl apply` of a
//! WebhookEndpoint for a receiver pod going Active, and a task posted with
//! HTTP through the API's NodePort delivered to that pod, signed with the
//! secret of the Secret the endpoint references; a failing receiver turns
//! its endpoint's status `Failing` and the owner's email lands in the mail
//! sink pod. Then: the leading operator pod killed, another takes over;
//! `helm upgrade` of a config value rolls the pods; `helm uninstall` leaves
//! only the CRD.
//!
//! Everything runs in the cluster (herald_testkit::Cluster): NATS
//! JetStream (deploy/nats/test-cluster), the receiver and the mail sink
//! are pods reached by their Service names; the test only talks to the
//! NodePort and reads the receiver's control API at its pod address.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use herald_core::signing::SigningSecret;
use herald_testkit::{
    Cluster, Images, MAILPIT_SERVICE, NODE_NAME, RECEIVER_SERVICE, ReceivedWebhook,
    ReceiverBehaviour, RemoteReceiver, http_client, verify_with_standardwebhooks, wait_until,
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
            // Endpoint health shows in the status within seconds.
            "--set",
            "config.operator.health_resync=2s",
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
    wait_for_endpoint_state(&cluster, "orders", "Active").await;
    let table = kubectl(&cluster, &["get", "whe", "-n", NAMESPACE]);
    assert!(table.contains("k1") && table.contains(&url), "{table}");
    eprintln!(
        "$ kubectl get pods -n {NAMESPACE}\n{}$ kubectl get whe -n {NAMESPACE}\n{table}",
        kubectl(&cluster, &["get", "pods", "-n", NAMESPACE])
    );

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

    let receiver_ip = pod_ip(&cluster, RECEIVER_SERVICE);
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

    // The receiver fails from now on: an endpoint with one retry second
    // turns Failing, and its owner is mailed once the retries run out.
    receiver
        .set_behaviour(&ReceiverBehaviour::Status(500))
        .await;
    let broken = format!("http://{RECEIVER_SERVICE}.{NAMESPACE}.svc.cluster.local/broken");
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: broken, namespace: {NAMESPACE}}}\n\
         spec:\n  userId: 'k2'\n  url: '{broken}'\n  email: owner@herald.test\n  retry: {{schedule: [1s]}}\n"
    ));
    wait_for_endpoint_state(&cluster, "broken", "Active").await;
    let response = http
        .post(format!("{api}/users/k2/tasks/echo"))
        .json(&json!({ "hello": "failure" }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {api}: {e}"));
    assert_eq!(response.status().as_u16(), 201, "the task is accepted");
    wait_for_endpoint_state(&cluster, "broken", "Failing").await;
    let mailpit_ip = pod_ip(&cluster, MAILPIT_SERVICE);
    let messages = format!("http://{mailpit_ip}:8025/api/v1/messages");
    let mail = wait_until("the failure mail in the mail sink pod", DELIVERY, || {
        let request = http.get(&messages).send();
        async move {
            let listing: Value = request.await.ok()?.json().await.ok()?;
            listing["messages"]
                .as_array()?
                .iter()
                .find(|message| message["To"][0]["Address"] == "owner@herald.test")
                .cloned()
        }
    })
    .await;
    eprintln!("failure mail: {}", mail["Subject"]);
}

/// Waits until WebhookEndpoint `name` shows `state` in its status.
async fn wait_for_endpoint_state(cluster: &Cluster, name: &str, state: &str) {
    wait_until(
        &format!("WebhookEndpoint {name} to be {state}"),
        DELIVERY,
        || {
            let shown = cluster.kubectl([
                "get",
                "whe",
                name,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.state}",
            ]);
            async move { (String::from_utf8_lossy(&shown.stdout) == state).then_some(()) }
        },
    )
    .await;
}

/// The address of the pod of Deployment `app` (label `app=<app>`).
fn pod_ip(cluster: &Cluster, app: &str) -> String {
    kubectl(
        cluster,
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    )
}

/// The holder of the operator's leader-election Lease.
fn lease_holder(cluster: &Cluster) -> String {
    kubectl(
        cluster,
        &[
            "get",
            "lease",
            "herald-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
}

/// The pods of the chart's component `component` that are not being
/// deleted.
fn live_component_pods(cluster: &Cluster, component: &str) -> Vec<Value> {
    let pods = kubectl_json(
        cluster,
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
        ],
    );
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
        .cloned()
        .collect()
}

/// The names of the pods of the chart's component `component`.
fn component_pods(cluster: &Cluster, component: &str) -> Vec<String> {
    live_component_pods(cluster, component)
        .iter()
        .filter_map(|pod| pod["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_operator_takes_over_from_a_killed_leader_and_helm_upgrade_and_uninstall_do_what_they_say()
 {
    let images = Images::load();
    let cluster = Cluster::start().await;
    install(&cluster, &images).await;
    wait_for_rollout(&cluster).await;

    // The operator pod deleted while it leads (as `kubectl delete pod`
    // does: SIGTERM, and the leader gives the Lease up): the standby, which
    // watches the Lease, takes it at once, before the pod the ReplicaSet
    // starts in the leader's place is even up, and keeps endpoint status
    // up to date.
    let leader = wait_until("an operator to lead", DELIVERY, || {
        let holder = lease_holder(&cluster);
        async move { (!holder.is_empty()).then_some(holder) }
    })
    .await;
    let standby: Vec<String> = component_pods(&cluster, "operator")
        .into_iter()
        .filter(|pod| *pod != leader)
        .collect();
    assert_eq!(standby.len(), 1, "one standby beside {leader}: {standby:?}");
    kubectl(
        &cluster,
        &["delete", "pod", &leader, "-n", NAMESPACE, "--wait=false"],
    );
    let give_up = std::time::Instant::now() + Duration::from_secs(90);
    let new_leader = loop {
        let holder = lease_holder(&cluster);
        if !holder.is_empty() && holder != leader {
            break holder;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "no operator took over from {leader} (standby {standby:?}); the Lease says {holder:?}; operator pods: {:?}",
            component_pods(&cluster, "operator")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        new_leader, standby[0],
        "the standby took over from {leader}, not its replacement"
    );
    eprintln!("operator {leader} deleted: the standby {new_leader} leads");
    let url = format!("http://{RECEIVER_SERVICE}.{NAMESPACE}.svc.cluster.local/after");
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: after-failover, namespace: {NAMESPACE}}}\n\
         spec:\n  userId: 'f1'\n  url: '{url}'\n  email: ops@herald.test\n"
    ));
    wait_for_endpoint_state(&cluster, "after-failover", "Active").await;

    // helm upgrade changing a config value rolls every Deployment: a new
    // config checksum in the pod template, new pods, all Ready.
    let checksum = |cluster: &Cluster| {
        kubectl(
            cluster,
            &[
                "get",
                "deployment",
                "herald-api",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.template.metadata.annotations.checksum/config}",
            ],
        )
    };
    let checksum_before = checksum(&cluster);
    let api_pods_before = component_pods(&cluster, "api");
    let chart = cluster.dir().join("herald");
    succeeded(
        "helm upgrade with another log filter",
        &cluster.control_plane().helm([
            "upgrade",
            "herald",
            &chart.display().to_string(),
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "config.log.filter=debug",
        ]),
    );
    let checksum_after = checksum(&cluster);
    assert_ne!(
        checksum_before, checksum_after,
        "the config checksum changed"
    );
    wait_until("the API pods to be replaced", ROLLOUT, || {
        let pods = component_pods(&cluster, "api");
        let replaced = pods.iter().all(|pod| !api_pods_before.contains(pod));
        async move { replaced.then_some(()) }
    })
    .await;
    wait_for_rollout(&cluster).await;

    // helm uninstall removes everything the release made; what stays is
    // what helm and the docs say: the CRD (helm never deletes CRDs) and the
    // Lease the operator made at run time.
    succeeded(
        "helm uninstall",
        &cluster
            .control_plane()
            .helm(["uninstall", "herald", "--namespace", NAMESPACE, "--wait"]),
    );
    // Its pods go once they have shut down (grace period 40 s).
    wait_until("the release's objects to be gone", ROLLOUT, || {
        let left = cluster.kubectl([
            "get",
            "all,configmaps,secrets,serviceaccounts,roles,rolebindings,poddisruptionbudgets",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/instance=herald",
            "-o",
            "name",
        ]);
        async move {
            (left.status.success() && String::from_utf8_lossy(&left.stdout).trim().is_empty())
                .then_some(())
        }
    })
    .await;
    let crd = cluster.kubectl(["get", "crd", "webhookendpoints.herald.dev"]);
    assert!(crd.status.success(), "the CRD stays");
}

/// What a steady load got from the API: the ids of the accepted tasks and
/// every status that was not 201.
#[derive(Default)]
struct LoadOutcome {
    accepted: Vec<String>,
    refused: Vec<String>,
}

/// Posts `rate` tasks a second for user `user` to `api` until `stop` is
/// set; each request on its own, so a slow one does not slow the rate.
async fn steady_load(
    api: String,
    user: &'static str,
    rate: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> LoadOutcome {
    let http = http_client();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut requests = tokio::task::JoinSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        ticks.tick().await;
        let request = http
            .post(format!("{api}/users/{user}/tasks/echo"))
            .json(&json!({ "load": true }))
            .timeout(Duration::from_secs(10))
            .send();
        requests.spawn(async move {
            match request.await {
                Ok(response) if response.status().as_u16() == 201 => {
                    let task: Value = response.json().await.unwrap_or(Value::Null);
                    Ok(task["id"].as_str().unwrap_or_default().to_string())
                }
                Ok(response) => Err(format!("status {}", response.status())),
                // With the cause: reqwest's own text names only the URL.
                Err(e) => Err(format!(
                    "error {e}: {}",
                    std::error::Error::source(&e)
                        .map_or(String::new(), |cause| format!("{cause:?}"))
                )),
            }
        });
    }
    let mut outcome = LoadOutcome::default();
    while let Some(result) = requests.join_next().await {
        match result.expect("a request task panicked") {
            Ok(id) => outcome.accepted.push(id),
            Err(refused) => outcome.refused.push(refused),
        }
    }
    outcome
}

/// `herald_webhook_attempts_total{outcome="delivered"}` of the pod at `ip`.
async fn delivered_by(ip: &str) -> u64 {
    let url = format!("http://{ip}:8081/metrics");
    let text = http_client()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| {
            line.strip_prefix("herald_webhook_attempts_total{outcome=\"delivered\"} ")
                .and_then(|value| value.trim().parse::<f64>().ok())
        })
        .map_or(0, |value| value as u64)
}

/// The addresses of the ready pods of component `component`.
fn ready_pod_ips(cluster: &Cluster, component: &str) -> Vec<String> {
    live_component_pods(cluster, component)
        .iter()
        .filter(|pod| pod["status"]["containerStatuses"][0]["ready"] == true)
        .filter_map(|pod| pod["status"]["podIP"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_workers_scaled_to_three_under_load_all_deliver_and_nothing_is_lost() {
    const RATE: u32 = 250;
    let (cluster, load) = under_load("load", "l1", RATE).await;
    kubectl(
        &cluster,
        &[
            "scale",
            "deployment/herald-worker-webhooks",
            "-n",
            NAMESPACE,
            "--replicas=3",
        ],
    );
    let workers = wait_until("three ready webhook workers", ROLLOUT, || {
        let ips = ready_pod_ips(&cluster, "worker-webhooks");
        async move { (ips.len() == 3).then_some(ips) }
    })
    .await;
    // The load goes on with three workers before it stops.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let outcome = load.stop().await;
    eprintln!(
        "load: {} accepted, {} refused at {RATE}/s",
        outcome.accepted.len(),
        outcome.refused.len()
    );
    assert!(
        outcome.refused.is_empty(),
        "no task refused, no 5xx: {:?}",
        &outcome.refused[..outcome.refused.len().min(10)]
    );

    wait_for_every_delivery(&cluster, "/load", &outcome.accepted).await;
    for ip in &workers {
        let delivered = delivered_by(ip).await;
        eprintln!("webhook worker {ip}: {delivered} delivered");
        assert!(delivered > 0, "the worker at {ip} delivered");
    }
}

/// Waits until the receiver pod has a webhook at `path` for every task in
/// `accepted`, and checks that each task came with one `webhook-id` only
/// (a duplicate is a redelivery, never a second delivery).
async fn wait_for_every_delivery(cluster: &Cluster, path: &str, accepted: &[String]) {
    let receiver = RemoteReceiver::new(&format!(
        "http://{}:8080",
        pod_ip(cluster, RECEIVER_SERVICE)
    ));
    let accepted: HashSet<String> = accepted.iter().cloned().collect();
    let received = wait_until("every accepted task delivered", ROLLOUT, || {
        let receiver = receiver.clone();
        let accepted = accepted.clone();
        async move {
            let received = receiver.received().await;
            let delivered: HashSet<&str> = received
                .iter()
                .filter(|w| w.path == path)
                .filter_map(|w| task_of(w, &accepted))
                .collect();
            (delivered.len() == accepted.len()).then_some(received)
        }
    })
    .await;
    let mut ids_per_task: HashMap<&str, HashSet<&str>> = HashMap::new();
    for webhook in received.iter().filter(|w| w.path == path) {
        if let Some(task) = task_of(webhook, &accepted) {
            ids_per_task
                .entry(task)
                .or_default()
                .insert(webhook.headers.get("webhook-id").map_or("", String::as_str));
        }
    }
    for (task, ids) in &ids_per_task {
        assert_eq!(ids.len(), 1, "task {task} has one webhook-id: {ids:?}");
    }
}

/// The accepted task whose id `webhook`'s body carries.
fn task_of<'a>(webhook: &ReceivedWebhook, accepted: &'a HashSet<String>) -> Option<&'a str> {
    let body: Value = serde_json::from_str(&webhook.body).ok()?;
    accepted
        .get(body["data"]["task_id"].as_str()?)
        .map(String::as_str)
}

/// A steady load running against the chart: what the load tests disrupt.
struct RunningLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<LoadOutcome>,
}

impl RunningLoad {
    /// Stops posting and returns what the API answered.
    async fn stop(self) -> LoadOutcome {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the load ran")
    }
}

/// The chart installed on a fresh node, an endpoint `name` of user `user`
/// Active, and `rate` tasks/s posted to the API's NodePort, running for a
/// few seconds already so a disruption hits a loaded system.
async fn under_load(name: &str, user: &'static str, rate: u32) -> (Cluster, RunningLoad) {
    let images = Images::load();
    let cluster = Cluster::start().await;
    install(&cluster, &images).await;
    wait_for_rollout(&cluster).await;
    let api = load_endpoint(&cluster, name, user).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::spawn(steady_load(api, user, rate, stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    (cluster, RunningLoad { stop, task })
}

/// A WebhookEndpoint `name` for user `user` at the receiver's `/<name>`,
/// Active; returns the API's URL at its NodePort.
async fn load_endpoint(cluster: &Cluster, name: &str, user: &str) -> String {
    let url = format!("http://{RECEIVER_SERVICE}.{NAMESPACE}.svc.cluster.local/{name}");
    cluster.apply(&format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec:\n  userId: '{user}'\n  url: '{url}'\n  email: ops@herald.test\n"
    ));
    wait_for_endpoint_state(cluster, name, "Active").await;
    let service = kubectl_json(cluster, &["get", "service", "herald-api", "-n", NAMESPACE]);
    let node_port = service["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("the API Service has a NodePort");
    format!("http://{}:{node_port}", cluster.node_address())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_deleted_and_every_deployment_restarted_under_load_lose_no_accepted_task() {
    const RATE: u32 = 100;
    let (cluster, load) = under_load("steady", "s1", RATE).await;
    for component in ["worker-webhooks", "api"] {
        let pod = component_pods(&cluster, component)
            .into_iter()
            .next()
            .expect("a pod of the component");
        kubectl(
            &cluster,
            &["delete", "pod", &pod, "-n", NAMESPACE, "--wait=false"],
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deployments = [
        "herald-api",
        "herald-worker-tasks",
        "herald-worker-webhooks",
        "herald-worker-mail",
        "herald-operator",
    ];
    for deployment in deployments {
        kubectl(
            &cluster,
            &[
                "rollout",
                "restart",
                &format!("deployment/{deployment}"),
                "-n",
                NAMESPACE,
            ],
        );
    }
    for deployment in deployments {
        kubectl(
            &cluster,
            &[
                "rollout",
                "status",
                &format!("deployment/{deployment}"),
                "-n",
                NAMESPACE,
                "--timeout=300s",
            ],
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcome = load.stop().await;
    let server_errors: Vec<&String> = outcome
        .refused
        .iter()
        .filter(|refused| refused.starts_with("status 5"))
        .collect();
    eprintln!(
        "load through deletions and restarts: {} accepted, {} not ({} of them 5xx): {:?}",
        outcome.accepted.len(),
        outcome.refused.len(),
        server_errors.len(),
        &outcome.refused[..outcome.refused.len().min(5)]
    );
    assert!(server_errors.is_empty(), "no 5xx: {server_errors:?}");
    wait_for_every_delivery(&cluster, "/steady", &outcome.accepted).await;
}
