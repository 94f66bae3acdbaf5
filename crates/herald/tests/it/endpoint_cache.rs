//! The workers' bounded endpoint cache against a real NATS server: a miss
//! is read from the bucket, the watch keeps what is cached true (a change
//! updates it, a delete removes it, a first endpoint reaches a user cached
//! as having none), it never holds more users than its capacity, a user
//! whose one endpoint is looked up once is read alone and cached only when
//! met again, and no change made around a NATS restart is missed.

use std::sync::Arc;

use herald_core::{
    EndpointId, UserId,
    keyring::Keyring,
    metrics::{CacheResult, metrics},
};
use herald_queue::endpoints::{self, EndpointCache, Found, UserEndpoints};
use herald_testkit::{NatsServer, wait_until};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::harness::{DEADLINE, TEST_KEY, add_endpoint, broker};

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
    assert_eq!(w.cache.cached_users(), 1, "only the user asked for");
    w.cache.user(&c1).await.unwrap();
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

    let Found::Endpoint(found) = w.cache.endpoint(&once, &hook.id).await.unwrap() else {
        panic!("the endpoint was not found");
    };
    assert_eq!(found.url, "https://once.example.com/in");
    assert!(
        w.cache.peek(&once).is_none(),
        "a user met once is not cached"
    );

    // Met again: the user is read whole and cached.
    let Found::Endpoint(found) = w.cache.endpoint(&once, &hook.id).await.unwrap() else {
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
        w.cache.endpoint(&once, &hook.id).await.unwrap(),
        Found::Missing
    ));
    let fresh = watching(&nats, 100).await;
    assert!(matches!(
        fresh.cache.endpoint(&once, &hook.id).await.unwrap(),
        Found::Missing
    ));
}
