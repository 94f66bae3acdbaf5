//! The load driver: POSTs tasks to `/users/{user}/tasks/{type}`, closed
//! loop (a fixed number of requests in flight) or open loop (a fixed rate,
//! whatever the API's answer times), and keeps what each POST got back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::{sync::Semaphore, task::JoinSet};

/// What to send.
#[derive(Debug, Clone)]
pub struct Load {
    /// With `{user}` and `{type}` in it, e.g.
    /// `http://127.0.0.1:8080/users/{user}/tasks/{type}`.
    pub url: String,
    pub tasks: usize,
    /// Closed loop: requests in flight. Open loop: the most outstanding at
    /// once, a safety cap (a send that waits for it is late).
    pub concurrency: usize,
    /// `Some`: open loop at this many tasks per second.
    pub rate: Option<f64>,
    /// Users `first_user .. first_user + users`, given out round-robin.
    pub users: usize,
    pub first_user: usize,
    pub task_type: String,
    pub request_timeout: Duration,
    /// Tasks not yet sent when this instant passes are not sent (open loop).
    pub send_deadline: Instant,
}

/// How one POST ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 201 with the task's id.
    Accepted(String),
    /// 201 whose body carried no `id`: accepted, but cannot be matched.
    AcceptedWithoutId,
    /// Any other status.
    Status(u16),
    /// No answer: connection refused, reset, timed out.
    Failed,
}

/// One POST.
#[derive(Debug, Clone)]
pub struct Sent {
    pub index: usize,
    /// When the schedule wanted it sent (open loop only).
    pub due: Option<Instant>,
    pub sent: Instant,
    pub answered: Instant,
    pub answer: Answer,
}

/// What the driver did, besides the POSTs themselves.
#[derive(Debug, Clone, Default)]
pub struct Sending {
    pub sent: Vec<Sent>,
    /// Open loop: sends that had to wait for the concurrency cap.
    pub late_sends: usize,
    /// Open loop: tasks whose time fell after the deadline, never sent.
    pub unsent: usize,
}

#[derive(Deserialize)]
struct AcceptedBody {
    id: String,
}

pub fn client(concurrency: usize, request_timeout: Duration) -> reqwest::Client {
    // reqwest is built without a bundled crypto provider; installing twice
    // is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(request_timeout)
        .no_proxy()
        .build()
        .expect("a plain HTTP client with static settings builds")
}

/// Sends every task of `load` and returns what each POST got.
pub async fn send(load: &Load) -> Sending {
    let client = client(load.concurrency, load.request_timeout);
    match load.rate {
        None => closed_loop(load, client).await,
        Some(rate) => open_loop(load, client, rate).await,
    }
}

async fn closed_loop(load: &Load, client: reqwest::Client) -> Sending {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..load.concurrency.max(1) {
        let (next, client, load) = (Arc::clone(&next), client.clone(), load.clone());
        clients.spawn(async move {
            let mut sent = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= load.tasks {
                    return sent;
                }
                sent.push(post(&client, &load, index, None).await);
            }
        });
    }
    let mut sending = Sending::default();
    while let Some(joined) = clients.join_next().await {
        sending
            .sent
            .extend(joined.expect("a client task only awaits requests and cannot panic"));
    }
    sending.sent.sort_by_key(|s| s.index);
    sending
}

async fn open_loop(load: &Load, client: reqwest::Client, rate: f64) -> Sending {
    let cap = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let start = Instant::now();
    let mut posts = JoinSet::new();
    let mut sending = Sending::default();
    for index in 0..load.tasks {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        if due > load.send_deadline {
            sending.unsent = load.tasks - index;
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let permit = match Arc::clone(&cap).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                sending.late_sends += 1;
                Arc::clone(&cap)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let (client, load) = (client.clone(), load.clone());
        posts.spawn(async move {
            let sent = post(&client, &load, index, Some(due)).await;
            drop(permit);
            sent
        });
    }
    while let Some(joined) = posts.join_next().await {
        sending
            .sent
            .push(joined.expect("a POST task only awaits its request and cannot panic"));
    }
    sending.sent.sort_by_key(|s| s.index);
    sending
}

async fn post(client: &reqwest::Client, load: &Load, index: usize, due: Option<Instant>) -> Sent {
    let user = load.first_user + index % load.users.max(1);
    let url = load
        .url
        .replace("{user}", &user.to_string())
        .replace("{type}", &load.task_type);
    let sent = Instant::now();
    let answer = match client
        .post(url)
        .header("content-type", "application/json")
        .body(format!("{{\"seq\":{index}}}"))
        .send()
        .await
    {
        Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
            match response.bytes().await {
                Ok(body) => match serde_json::from_slice::<AcceptedBody>(&body) {
                    Ok(accepted) => Answer::Accepted(accepted.id),
                    Err(_) => Answer::AcceptedWithoutId,
                },
                // The 201 was sent, so the task is stored; its id was lost.
                Err(_) => Answer::AcceptedWithoutId,
            }
        }
        Ok(response) => {
            let status = response.status().as_u16();
            // Read the body so the connection can be reused.
            let _ = response.bytes().await;
            Answer::Status(status)
        }
        Err(_) => Answer::Failed,
    };
    Sent {
        index,
        due,
        sent,
        answered: Instant::now(),
        answer,
    }
}
