//! The workers' bounded endpoint cache against a real NATS server: a miss
//! is read from the bucket, the watch keeps what is cached true (a change
//! updates it, a delete removes it, a first endpoint reaches a user cached
//! as having none), it never holds more users than its capacity, a user
//! whose one endpoint is looked up once is read alone and cached only when
//! met again, a record a delivery job carries is used only while the watch
//! vouches for it, and no change made around a NATS restart is missed.

use std::sync::Arc;

use futures::StreamExt;
use herald::{cli::WorkerKind, roles::Roles};
use herald_core::{
    EndpointId, UserId,
    endpoint_secrets::seal_record,
    keyring::Keyring,
    metrics::{CacheResult, metrics},
    names,
    payload::{CarriedRecord, DeliveryJob, EndpointConfig, decode},
};
use herald_queue::endpoints::{self, EndpointCache, Found, UserEndpoints};
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, free_port, wait_until};
use serde_json::json;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::harness::{
    DEADLINE, Herald, TEST_KEY, add_endpoint, broker, test_config, worker_command,
};

/// Stops the cache's watch when the test ends, also when it fails.
struct Watching {
    cache: EndpointCache,
    stop: CancellationToken,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn watching(nats: &NatsServer, capacity: usize) -> Watching {
    let stop = CancellationToken::new();
    let cache = EndpointCache::start(
        &TaskTracker::new(),
        broker(nats).await,
        Arc::new(Keyring::parse(TEST_KEY).unwrap()),
        capacity,
        stop.clone(),
    );
    tokio::time::timeout(DEADLINE, cache.wait_watching())
        .await
        .expect("the endpoint cache did not start watching");
    Watching { cache, stop }
}

/// `herald_endpoint_cache_lookups_total{result}` of this process.
fn lookups(result: &'static str) -> u64 {
    metrics()
        .endpoint_cache_lookups
        .get_or_create(&CacheResult { result })
        .get()
}

fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

fn urls(found: &UserEndpoints) -> Vec<String> {
    found.all().iter().map(|e| e.url.clone()).collect()
}

/// Waits until the cache itself (no read of the bucket) holds for `user`
/// what `wanted` accepts.
async fn cached_until(
    cache: &EndpointCache,
    user: &UserId,
    what: &str,
    wanted: impl Fn(&UserEndpoints) -> bool,
) {
    wait_until(what, DEADLINE, || async {
        cache.peek(user).filter(|found| wanted(found)).map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_miss_is_read_and_the_watch_keeps_it_true() {
    let nats = NatsServer::start().await;
    let (first, _) = add_endpoint(&nats, "c1", "first", "https://one.example.com/in", None).await;
    add_endpoint(&nats, "c2", "other", "https://other.example.com/in", None).await;
    let w = watching(&nats, 100).await;
    let c1 = user("c1");

    // Nothing is read before it is asked for.
    assert!(w.cache.peek(&c1).is_none());
    assert_eq!(w.cache.cached_users(), 0);
    let (hits, misses) = (lookups("hit"), lookups("miss"));
    let found = w.cache.user(&c1).await.unwrap();
    assert_eq!(urls(&found), ["https://one.example.com/in"]);
    assert_eq!(found.hits(), 0, "just read");
    assert_eq!(w.cache.cached_users(), 1, "only the user asked for");
    assert_eq!(w.cache.user(&c1).await.unwrap().hits(), 1);
    // Counted in the process-wide metrics, which other tests of this
    // binary add to as well: at least this test's miss and hit.
    assert!(lookups("miss") > misses, "the miss is counted");
    assert!(lookups("hit") > hits, "the hit is counted");

    // A changed URL and a second endpoint reach the cached user through
    // the watch.
    add_endpoint(&nats, "c1", "first", "https://moved.example.com/in", None).await;
    add_endpoint(&nats, "c1", "second", "https://two.example.com/in", None).await;
    cached_until(&w.cache, &c1, "the change to reach the cache", |found| {
        urls(found) == ["https://moved.example.com/in", "https://two.example.com/in"]
    })
    .await;

    // A deleted endpoint goes from the cache, and is not read back.
    endpoints::delete(&broker(&nats).await, &c1, &first.id)
        .await
        .unwrap();
    cached_until(&w.cache, &c1, "the delete to reach the cache", |found| {
        found.get(&first.id).is_none()
    })
    .await;
    let found = w.cache.user(&c1).await.unwrap();
    assert_eq!(urls(&found), ["https://two.example.com/in"]);
    assert!(
        w.cache
            .get(&c1, &EndpointId::new("default_first").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_user_cached_without_endpoints_learns_of_its_first() {
    let nats = NatsServer::start().await;
    add_endpoint(
        &nats,
        "someone",
        "else",
        "https://else.example.com/in",
        None,
    )
    .await;
    let w = watching(&nats, 100).await;
    let newcomer = user("newcomer");

    let found = w.cache.user(&newcomer).await.unwrap();
    assert!(found.all().is_empty());
    assert!(
        w.cache.peek(&newcomer).is_some(),
        "no endpoints is cached too"
    );

    add_endpoint(
        &nats,
        "newcomer",
        "first",
        "https://new.example.com/in",
        None,
    )
    .await;
    cached_until(
        &w.cache,
        &newcomer,
        "the first endpoint to reach the cache",
        |found| urls(found) == ["https://new.example.com/in"],
    )
    .await;
}

#[tokio::test]
async fn it_holds_no_more_users_than_its_capacity() {
    let nats = NatsServer::start().await;
    for n in 0..12 {
        add_endpoint(
            &nats,
            &format!("u{n}"),
            "hook",
            &format!("https://h{n}.example.com/in"),
            None,
        )
        .await;
    }
    let w = watching(&nats, 4).await;
    for round in 0..2 {
        for n in 0..12 {
            let found = w.cache.user(&user(&format!("u{n}"))).await.unwrap();
            assert_eq!(
                urls(&found),
                [format!("https://h{n}.example.com/in")],
                "round {round}"
            );
            assert!(w.cache.cached_users() <= 4, "{}", w.cache.cached_users());
        }
    }
    // The first users were dropped for the later ones.
    assert!(w.cache.peek(&user("u0")).is_none());
    assert!(w.cache.peek(&user("u11")).is_some());
}

#[tokio::test]
async fn after_a_nats_restart_it_misses_no_change() {
    let mut nats = NatsServer::start().await;
    let (hook, _) = add_endpoint(&nats, "r1", "hook", "https://before.example.com/in", None).await;
    let w = watching(&nats, 100).await;
    let r1 = user("r1");
    assert_eq!(
        urls(&w.cache.user(&r1).await.unwrap()),
        ["https://before.example.com/in"]
    );

    nats.stop().await;
    nats.start_again().await;
    // Changed while the watch may not be back yet: the cache must come to
    // show it either way (the watch resumes after the last change it saw,
    // or starts over empty).
    let broker = broker(&nats).await;
    endpoints::delete(&broker, &r1, &hook.id).await.unwrap();
    add_endpoint(&nats, "r1", "moved", "https://after.example.com/in", None).await;
    // Once the watch is back (it may have failed and been re-created,
    // and caches nothing until then), a lookup is cached again.
    wait_until(
        "the lookup to show the changes, cached",
        DEADLINE,
        || async {
            let found = w.cache.user(&r1).await.ok()?;
            (urls(&found) == ["https://after.example.com/in"]).then_some(())?;
            w.cache.peek(&r1).map(|_| ())
        },
    )
    .await;
    // And whatever it caches from now on stays true.
    add_endpoint(&nats, "r1", "moved", "https://later.example.com/in", None).await;
    cached_until(
        &w.cache,
        &r1,
        "the next change to reach the cache",
        |found| urls(found) == ["https://later.example.com/in"],
    )
    .await;
}

#[tokio::test]
async fn one_endpoint_met_once_is_read_alone_and_cached_when_met_again() {
    let nats = NatsServer::start().await;
    let (hook, _) = add_endpoint(&nats, "once", "hook", "https://once.example.com/in", None).await;
    add_endpoint(&nats, "once", "other", "https://other.example.com/in", None).await;
    let w = watching(&nats, 100).await;
    let once = user("once");

    let Found::Endpoint(found) = w.cache.endpoint(&once, &hook.id, None).await.unwrap() else {
        panic!("the endpoint was not found");
    };
    assert_eq!(found.url, "https://once.example.com/in");
    assert!(
        w.cache.peek(&once).is_none(),
        "a user met once is not cached"
    );

    // Met again: the user is read whole and cached.
    let Found::Endpoint(found) = w.cache.endpoint(&once, &hook.id, None).await.unwrap() else {
        panic!("the endpoint was not found");
    };
    assert_eq!(found.url, "https://once.example.com/in");
    let cached = w.cache.peek(&once).expect("cached when met again");
    assert_eq!(cached.all().len(), 2);

    // Deleted, it is missing from the cache and from a fresh read alike.
    endpoints::delete(&broker(&nats).await, &once, &hook.id)
        .await
        .unwrap();
    cached_until(&w.cache, &once, "the delete to reach the cache", |found| {
        found.get(&hook.id).is_none()
    })
    .await;
    assert!(matches!(
        w.cache.endpoint(&once, &hook.id, None).await.unwrap(),
        Found::Missing
    ));
    let fresh = watching(&nats, 100).await;
    assert!(matches!(
        fresh.cache.endpoint(&once, &hook.id, None).await.unwrap(),
        Found::Missing
    ));
}

/// What `reader` (another process's cache, as the task worker's) would
/// carry in a delivery job for the endpoint.
async fn carried_by(reader: &EndpointCache, endpoint: &EndpointConfig) -> CarriedRecord {
    reader
        .user(&endpoint.user)
        .await
        .unwrap()
        .carried(&endpoint.id)
        .expect("a readable endpoint has a record to carry")
}

/// `endpoint` sealed again with its URL changed to `url`, claiming the
/// revision and view of `carried`: the URL a lookup answers tells whether it used
/// the carried record or read the bucket.
fn resealed(endpoint: &EndpointConfig, url: &str, carried: &CarriedRecord) -> CarriedRecord {
    let changed = EndpointConfig {
        url: url.to_string(),
        ..endpoint.clone()
    };
    let sealed = seal_record(&changed, &Keyring::parse(TEST_KEY).unwrap());
    CarriedRecord {
        sealed: String::from_utf8(sealed).unwrap(),
        ..carried.clone()
    }
}

async fn url_found(
    cache: &EndpointCache,
    endpoint: &EndpointConfig,
    carried: &CarriedRecord,
) -> Option<String> {
    match cache
        .endpoint(&endpoint.user, &endpoint.id, Some(carried))
        .await
        .unwrap()
    {
        Found::Endpoint(found) => Some(found.url.clone()),
        Found::Missing => None,
        Found::Unreadable(why) => panic!("unreadable: {why}"),
    }
}

#[tokio::test]
async fn a_carried_record_is_used_only_while_the_watch_vouches_that_nothing_is_newer() {
    let nats = NatsServer::start().await;
    // Read by the task worker, then changed, before this worker's watch
    // starts: the watch cannot know of that change.
    let (before, _) = add_endpoint(
        &nats,
        "before",
        "hook",
        "https://before.example.com/v1",
        None,
    )
    .await;
    let reader = watching(&nats, 100).await;
    let read_before = carried_by(&reader.cache, &before).await;
    add_endpoint(
        &nats,
        "before",
        "hook",
        "https://before.example.com/v2",
        None,
    )
    .await;
    let w = watching(&nats, 100).await;
    let canary = user("canary");
    w.cache.user(&canary).await.unwrap();
    let (steady, _) = add_endpoint(
        &nats,
        "steady",
        "hook",
        "https://steady.example.com/in",
        None,
    )
    .await;
    let (changed, _) = add_endpoint(
        &nats,
        "changed",
        "hook",
        "https://changed.example.com/v1",
        None,
    )
    .await;
    let (deleted, _) = add_endpoint(
        &nats,
        "deleted",
        "hook",
        "https://deleted.example.com/in",
        None,
    )
    .await;
    let (victim, _) = add_endpoint(
        &nats,
        "victim",
        "hook",
        "https://victim.example.com/in",
        None,
    )
    .await;
    let (mallory, _) = add_endpoint(
        &nats,
        "mallory",
        "hook",
        "https://mallory.example.com/in",
        None,
    )
    .await;
    assert_eq!(victim.id, mallory.id, "two tenants, one endpoint name");

    // Nothing changed since: used as carried, the bucket not read (the
    // resealed URL is nowhere in the bucket).
    let carried = carried_by(&reader.cache, &steady).await;
    let carried = resealed(&steady, "https://carried.example.com/in", &carried);
    assert_eq!(
        url_found(&w.cache, &steady, &carried).await.as_deref(),
        Some("https://carried.example.com/in")
    );
    assert!(
        w.cache.peek(&steady.user).is_none(),
        "a carried record fills no cache"
    );

    // Changed and deleted after the job was made, once the watch has
    // delivered the changes (the canary, written last, shows it has).
    let old_changed = carried_by(&reader.cache, &changed).await;
    let old_deleted = carried_by(&reader.cache, &deleted).await;
    add_endpoint(
        &nats,
        "changed",
        "hook",
        "https://changed.example.com/v2",
        None,
    )
    .await;
    endpoints::delete(&broker(&nats).await, &deleted.user, &deleted.id)
        .await
        .unwrap();
    add_endpoint(
        &nats,
        "canary",
        "hook",
        "https://canary.example.com/v1",
        None,
    )
    .await;
    cached_until(
        &w.cache,
        &canary,
        "the watch to deliver the canary",
        |found| urls(found) == ["https://canary.example.com/v1"],
    )
    .await;
    assert_eq!(
        url_found(&w.cache, &changed, &old_changed).await.as_deref(),
        Some("https://changed.example.com/v2"),
        "an update after the carried view is read"
    );
    assert_eq!(
        url_found(&w.cache, &deleted, &old_deleted).await,
        None,
        "a deleted endpoint is never used from a job"
    );

    // A view from before the watch started: read, not trusted.
    assert_eq!(
        url_found(&w.cache, &before, &read_before).await.as_deref(),
        Some("https://before.example.com/v2")
    );

    // Another tenant's record, carried in a job of mallory's endpoint of
    // the same name and claiming to be newer than anything, as a forged
    // job could, does not open under mallory's key: mallory's own record
    // is read, and the victim's URL never answered.
    let stolen = CarriedRecord {
        revision: u64::MAX,
        as_of: u64::MAX,
        ..carried_by(&reader.cache, &victim).await
    };
    assert_eq!(
        url_found(&w.cache, &mallory, &stolen).await.as_deref(),
        Some("https://mallory.example.com/in")
    );
}

/// `herald_endpoint_cache_lookups_total{result}` in a worker's /metrics.
async fn lookups_of(metrics_url: &str, result: &str) -> u64 {
    let text = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("herald_endpoint_cache_lookups_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn a_webhook_worker_of_its_own_uses_the_records_a_user_s_first_jobs_carry() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let (hooks, _) = add_endpoint(&nats, "carry", "hooks", &receiver.url("/hooks"), None).await;
    // The webhook worker in a process of its own, as in a Deployment, so
    // it shares no cache with the task worker; watching before the task
    // worker reads the endpoint.
    let probes = format!("127.0.0.1:{}", free_port());
    let _webhooks = worker_command(&nats, "webhooks", &[("HERALD_HEALTH__LISTEN", &probes)])
        .spawn()
        .expect("start herald worker");
    wait_until("the webhook worker to be ready", DEADLINE, || async {
        let ready = reqwest::get(format!("http://{probes}/readyz")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks].into(),
    };
    let herald = Herald::start(test_config(&nats, None), roles).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut jobs = client
        .subscribe(names::webhook_subject(&hooks.user, &hooks.id))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut next_job = async || -> DeliveryJob {
        let message = tokio::time::timeout(DEADLINE, jobs.next())
            .await
            .expect("no delivery job in time")
            .unwrap();
        decode(&message.payload).unwrap()
    };

    // The user's first task: its job carries the record the task worker
    // read, and the webhook worker sends with it, reading nothing.
    herald.accept("carry", "echo", json!({ "n": 1 })).await;
    let first = next_job().await;
    let carried = first.record.expect("the first job carries the record");
    assert!(carried.revision <= carried.as_of);
    receiver.wait_for(1, DEADLINE).await;
    let metrics_url = format!("http://{probes}/metrics");
    assert_eq!(lookups_of(&metrics_url, "carried").await, 1);
    assert_eq!(lookups_of(&metrics_url, "miss").await, 0);

    // Met again in the task worker's cache: the job carries nothing, and
    // the webhook worker, meeting the user again, reads it.
    herald.accept("carry", "echo", json!({ "n": 2 })).await;
    assert_eq!(next_job().await.record, None);
    receiver.wait_for(2, DEADLINE).await;
    assert_eq!(lookups_of(&metrics_url, "carried").await, 1);
    assert_eq!(lookups_of(&metrics_url, "miss").await, 1);
    assert_eq!(receiver.received().len(), 2, "each task delivered once");
    herald.stop().await;
}
