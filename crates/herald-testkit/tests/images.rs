//! The images of scripts/build-images.sh, outside any cluster: the Herald
//! image follows the Dockerfile and holds nothing else, and every image runs
//! under a standalone containerd as uid 65532 on a read-only root
//! filesystem, doing its job on loopback.

// Helpers as well as tests panic on an unexpected answer: that is the failure.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use herald_testkit::{
    ImageRunner, Images, ReceiverBehaviour, RemoteReceiver, RunOptions, dockerfile, free_port,
    http_client, wait_until,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);
const NONROOT: u32 = 65532;

fn succeeded(what: &str, output: &Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The image config and the layer's listing (`tar -tv`) of an OCI archive.
struct Unpacked {
    config: Value,
    layer_listing: Vec<String>,
}

fn unpack(archive: &Path) -> Unpacked {
    let dir = tempfile::tempdir().unwrap();
    succeeded(
        "tar -x of the archive",
        &Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap(),
    );
    let read_json = |relative: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(relative)).unwrap()).unwrap()
    };
    let blob = |digest: &Value| format!("blobs/sha256/{}", &digest.as_str().unwrap()[7..]);
    let index = read_json("index.json");
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "one image per archive: {index}");
    let manifest = read_json(&blob(&manifests[0]["digest"]));
    let config = read_json(&blob(&manifest["config"]["digest"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let listing = succeeded(
        "tar -tvz of the layer",
        &Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvzf")
            .arg(dir.path().join(blob(&layers[0]["digest"])))
            .output()
            .unwrap(),
    );
    Unpacked {
        config,
        layer_listing: listing.lines().map(str::to_string).collect(),
    }
}

/// USER, ENTRYPOINT, WORKDIR, EXPOSE and LABEL of the Dockerfile's last
/// stage, and where it copies the binary: read here independently of the
/// script that builds the image from them.
#[derive(Debug, Default)]
struct FinalStage {
    user: String,
    entrypoint: Vec<String>,
    workdir: String,
    exposed: Vec<String>,
    labels: BTreeMap<String, String>,
    binary: String,
}

fn final_stage(dockerfile: &Path) -> FinalStage {
    let text = std::fs::read_to_string(dockerfile)
        .unwrap()
        .replace("\\\n", " ");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let mut stage = FinalStage::default();
    for line in &lines[last_from + 1..] {
        let (instruction, rest) = line.split_once(' ').unwrap();
        let rest = rest.trim();
        match instruction {
            "USER" => stage.user = rest.to_string(),
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(rest).unwrap(),
            "WORKDIR" => stage.workdir = rest.to_string(),
            "EXPOSE" => stage
                .exposed
                .extend(rest.split_whitespace().map(|p| format!("{p}/tcp"))),
            "LABEL" => {
                for pair in rest.split("\" ") {
                    let (key, value) = pair.trim().split_once('=').unwrap();
                    stage
                        .labels
                        .insert(key.to_string(), value.trim_matches('"').to_string());
                }
            }
            "COPY" if rest.starts_with("--from=build ") => {
                stage.binary = rest.split_whitespace().last().unwrap().to_string();
            }
            _ => {}
        }
    }
    stage
}

#[test]
fn the_herald_image_follows_the_dockerfile_and_holds_only_what_herald_needs() {
    let images = Images::load();
    let stage = final_stage(&dockerfile());
    assert_eq!(stage.user, format!("{NONROOT}:{NONROOT}"), "{stage:?}");
    // The chart runs the pods as that user too (runAsUser/runAsGroup/fsGroup).
    let values = std::fs::read_to_string(
        dockerfile()
            .parent()
            .unwrap()
            .join("deploy/helm/herald/values.yaml"),
    )
    .unwrap();
    let ids: Vec<&str> = values
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            ["runAsUser:", "runAsGroup:", "fsGroup:"]
                .iter()
                .find_map(|key| l.strip_prefix(key))
        })
        .map(str::trim)
        .collect();
    assert_eq!(
        ids.len(),
        5,
        "runAsUser and runAsGroup twice, fsGroup once: {ids:?}"
    );
    assert!(
        ids.iter().all(|id| *id == NONROOT.to_string()),
        "the chart's user is the Dockerfile's: {ids:?}"
    );
    let unpacked = unpack(&images.herald().archive);
    let config = &unpacked.config["config"];
    assert_eq!(config["User"], stage.user.as_str());
    assert_eq!(config["Entrypoint"], serde_json::json!(stage.entrypoint));
    assert_eq!(config["WorkingDir"], stage.workdir.as_str());
    let exposed: Vec<&String> = config["ExposedPorts"].as_object().unwrap().keys().collect();
    let mut expected_ports = stage.exposed.clone();
    expected_ports.sort();
    assert_eq!(exposed, expected_ports.iter().collect::<Vec<_>>());
    let labels: BTreeMap<String, String> =
        serde_json::from_value(config["Labels"].clone()).unwrap();
    assert_eq!(labels, stage.labels);
    assert_eq!(
        stage.entrypoint[0], stage.binary,
        "the entrypoint is the copied binary"
    );

    // Every entry: `mode owner size date time path`.
    let entries: Vec<(String, String, String)> = unpacked
        .layer_listing
        .iter()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].to_string(),
                fields[1].to_string(),
                fields[5..].join(" "),
            )
        })
        .collect();
    let binary = stage.binary.trim_start_matches('/');
    assert!(
        entries
            .iter()
            .any(|(mode, _, path)| path == binary && mode == "-rwxr-xr-x"),
        "{binary} is an executable in the layer: {entries:#?}"
    );
    assert!(
        entries
            .iter()
            .any(|(mode, owner, path)| path == "home/nonroot/"
                && owner == &format!("{NONROOT}/{NONROOT}")
                && mode.starts_with('d')),
        "the workdir belongs to the user: {entries:#?}"
    );
    let allowed_files = [
        binary,
        "etc/passwd",
        "etc/group",
        "etc/nsswitch.conf",
        "etc/ssl/certs/ca-certificates.crt",
    ];
    for (mode, _, path) in &entries {
        if mode.starts_with('d') {
            continue;
        }
        let library = path.starts_with("lib/x86_64-linux-gnu/") || path.starts_with("lib64/");
        assert!(
            allowed_files.contains(&path.as_str()) || library,
            "{path} is in the Herald image but Herald does not need it"
        );
    }
    assert!(
        !entries.iter().any(|(_, _, path)| path.ends_with("/sh")),
        "no shell in the image"
    );
}

fn uid_of(runner: &ImageRunner, id: &str, pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| {
        panic!(
            "{id} (pid {pid}) is gone ({e}); its log:\n{}",
            runner.log(id)
        )
    });
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    // Real, effective, saved, filesystem: all must be the user.
    let uids: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == uids[0]), "{line}");
    uids[0]
}

async fn http_status(url: &str) -> Option<u16> {
    http_client()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until `url` answers 200; panics with task `id`'s log otherwise.
async fn wait_for_200(runner: &ImageRunner, id: &str, url: &str) {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while http_status(url).await != Some(200) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "{url} did not answer 200 within {DEADLINE:?}; {id}'s log:\n{}",
            runner.log(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts task `id`, waits for its process, and checks it runs as the
/// non-root user on a read-only root filesystem.
async fn start_checked(
    runner: &ImageRunner,
    reference: &str,
    id: &str,
    argv: &[&str],
    options: &RunOptions,
) {
    runner.start_task(reference, id, argv, options);
    let pid = runner.pid(id).await;
    assert_eq!(uid_of(runner, id, pid), NONROOT, "{id} runs as {NONROOT}");
    let spec = runner.spec(id);
    assert_eq!(spec["root"]["readonly"], true, "{id}: {spec}");
    assert_eq!(spec["process"]["user"]["uid"], NONROOT, "{id}");
    let bounding = &spec["process"]["capabilities"]["bounding"];
    assert!(
        bounding.is_null() || bounding == &serde_json::json!([]),
        "{id}: no capabilities, not {bounding}"
    );
}

#[tokio::test]
async fn every_image_runs_as_its_non_root_user_on_a_read_only_root() {
    let images = Images::load();
    let runner = ImageRunner::start().await;
    for image in [
        images.herald(),
        images.nats_server(),
        images.mailpit(),
        images.test_receiver(),
    ] {
        runner.import(&image.archive, &image.reference);
    }
    let herald = &images.herald().reference;

    // Herald's entrypoint, as the Dockerfile names it.
    let entrypoint = final_stage(&dockerfile()).entrypoint;
    let entrypoint: Vec<&str> = entrypoint.iter().map(String::as_str).collect();
    let version = succeeded(
        "herald --version",
        &runner.run_to_end(
            herald,
            "herald-version",
            &[entrypoint.clone(), vec!["--version"]].concat(),
        ),
    );
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "herald --version: {version}"
    );
    let help = succeeded(
        "herald --help",
        &runner.run_to_end(
            herald,
            "herald-help",
            &[entrypoint.clone(), vec!["--help"]].concat(),
        ),
    );
    assert!(help.contains("operator"), "herald --help: {help}");

    // nats-server with JetStream, as the image's command starts it, on
    // loopback ports; its store on the writable /tmp.
    let (nats_port, monitor_port) = (free_port(), free_port());
    let host_network = RunOptions {
        host_network: true,
        tmp: true,
        ..RunOptions::default()
    };
    let (nats_port_arg, monitor_port_arg) = (nats_port.to_string(), monitor_port.to_string());
    let nats_args = [
        "/usr/local/bin/nats-server",
        "--jetstream",
        "--store_dir",
        "/tmp/jetstream",
        "--addr",
        "127.0.0.1",
        "--port",
        &nats_port_arg,
        "--http_port",
        &monitor_port_arg,
    ];
    start_checked(
        &runner,
        &images.nats_server().reference,
        "nats",
        &nats_args,
        &host_network,
    )
    .await;
    let jetstream = format!("http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true");
    wait_until("nats-server's JetStream healthy", DEADLINE, || async {
        (http_status(&jetstream).await == Some(200)).then_some(())
    })
    .await;

    // mailpit: SMTP and its API, its database in /tmp.
    let (smtp_port, mail_port) = (free_port(), free_port());
    let smtp = format!("127.0.0.1:{smtp_port}");
    let mail = format!("127.0.0.1:{mail_port}");
    start_checked(
        &runner,
        &images.mailpit().reference,
        "mailpit",
        &["/usr/local/bin/mailpit", "--smtp", &smtp, "--listen", &mail],
        &host_network,
    )
    .await;
    let messages = format!("http://{mail}/api/v1/messages");
    wait_until("mailpit's API", DEADLINE, || async {
        (http_status(&messages).await == Some(200)).then_some(())
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(&smtp).await.is_ok(),
        "mailpit's SMTP port"
    );

    // The root really is read-only: mailpit told to keep its database
    // outside /tmp cannot create it.
    let refused = runner.run_to_end(
        &images.mailpit().reference,
        "mailpit-read-only",
        &[
            "/usr/local/bin/mailpit",
            "--database",
            "/mailpit.db",
            "--smtp",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !refused.status.success() && said.contains("read-only file system"),
        "mailpit wrote to the root filesystem ({}): {said}",
        refused.status
    );

    // The test receiver records a webhook and answers as told.
    let receiver_address = format!("127.0.0.1:{}", free_port());
    start_checked(
        &runner,
        &images.test_receiver().reference,
        "receiver",
        &[
            "/usr/local/bin/herald-test-receiver",
            "--listen",
            &receiver_address,
        ],
        &RunOptions {
            host_network: true,
            ..RunOptions::default()
        },
    )
    .await;
    let receiver = RemoteReceiver::new(&format!("http://{receiver_address}"));
    wait_until("the receiver's health check", DEADLINE, || async {
        receiver.is_up().await.then_some(())
    })
    .await;
    receiver
        .set_behaviour(&ReceiverBehaviour::Status(503))
        .await;
    let posted = http_client()
        .post(format!("http://{receiver_address}/hooks/a"))
        .header("webhook-id", "msg_1")
        .body("{\"hello\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status().as_u16(), 503, "it answers as told");
    let received = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(received[0].path, "/hooks/a");
    assert_eq!(received[0].headers["webhook-id"], "msg_1");
    assert_eq!(received[0].body, "{\"hello\":1}");

    // `herald api` from the image, against the nats-server container: it
    // creates the topology, becomes ready and accepts a task; nothing in it
    // writes to the read-only root.
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let nats_url = format!("--nats-url=nats://127.0.0.1:{nats_port}");
    start_checked(
        &runner,
        herald,
        "herald-api",
        &[
            entrypoint.clone(),
            vec!["api", "--listen", &listen, &nats_url],
        ]
        .concat(),
        &RunOptions {
            host_network: true,
            tmp: true,
            env: vec!["HERALD_NATS__MANAGE_TOPOLOGY=true".to_string()],
        },
    )
    .await;
    wait_for_200(&runner, "herald-api", &format!("http://{listen}/readyz")).await;
    let accepted = http_client()
        .post(format!("http://{listen}/users/1/tasks/transcode"))
        .json(&serde_json::json!({"file": "movie.mp4"}))
        .send()
        .await
        .unwrap();
    assert!(
        accepted.status().is_success(),
        "the API in the image accepts a task: {} {}\nits log:\n{}",
        accepted.status(),
        accepted.text().await.unwrap_or_default(),
        runner.log("herald-api")
    );
}

/// What the test cluster's NATS is (three servers, Herald's topology with
/// three replicas), from the images, on loopback: `herald api` creates its
/// streams replicated on all three and accepts a task.
#[tokio::test]
async fn herald_in_its_image_creates_r3_streams_on_a_three_server_jetstream_cluster() {
    let images = Images::load();
    let runner = ImageRunner::start().await;
    runner.import(&images.herald().archive, &images.herald().reference);
    runner.import(
        &images.nats_server().archive,
        &images.nats_server().reference,
    );
    let options = RunOptions {
        host_network: true,
        tmp: true,
        ..RunOptions::default()
    };
    let servers: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let routes = servers
        .iter()
        .map(|(_, cluster, _)| format!("nats://127.0.0.1:{cluster}"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (client, cluster, monitor)) in servers.iter().enumerate() {
        let args = [
            "/usr/local/bin/nats-server".to_string(),
            "--jetstream".to_string(),
            "--store_dir".to_string(),
            "/tmp/jetstream".to_string(),
            "--server_name".to_string(),
            format!("nats-{i}"),
            "--addr".to_string(),
            "127.0.0.1".to_string(),
            "--port".to_string(),
            client.to_string(),
            "--http_port".to_string(),
            monitor.to_string(),
            "--cluster_name".to_string(),
            "herald".to_string(),
            "--cluster".to_string(),
            format!("nats://127.0.0.1:{cluster}"),
            "--routes".to_string(),
            routes.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_checked(
            &runner,
            &images.nats_server().reference,
            &format!("nats-{i}"),
            &args,
            &options,
        )
        .await;
    }
    for (_, _, monitor) in &servers {
        let healthy = format!("http://127.0.0.1:{monitor}/healthz");
        wait_until("a clustered nats-server healthy", DEADLINE, || async {
            (http_status(&healthy).await == Some(200)).then_some(())
        })
        .await;
    }

    let listen = format!("127.0.0.1:{}", free_port());
    // One server's URL, as the cluster's Service gives one address: the
    // client learns the others from the servers. (A comma-separated list,
    // which config.example.toml promises, is refused: "invalid port number".)
    let nats_url = format!("--nats-url=nats://127.0.0.1:{}", servers[0].0);
    let entrypoint = final_stage(&dockerfile()).entrypoint;
    let entrypoint: Vec<&str> = entrypoint.iter().map(String::as_str).collect();
    start_checked(
        &runner,
        &images.herald().reference,
        "herald-api",
        &[entrypoint, vec!["api", "--listen", &listen, &nats_url]].concat(),
        &RunOptions {
            env: vec![
                "HERALD_NATS__MANAGE_TOPOLOGY=true".to_string(),
                "HERALD_TOPOLOGY__REPLICAS=3".to_string(),
            ],
            ..options
        },
    )
    .await;
    wait_for_200(&runner, "herald-api", &format!("http://{listen}/readyz")).await;
    let accepted = http_client()
        .post(format!("http://{listen}/users/1/tasks/transcode"))
        .json(&serde_json::json!({"file": "movie.mp4"}))
        .send()
        .await
        .unwrap();
    assert!(
        accepted.status().is_success(),
        "a task on R3 streams: {}\nherald's log:\n{}",
        accepted.status(),
        runner.log("herald-api")
    );

    // Every stream Herald made (its KV buckets are streams too) has three
    // replicas: in its leader's own view (only the leader knows whether its
    // followers are current), two followers, both current.
    let streams = wait_until(
        "every stream with two current followers",
        DEADLINE,
        || async {
            let mut led = Vec::new();
            for (i, (_, _, monitor)) in servers.iter().enumerate() {
                let jsz = format!(
                    "http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true&config=true"
                );
                let jsz: Value = http_client()
                    .get(&jsz)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                for account in jsz["account_details"].as_array()? {
                    for stream in account["stream_detail"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                    {
                        if stream["cluster"]["leader"] == format!("nats-{i}").as_str() {
                            led.push(stream);
                        }
                    }
                }
            }
            let all_r3 = led.len() >= 5
                && led.iter().all(|s| {
                    s["config"]["num_replicas"] == 3
                        && s["cluster"]["replicas"]
                            .as_array()
                            .is_some_and(|r| r.len() == 2 && r.iter().all(|p| p["current"] == true))
                });
            all_r3.then_some(led)
        },
    )
    .await;
    let names: Vec<&str> = streams.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"HERALD_TASKS"), "{names:?}");
}
