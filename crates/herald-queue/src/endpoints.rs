//! The local cache of `herald-endpoints`, fed by a KV watch.
//!
//! Workers look endpoints up here, so a delivery needs no round trip for
//! configuration. The first load completes before [`EndpointCache::start`]
//! returns ready; when the watch breaks (a NATS restart), it is re-created
//! and the cache rebuilt from the bucket's current contents, so deletes made
//! while it was down are not missed.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use herald_core::{EndpointId, UserId, names, payload::EndpointConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Broker, QueueError};

type Endpoints = HashMap<UserId, Vec<Arc<EndpointConfig>>>;

/// A shared, always-current view of every endpoint.
#[derive(Clone)]
pub struct EndpointCache {
    endpoints: Arc<std::sync::RwLock<Endpoints>>,
    loaded: watch::Receiver<bool>,
}

impl EndpointCache {
    /// Starts watching the bucket in the background. Use
    /// [`Self::wait_loaded`] before relying on the contents.
    pub fn start(broker: Broker, shutdown: CancellationToken) -> Self {
        let (loaded_tx, loaded) = watch::channel(false);
        let cache = Self {
            endpoints: Arc::default(),
            loaded,
        };
        let endpoints = cache.endpoints.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            while !shutdown.is_cancelled() {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    result = follow(&broker, &endpoints, &loaded_tx) => result,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, retry_in = ?delay, "endpoint watch interrupted");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        cache
    }

    /// Waits until the first full load of the bucket is in the cache.
    pub async fn wait_loaded(&self) {
        let mut loaded = self.loaded.clone();
        let _ = loaded.wait_for(|loaded| *loaded).await;
    }

    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Every endpoint of `user`, in a stable order.
    pub fn for_user(&self, user: &UserId) -> Vec<Arc<EndpointConfig>> {
        self.read().get(user).cloned().unwrap_or_default()
    }

    pub fn get(&self, user: &UserId, endpoint: &EndpointId) -> Option<Arc<EndpointConfig>> {
        self.read()
            .get(user)
            .and_then(|list| list.iter().find(|e| &e.id == endpoint).cloned())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Endpoints> {
        self.endpoints
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Loads the bucket into a fresh map, swaps it in, then applies live
/// changes until the watch ends or fails.
async fn follow(
    broker: &Broker,
    shared: &std::sync::RwLock<Endpoints>,
    loaded: &watch::Sender<bool>,
) -> Result<(), QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open endpoints bucket", e))?;
    let empty = bucket
        .status()
        .await
        .map_err(|e| QueueError::request("endpoints bucket status", e))?
        .values()
        == 0;
    let mut watch = bucket
        .watch_with_history(">")
        .await
        .map_err(|e| QueueError::request("watch endpoints", e))?;

    let mut fresh = Endpoints::new();
    let mut caught_up = empty;
    if caught_up {
        replace(shared, fresh.clone());
        loaded.send_replace(true);
    }
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| QueueError::request("watch endpoints", e))?;
        if caught_up {
            let mut map = shared.write().unwrap_or_else(|p| p.into_inner());
            apply(&mut map, &entry);
        } else {
            apply(&mut fresh, &entry);
            if entry.delta == 0 {
                caught_up = true;
                let count: usize = fresh.values().map(Vec::len).sum();
                tracing::info!(endpoints = count, "endpoint cache loaded");
                replace(shared, std::mem::take(&mut fresh));
                loaded.send_replace(true);
            }
        }
    }
    Ok(())
}

fn replace(shared: &std::sync::RwLock<Endpoints>, map: Endpoints) {
    *shared.write().unwrap_or_else(|p| p.into_inner()) = map;
}

fn apply(map: &mut Endpoints, entry: &kv::Entry) {
    let Some((user, endpoint)) = entry.key.split_once('.') else {
        tracing::warn!(
            key = entry.key,
            "ignoring endpoint key that is not <user>.<endpoint>"
        );
        return;
    };
    let (Ok(user), Ok(endpoint)) = (UserId::new(user), EndpointId::new(endpoint)) else {
        tracing::warn!(key = entry.key, "ignoring endpoint key with invalid tokens");
        return;
    };
    let list = map.entry(user.clone()).or_default();
    list.retain(|e| e.id != endpoint);
    if entry.operation == Operation::Put {
        match herald_core::payload::decode::<EndpointConfig>(&entry.value) {
            Ok(config) if config.user == user && config.id == endpoint => {
                list.push(Arc::new(config));
                list.sort_by(|a, b| a.id.cmp(&b.id));
            }
            Ok(_) => tracing::warn!(key = entry.key, "endpoint record does not match its key"),
            Err(e) => {
                tracing::warn!(key = entry.key, error = %e, "ignoring unreadable endpoint record")
            }
        }
    }
    if list.is_empty() {
        map.remove(&user);
    }
}

/// Writes an endpoint record (used by `herald dev` and the operator).
pub async fn put(broker: &Broker, config: &EndpointConfig) -> Result<(), QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open endpoints bucket", e))?;
    bucket
        .put(
            names::endpoint_key(&config.user, &config.id),
            herald_core::payload::encode(config).into(),
        )
        .await
        .map_err(|e| QueueError::request("put endpoint", e))?;
    Ok(())
}

/// Writes an endpoint record unless the bucket already holds exactly it;
/// true when it wrote. The operator re-reconciles periodically, and an
/// unchanged write would wake every worker's watch for nothing.
pub async fn put_if_changed(broker: &Broker, config: &EndpointConfig) -> Result<bool, QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open endpoints bucket", e))?;
    let key = names::endpoint_key(&config.user, &config.id);
    let wanted = herald_core::payload::encode(config);
    let current = bucket
        .get(&key)
        .await
        .map_err(|e| QueueError::request("read endpoint", e))?;
    if current.as_deref() == Some(wanted.as_slice()) {
        return Ok(false);
    }
    bucket
        .put(key, wanted.into())
        .await
        .map_err(|e| QueueError::request("put endpoint", e))?;
    Ok(true)
}

/// Removes an endpoint record.
pub async fn delete(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<(), QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open endpoints bucket", e))?;
    bucket
        .delete(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("delete endpoint", e))
}

/// Keys of every endpoint in the bucket.
pub async fn keys(broker: &Broker) -> Result<Vec<String>, QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open endpoints bucket", e))?;
    let mut keys = bucket
        .keys()
        .await
        .map_err(|e| QueueError::request("list endpoints", e))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        out.push(key.map_err(|e| QueueError::request("list endpoints", e))?);
    }
    Ok(out)
}
