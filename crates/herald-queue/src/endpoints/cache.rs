//! The endpoints a worker has looked up in `herald-endpoints`: a bounded
//! cache, filled on demand and kept true by one KV watch.
//!
//! A worker's memory and start-up do not grow with the bucket: a lookup
//! that misses reads that one user's records with a single batched direct
//! get (`multi_last` on `<user>.*`), and keeps them among the
//! `capacity` users looked up most recently. The watch starts where the
//! bucket is at start-up and applies every later change to the users
//! cached; so a worker is ready as soon as its watch is, whatever the
//! bucket holds.
//!
//! A change the watch delivers while a user's records are being read is
//! kept and applied to what the read returns, when newer than it. Every
//! reply of the batched read carries the stream sequence it is as of, so
//! "newer" is exact. The watch (an ordered consumer) resumes after the last
//! change it delivered across reconnects by itself; when it fails instead,
//! nothing is cached until it is re-created: lookups read the bucket, and
//! the cache starts empty with the next watch, so no change missed
//! meanwhile lingers.
//!
//! Records are sealed with the [`Keyring`] (see
//! [`herald_core::endpoint_secrets`]). One that cannot be opened (a key
//! missing from this process's keyring, a record written in clear or
//! altered) is logged as an error and reported by
//! [`UserEndpoints::unreadable`]; if an earlier version of it was readable
//! and is cached, that version stays in use rather than the endpoint
//! vanishing.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::Hash,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use async_nats::{HeaderMap, jetstream::kv};
use bytes::Bytes;
use futures::StreamExt;
use herald_core::{
    EndpointId, UserId,
    endpoint_secrets::{OpenedRecord, open_record},
    keyring::Keyring,
    metrics::{CacheResult, metrics},
    names,
    payload::{CarriedRecord, EndpointConfig},
};
use tokio::sync::{OnceCell, mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Broker, QueueError, backoff::Backoff, buckets::Bucket, connect::REQUEST_TIMEOUT};

/// The most records one batched direct get returns (the server's limit);
/// a user with more endpoints cannot be looked up.
const MAX_ENDPOINTS_PER_USER: usize = 1024;

/// Changes the watch remembers, whatever users they are of, so that a
/// read answered by a replica that has not seen one yet is noticed (see
/// [`EndpointCache::user`]).
const RECENT_CHANGES: usize = 4096;

/// How many times a lookup reads again an answer older than what the
/// watch has already delivered, before using it uncached.
const STALE_READS: usize = 3;

/// One user's endpoints, as of a revision of the bucket.
#[derive(Debug, Clone, Default)]
pub struct UserEndpoints {
    /// Every change up to this stream sequence is reflected.
    as_of: u64,
    /// Sorted by id.
    endpoints: Vec<Arc<EndpointConfig>>,
    /// Endpoints whose record could not be read: their key, and why.
    unreadable: BTreeMap<EndpointId, (String, String)>,
    /// The stored record (revision, sealed bytes) of each endpoint in
    /// `endpoints`, for a delivery job to carry.
    sealed: HashMap<EndpointId, (u64, Bytes)>,
    /// Lookups answered with this view from the cache since it was read
    /// (shared by the copies the watch's changes make of it).
    hits: Arc<AtomicU64>,
}

impl UserEndpoints {
    /// Every endpoint of the user, in a stable order.
    pub fn all(&self) -> &[Arc<EndpointConfig>] {
        &self.endpoints
    }

    pub fn get(&self, endpoint: &EndpointId) -> Option<&Arc<EndpointConfig>> {
        self.endpoints.iter().find(|e| &e.id == endpoint)
    }

    /// Why the record of `endpoint` cannot be read, when it cannot (an
    /// earlier version may still be in use).
    pub fn unreadable(&self, endpoint: &EndpointId) -> Option<&str> {
        self.unreadable.get(endpoint).map(|(_, why)| why.as_str())
    }

    /// How many lookups the cache answered with this view since it was
    /// read from the bucket: 0 for a view just read.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The stored record of `endpoint`, for a delivery job to carry to the
    /// webhook worker; none while a later version cannot be read (the
    /// earlier one in use here is not the key's record any more).
    pub fn carried(&self, endpoint: &EndpointId) -> Option<CarriedRecord> {
        if self.unreadable.contains_key(endpoint) {
            return None;
        }
        let (revision, sealed) = self.sealed.get(endpoint)?;
        Some(CarriedRecord {
            revision: *revision,
            as_of: self.as_of,
            sealed: std::str::from_utf8(sealed).ok()?.to_string(),
        })
    }

    /// An endpoint whose record cannot be read and of which no earlier
    /// version is known, as its key and why; `None` in the normal case.
    pub fn unreadable_without_earlier_version(&self) -> Option<(String, String)> {
        self.unreadable
            .iter()
            .find(|(endpoint, _)| self.get(endpoint).is_none())
            .map(|(_, unreadable)| unreadable.clone())
    }

    fn apply(&mut self, change: &Change, keyring: &Keyring) {
        self.as_of = self.as_of.max(change.revision);
        let endpoint = &change.endpoint;
        let Some(value) = &change.value else {
            self.endpoints.retain(|e| &e.id != endpoint);
            self.unreadable.remove(endpoint);
            self.sealed.remove(endpoint);
            return;
        };
        match open_record(&change.key, value, keyring) {
            Ok(OpenedRecord { config, .. }) => {
                self.endpoints.retain(|e| &e.id != endpoint);
                self.endpoints.push(Arc::new(config));
                self.endpoints.sort_by(|a, b| a.id.cmp(&b.id));
                self.unreadable.remove(endpoint);
                self.sealed
                    .insert(endpoint.clone(), (change.revision, value.clone()));
            }
            Err(e) => {
                let kept = self.get(endpoint).is_some();
                tracing::error!(
                    key = change.key,
                    reason = e.label(),
                    error = %e,
                    kept_previous_version = kept,
                    "cannot read endpoint record"
                );
                self.unreadable
                    .insert(endpoint.clone(), (change.key.clone(), e.to_string()));
            }
        }
    }
}

/// What a lookup of one endpoint found.
#[derive(Debug, Clone)]
pub enum Found {
    Endpoint(Arc<EndpointConfig>),
    /// Its record cannot be read (why), and no earlier version is known.
    Unreadable(String),
    /// No record.
    Missing,
}

impl Found {
    fn in_user(found: &UserEndpoints, endpoint: &EndpointId) -> Self {
        match (found.get(endpoint), found.unreadable(endpoint)) {
            (Some(config), _) => Found::Endpoint(config.clone()),
            (None, Some(why)) => Found::Unreadable(why.to_string()),
            (None, None) => Found::Missing,
        }
    }
}

/// A put or a removal of one endpoint record, from the watch or a read.
#[derive(Debug, Clone)]
struct Change {
    key: String,
    endpoint: EndpointId,
    revision: u64,
    /// The sealed record; `None` for a delete or a purge.
    value: Option<Bytes>,
}

/// A user's records as one batched direct get returned them.
struct Read {
    changes: Vec<Change>,
    /// The stream sequence the answer is as of; `None` when the user has
    /// no record (the server's "no results" says no more).
    as_of: Option<u64>,
}

/// The endpoints of the users looked up most recently, for every role of
/// a process. Cheap to clone.
#[derive(Clone)]
pub struct EndpointCache {
    inner: Arc<Inner>,
    watching: watch::Receiver<bool>,
}

struct Inner {
    broker: Broker,
    keyring: Arc<Keyring>,
    state: Mutex<State>,
    replies: Replies,
}

struct State {
    /// Counts the watch's (re)starts: a read begun under an earlier one
    /// may have missed changes, and is not kept.
    epoch: u64,
    /// Whether the watch is following the bucket; while not, nothing is
    /// cached.
    live: bool,
    /// The stream sequence of the last change the watch delivered, or where
    /// it started.
    watched: u64,
    users: RecentlyUsed<UserId, Arc<UserEndpoints>>,
    /// Users looked up once by [`EndpointCache::endpoint`] and not cached.
    met_once: RecentlyUsed<UserId, ()>,
    /// Users being read, with the changes to them the watch delivered
    /// meanwhile.
    reading: HashMap<UserId, Reading>,
    recent: RecentChanges,
}

#[derive(Default)]
struct Reading {
    readers: usize,
    changes: Vec<Change>,
}

impl EndpointCache {
    /// Starts watching the bucket, on `tasks`, until `shutdown`, keeping
    /// the endpoints of at most `capacity` users. Use
    /// [`Self::wait_watching`] before the first lookup that must see every
    /// change from then on.
    pub fn start(
        tasks: &TaskTracker,
        broker: Broker,
        keyring: Arc<Keyring>,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (watching_tx, watching) = watch::channel(false);
        let inner = Arc::new(Inner {
            replies: Replies::new(tasks.clone(), shutdown.clone()),
            broker,
            keyring,
            state: Mutex::new(State {
                epoch: 0,
                live: false,
                watched: 0,
                users: RecentlyUsed::new(capacity),
                met_once: RecentlyUsed::new(capacity),
                reading: HashMap::new(),
                recent: RecentChanges::default(),
            }),
        });
        tasks.spawn(follow(inner.clone(), watching_tx, shutdown));
        Self { inner, watching }
    }

    /// Waits until the watch has started for the first time.
    pub async fn wait_watching(&self) {
        let mut watching = self.watching.clone();
        let _ = watching.wait_for(|watching| *watching).await;
    }

    /// The endpoints of `user`: from the cache, or read from the bucket
    /// (and cached). Fails only when the bucket cannot be read.
    ///
    /// A read may be answered by a replica that has not yet seen a change
    /// the watch (on the stream's leader) already delivered; such an
    /// answer is read again, and used uncached if it stays behind.
    pub async fn user(&self, user: &UserId) -> Result<Arc<UserEndpoints>, QueueError> {
        let (epoch, watched) = {
            let mut state = self.inner.lock();
            if let Some(found) = state.users.get(user) {
                let found = found.clone();
                found.hits.fetch_add(1, Ordering::Relaxed);
                count_lookup("hit");
                return Ok(found);
            }
            count_lookup("miss");
            state.reading.entry(user.clone()).or_default().readers += 1;
            (state.live.then_some(state.epoch), state.watched)
        };
        let reading = ReadingGuard {
            inner: &self.inner,
            user,
        };
        let mut stale_reads = 0;
        let (read, behind) = loop {
            let read = self.inner.read(user).await?;
            let behind = match read.as_of {
                Some(as_of) => as_of < watched,
                // No record: wrong if the watch has seen the user's last
                // change be a put.
                None => self.inner.lock().recent.last_was_put(user),
            };
            if !behind || stale_reads == STALE_READS {
                break (read, behind);
            }
            stale_reads += 1;
        };
        let mut found = UserEndpoints {
            as_of: read.as_of.unwrap_or(watched),
            ..Default::default()
        };
        for change in &read.changes {
            found.apply(change, &self.inner.keyring);
        }
        let mut state = self.inner.lock();
        if let Some(meanwhile) = state.reading.get(user) {
            for change in &meanwhile.changes {
                if change.revision > found.as_of {
                    found.apply(change, &self.inner.keyring);
                }
            }
        }
        let found = Arc::new(found);
        let current = state.live && Some(state.epoch) == epoch;
        if current && !behind {
            state.users.insert(user.clone(), found.clone());
            metrics().endpoint_cache_users.set(state.users.len() as i64);
        }
        drop(state);
        drop(reading);
        Ok(found)
    }

    /// What the cache holds for `user`, without reading the bucket or
    /// counting as a use.
    pub fn peek(&self, user: &UserId) -> Option<Arc<UserEndpoints>> {
        self.inner.lock().users.peek(user).cloned()
    }

    /// How many users' endpoints the cache holds.
    pub fn cached_users(&self) -> usize {
        self.inner.lock().users.len()
    }

    /// One endpoint of `user`: from the cache when it holds the user.
    /// Otherwise the one record is read (a single-key direct get, one
    /// reply), and the user's records are read whole and cached only when
    /// the user is looked up again while still remembered as met once: a
    /// user met once (a spread over more users than the cache holds) costs
    /// no batched read and pushes no user met often out of the cache.
    ///
    /// `carried`: the record as a delivery job carries it (the task
    /// worker's view, true as of a sequence of the bucket). Used instead of
    /// the one-record read when the watch vouches for it: it is following
    /// the bucket, remembers every change it delivered after that sequence,
    /// and none of them is to this key. So it is as true as a cached user,
    /// whose changes arrive by the same watch. A carried record that does
    /// not open for this key (another endpoint's, or altered) is not used.
    pub async fn endpoint(
        &self,
        user: &UserId,
        endpoint: &EndpointId,
        carried: Option<&CarriedRecord>,
    ) -> Result<Found, QueueError> {
        let met_before = {
            let mut state = self.inner.lock();
            if let Some(cached) = state.users.get(user) {
                let cached = cached.clone();
                count_lookup("hit");
                return Ok(Found::in_user(&cached, endpoint));
            }
            let met_before = state.met_once.get(user).is_some();
            if !met_before {
                state.met_once.insert(user.clone(), ());
            }
            met_before
        };
        if met_before {
            return Ok(Found::in_user(&*self.user(user).await?, endpoint));
        }
        if let Some(found) =
            carried.and_then(|carried| self.inner.open_carried(user, endpoint, carried))
        {
            count_lookup("carried");
            return Ok(found);
        }
        count_lookup("miss");
        let store = self.inner.broker.bucket(Bucket::Endpoints).await?;
        let key = names::endpoint_key(user, endpoint);
        let mut stale_reads = 0;
        let entry = loop {
            let entry = store
                .entry(key.as_str())
                .await
                .map_err(|e| QueueError::request("read endpoint", e))?
                .filter(|entry| entry.operation == kv::Operation::Put);
            // Older than a change of the key the watch has delivered: a
            // replica behind the stream's leader answered.
            let behind = match (self.inner.lock().recent.last_of_key(&key), &entry) {
                (None, _) => false,
                (Some((_, put)), None) => put,
                (Some((revision, _)), Some(entry)) => entry.revision < revision,
            };
            if !behind || stale_reads == STALE_READS {
                break entry;
            }
            stale_reads += 1;
        };
        let Some(entry) = entry else {
            return Ok(Found::Missing);
        };
        let mut found = UserEndpoints::default();
        found.apply(
            &Change {
                endpoint: endpoint.clone(),
                revision: entry.revision,
                value: Some(entry.value),
                key,
            },
            &self.inner.keyring,
        );
        Ok(Found::in_user(&found, endpoint))
    }

    /// One endpoint of `user`, as [`Self::endpoint`] finds it; `None` when
    /// it is missing or unreadable.
    pub async fn get(
        &self,
        user: &UserId,
        endpoint: &EndpointId,
    ) -> Result<Option<Arc<EndpointConfig>>, QueueError> {
        Ok(match self.endpoint(user, endpoint, None).await? {
            Found::Endpoint(config) => Some(config),
            Found::Unreadable(_) | Found::Missing => None,
        })
    }
}

fn count_lookup(result: &'static str) {
    metrics()
        .endpoint_cache_lookups
        .get_or_create(&CacheResult { result })
        .inc();
}

/// Ends a lookup's registration as a reader of its user, also when the
/// lookup is dropped half-way.
struct ReadingGuard<'a> {
    inner: &'a Inner,
    user: &'a UserId,
}

impl Drop for ReadingGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(reading) = state.reading.get_mut(self.user) {
            reading.readers -= 1;
            if reading.readers == 0 {
                state.reading.remove(self.user);
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// `carried`, opened, when the watch vouches that no change to it
    /// came after it (see [`EndpointCache::endpoint`]).
    fn open_carried(
        &self,
        user: &UserId,
        endpoint: &EndpointId,
        carried: &CarriedRecord,
    ) -> Option<Found> {
        let key = names::endpoint_key(user, endpoint);
        {
            let state = self.lock();
            if !state.live || !state.recent.vouches_for(&key, carried) {
                return None;
            }
        }
        match open_record(&key, carried.sealed.as_bytes(), &self.keyring) {
            Ok(OpenedRecord { config, .. }) => Some(Found::Endpoint(Arc::new(config))),
            Err(e) => {
                tracing::warn!(key, reason = e.label(), error = %e, "a delivery job carries an endpoint record that does not open; reading the bucket");
                None
            }
        }
    }

    /// Reads the last record of every `<user>.*` key with one batched
    /// direct get.
    async fn read(&self, user: &UserId) -> Result<Read, QueueError> {
        const OPERATION: &str = "read endpoints";
        if !self.broker.is_connected() {
            return Err(QueueError::Disconnected);
        }
        let store = self.broker.bucket(Bucket::Endpoints).await?;
        let mut replies = self.replies.expect(&self.broker).await?;
        let request = serde_json::json!({ "multi_last": [format!("{}{user}.*", store.prefix)] });
        self.broker
            .client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", store.stream_name),
                replies.subject.clone(),
                request.to_string().into(),
            )
            .await
            .map_err(|e| QueueError::request(OPERATION, e))?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut changes = Vec::new();
        loop {
            let reply = tokio::time::timeout_at(deadline, replies.next.recv())
                .await
                .map_err(|_| QueueError::request(OPERATION, "no answer in time"))?
                .ok_or_else(|| QueueError::request(OPERATION, "the subscription ended"))?;
            let headers = reply.headers.as_ref();
            match reply.status.map(|status| status.as_u16()) {
                None => {
                    let change = headers
                        .and_then(|headers| record_of(&store.prefix, headers, reply.payload))
                        .ok_or_else(|| {
                            QueueError::request(
                                OPERATION,
                                "a reply without its subject or sequence",
                            )
                        })?;
                    changes.push(change);
                }
                // The end of the batch, with the sequence it is as of.
                Some(204) => {
                    let as_of = headers
                        .and_then(|headers| headers.get("Nats-UpTo-Sequence"))
                        .and_then(|value| value.as_str().parse().ok())
                        .ok_or_else(|| {
                            QueueError::request(
                                OPERATION,
                                "the end of the batch without its sequence",
                            )
                        })?;
                    return Ok(Read {
                        changes,
                        as_of: Some(as_of),
                    });
                }
                Some(404) if changes.is_empty() => {
                    return Ok(Read {
                        changes,
                        as_of: None,
                    });
                }
                Some(413) => {
                    return Err(QueueError::request(
                        OPERATION,
                        format!("user {user} has more than {MAX_ENDPOINTS_PER_USER} endpoints"),
                    ));
                }
                Some(status) => {
                    let why = reply.description.unwrap_or_default();
                    return Err(QueueError::request(
                        OPERATION,
                        format!("NATS answered {status} {why}"),
                    ));
                }
            }
        }
    }

    /// A change the watch delivered.
    fn changed(&self, entry: kv::Entry) {
        let Some((user, endpoint)) = names::parse_endpoint_key(&entry.key) else {
            tracing::warn!(
                key = entry.key,
                "ignoring endpoint key that is not <user>.<endpoint> with valid tokens"
            );
            return;
        };
        let change = Change {
            endpoint,
            revision: entry.revision,
            value: (entry.operation == kv::Operation::Put).then_some(entry.value),
            key: entry.key,
        };
        let mut state = self.lock();
        state.watched = change.revision;
        state
            .recent
            .remember(&user, &change.key, change.revision, change.value.is_some());
        if let Some(reading) = state.reading.get_mut(&user) {
            reading.changes.push(change.clone());
        }
        if let Some(cached) = state.users.get_mut(&user)
            && change.revision > cached.as_of
        {
            Arc::make_mut(cached).apply(&change, &self.keyring);
        }
    }

    /// The watch started at `revision`, or stopped (`None`): either way,
    /// what was cached may have missed changes.
    fn restart(&self, revision: Option<u64>) {
        let mut state = self.lock();
        state.users.clear();
        state.recent = match revision {
            Some(revision) => RecentChanges::after(revision),
            None => RecentChanges::default(),
        };
        metrics().endpoint_cache_users.set(0);
        match revision {
            Some(revision) => {
                state.epoch += 1;
                state.live = true;
                state.watched = revision;
            }
            None => state.live = false,
        }
    }
}

/// The replies of every batched read of a process, on one subscription
/// (`<inbox>.<n>`, a wildcard made once) rather than one subscribed and
/// removed per read: a subscription change costs the server more than the
/// read itself.
struct Replies {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    routes: OnceCell<Arc<Routes>>,
}

#[derive(Default)]
struct Routes {
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>,
}

/// The replies to one read, until dropped.
struct Expected {
    routes: Arc<Routes>,
    id: u64,
    subject: String,
    next: mpsc::UnboundedReceiver<async_nats::Message>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        lock(&self.routes.waiting).remove(&self.id);
    }
}

impl Replies {
    fn new(tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            tasks,
            shutdown,
            routes: OnceCell::new(),
        }
    }

    /// A subject for one read's replies, and where they arrive.
    async fn expect(&self, broker: &Broker) -> Result<Expected, QueueError> {
        let routes = self
            .routes
            .get_or_try_init(|| async {
                let prefix = broker.client.new_inbox();
                let subscription = broker
                    .client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(|e| QueueError::request("read endpoints", e))?;
                let routes = Arc::new(Routes {
                    prefix,
                    ..Default::default()
                });
                self.tasks
                    .spawn(route(subscription, routes.clone(), self.shutdown.clone()));
                Ok::<_, QueueError>(routes)
            })
            .await?
            .clone();
        let id = routes.next.fetch_add(1, Ordering::Relaxed);
        let (sender, next) = mpsc::unbounded_channel();
        lock(&routes.waiting).insert(id, sender);
        Ok(Expected {
            subject: format!("{}.{id}", routes.prefix),
            routes,
            id,
            next,
        })
    }
}

/// Hands each reply to the read waiting for it, until `shutdown`; a reply
/// nobody waits for any more (a read that gave up) is dropped.
async fn route(
    mut subscription: async_nats::Subscriber,
    routes: Arc<Routes>,
    shutdown: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            reply = subscription.next() => match reply {
                Some(reply) => reply,
                None => return,
            },
        };
        let id = reply
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| id.parse().ok());
        if let Some(waiting) = id.and_then(|id| lock(&routes.waiting).get(&id).cloned()) {
            let _ = waiting.send(reply);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record of a batched direct get: the key from `Nats-Subject`, the
/// revision from `Nats-Sequence`, a delete or purge from `KV-Operation`.
fn record_of(prefix: &str, headers: &HeaderMap, payload: Bytes) -> Option<Change> {
    let subject = headers.get(async_nats::header::NATS_SUBJECT)?.as_str();
    let key = subject.strip_prefix(prefix)?.to_string();
    let revision = headers
        .get(async_nats::header::NATS_SEQUENCE)?
        .as_str()
        .parse()
        .ok()?;
    let removed = headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
    let (_, endpoint) = names::parse_endpoint_key(&key)?;
    Some(Change {
        key,
        endpoint,
        revision,
        value: (!removed).then_some(payload),
    })
}

/// Follows the bucket until `shutdown`, starting over after a failure.
async fn follow(inner: Arc<Inner>, watching: watch::Sender<bool>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = follow_once(&inner, &watching, &mut backoff) => result,
        };
        inner.restart(None);
        if let Err(e) = result {
            tracing::warn!(view = "endpoint cache", error = %e, retry_in = ?backoff.delay(), "bucket watch interrupted");
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
}

async fn follow_once(
    inner: &Inner,
    watching: &watch::Sender<bool>,
    backoff: &mut Backoff,
) -> Result<(), QueueError> {
    let store = inner.broker.bucket(Bucket::Endpoints).await?;
    let last = store
        .stream
        .get_info()
        .await
        .map_err(|e| QueueError::request("bucket status", e))?
        .state
        .last_sequence;
    let mut watch = store
        .watch_all_from_revision(last + 1)
        .await
        .map_err(|e| QueueError::request("watch bucket", e))?;
    inner.restart(Some(last));
    watching.send_replace(true);
    backoff.reset();
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| QueueError::request("watch bucket", e))?;
        inner.changed(entry);
    }
    Ok(())
}

/// At most `capacity` values, the most recently used kept: two
/// generations, the current one turned into the previous one (and that
/// one dropped) when it fills half the capacity; a value used from the
/// previous generation moves back into the current one. Close to least
/// recently used eviction at the cost of a map lookup or two.
struct RecentlyUsed<K, V> {
    half: usize,
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
}

impl<K: Hash + Eq + Clone, V> RecentlyUsed<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            half: (capacity / 2).max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    fn get(&mut self, key: &K) -> Option<&V> {
        if !self.current.contains_key(key) {
            let value = self.previous.remove(key)?;
            self.insert(key.clone(), value);
        }
        self.peek(key)
    }

    fn peek(&self, key: &K) -> Option<&V> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.current.get_mut(key) {
            Some(value) => Some(value),
            None => self.previous.get_mut(key),
        }
    }

    fn insert(&mut self, key: K, value: V) {
        self.previous.remove(&key);
        self.current.insert(key, value);
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

/// The last [`RECENT_CHANGES`] changes the watch delivered, whatever users
/// they are of: each user's and each key's last one, and whether it was a
/// put.
struct RecentChanges {
    order: VecDeque<(UserId, String, u64)>,
    by_user: HashMap<UserId, (u64, bool)>,
    by_key: HashMap<String, (u64, bool)>,
    /// Every change after this revision that the watch delivered is
    /// remembered: where the watch started, then the last one forgotten.
    complete_after: u64,
}

impl Default for RecentChanges {
    /// Remembering nothing, of no watch: vouches for no revision.
    fn default() -> Self {
        Self::after(u64::MAX)
    }
}

impl RecentChanges {
    /// Of a watch that delivers every change after `revision`.
    fn after(revision: u64) -> Self {
        Self {
            order: VecDeque::new(),
            by_user: HashMap::new(),
            by_key: HashMap::new(),
            complete_after: revision,
        }
    }

    /// Whether `carried` is still the key's record: the view it comes
    /// from is as of a sequence from which on every change delivered is
    /// remembered, and none of them is to the key.
    fn vouches_for(&self, key: &str, carried: &CarriedRecord) -> bool {
        carried.as_of >= self.complete_after
            && self
                .by_key
                .get(key)
                .is_none_or(|(last, _)| *last <= carried.revision)
    }

    fn remember(&mut self, user: &UserId, key: &str, revision: u64, put: bool) {
        self.order
            .push_back((user.clone(), key.to_string(), revision));
        self.by_user.insert(user.clone(), (revision, put));
        self.by_key.insert(key.to_string(), (revision, put));
        if self.order.len() > RECENT_CHANGES
            && let Some((user, key, revision)) = self.order.pop_front()
        {
            self.complete_after = revision;
            if self
                .by_user
                .get(&user)
                .is_some_and(|(last, _)| *last == revision)
            {
                self.by_user.remove(&user);
            }
            if self
                .by_key
                .get(&key)
                .is_some_and(|(last, _)| *last == revision)
            {
                self.by_key.remove(&key);
            }
        }
    }

    fn last_was_put(&self, user: &UserId) -> bool {
        self.by_user.get(user).is_some_and(|(_, put)| *put)
    }

    /// The revision of the key's last change, and whether it was a put.
    fn last_of_key(&self, key: &str) -> Option<(u64, bool)> {
        self.by_key.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::endpoint_secrets::seal_record;

    #[test]
    fn keeps_at_most_its_capacity_and_the_most_recently_used() {
        let mut cache = RecentlyUsed::new(4);
        cache.insert(0, 0);
        cache.insert(1, 10);
        // Used again, 0 outlives 1, which went in after it.
        assert_eq!(cache.get(&0), Some(&0));
        cache.insert(2, 20);
        cache.insert(3, 30);
        assert_eq!(cache.get(&1), None);
        assert_eq!(cache.get(&0), Some(&0));
        assert_eq!(cache.get(&3), Some(&30));
        for key in 4..1000 {
            cache.insert(key, key);
            assert!(cache.len() <= 4);
        }
        cache.clear();
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_user_s_and_a_key_s_last_change_are_remembered_for_a_while() {
        let alice = UserId::new("alice").unwrap();
        let bob = UserId::new("bob").unwrap();
        let mut recent = RecentChanges::default();
        recent.remember(&alice, "alice.a", 1, true);
        assert!(recent.last_was_put(&alice));
        recent.remember(&alice, "alice.a", 2, false);
        assert!(!recent.last_was_put(&alice));
        assert_eq!(recent.last_of_key("alice.a"), Some((2, false)));
        recent.remember(&alice, "alice.b", 3, true);
        assert_eq!(recent.last_of_key("alice.a"), Some((2, false)));
        assert_eq!(recent.last_of_key("alice.b"), Some((3, true)));
        for revision in 4..(4 + RECENT_CHANGES as u64 - 1) {
            recent.remember(&bob, "bob.x", revision, true);
        }
        // Alice's last change is still among the last RECENT_CHANGES...
        assert!(recent.last_was_put(&alice));
        assert_eq!(recent.last_of_key("alice.b"), Some((3, true)));
        recent.remember(&bob, "bob.x", 1_000_000, true);
        // ...and now it is not.
        assert!(!recent.last_was_put(&alice));
        assert_eq!(recent.last_of_key("alice.b"), None);
        assert!(recent.by_user.len() <= 2 && recent.by_key.len() <= 3);
    }

    #[test]
    fn it_vouches_only_for_records_whose_later_changes_it_remembers() {
        let carol = UserId::new("carol").unwrap();
        let record = |revision, as_of| CarriedRecord {
            revision,
            as_of,
            sealed: String::new(),
        };
        assert!(
            !RecentChanges::default().vouches_for("carol.a", &record(1, u64::MAX - 1)),
            "no watch, no vouching"
        );
        // A watch that started after sequence 10.
        let mut recent = RecentChanges::after(10);
        assert!(
            !recent.vouches_for("carol.a", &record(3, 9)),
            "a view from before the watch"
        );
        assert!(recent.vouches_for("carol.a", &record(3, 10)));
        recent.remember(&carol, "carol.a", 12, true);
        assert!(
            !recent.vouches_for("carol.a", &record(3, 11)),
            "changed after it"
        );
        assert!(recent.vouches_for("carol.a", &record(12, 12)));
        assert!(
            recent.vouches_for("carol.b", &record(3, 11)),
            "another key's change"
        );
        // Once carol.a's change at 12 is forgotten, a view from before it
        // is vouched for no more: that change is what made it out of date.
        for revision in 13..(13 + RECENT_CHANGES as u64) {
            recent.remember(&carol, "carol.b", revision, true);
        }
        assert_eq!(recent.last_of_key("carol.a"), None);
        assert!(!recent.vouches_for("carol.a", &record(3, 11)));
        assert!(recent.vouches_for("carol.a", &record(12, 12)));
    }

    #[test]
    fn a_record_is_carried_while_it_is_the_key_s_readable_last_version() {
        let keyring = Keyring::parse(&herald_core::keyring::new_key_text("k1").unwrap()).unwrap();
        let config: EndpointConfig = serde_json::from_value(serde_json::json!({
            "v": 1, "user": "dora", "id": "hook", "url": "https://dora.example.com/in", "secrets": [],
        }))
        .unwrap();
        let key = names::endpoint_key(&config.user, &config.id);
        let change = |revision, value: Option<Vec<u8>>| Change {
            key: key.clone(),
            endpoint: config.id.clone(),
            revision,
            value: value.map(Bytes::from),
        };
        let mut found = UserEndpoints::default();
        found.apply(&change(5, Some(seal_record(&config, &keyring))), &keyring);
        let carried = found.carried(&config.id).expect("a readable record");
        assert_eq!((carried.revision, carried.as_of), (5, 5));
        assert!(open_record(&key, carried.sealed.as_bytes(), &keyring).is_ok());

        // A later version this keyring cannot open: the earlier one stays
        // in use here, but is not carried.
        found.apply(
            &change(7, Some(b"{\"v\":1,\"sealed\":\"altered\"}".to_vec())),
            &keyring,
        );
        assert!(found.get(&config.id).is_some());
        assert_eq!(found.carried(&config.id), None);

        found.apply(&change(9, None), &keyring);
        assert_eq!(found.carried(&config.id), None, "deleted");
    }
}
