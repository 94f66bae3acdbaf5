//! mailpit: a real SMTP server with an HTTP API for reading what arrived.

use std::time::Duration;

use serde::Deserialize;
use tempfile::TempDir;

use crate::{free_port, process::ChildProcess, tool, wait_until};

const STARTUP: Duration = Duration::from_secs(30);

pub struct Mailpit {
    smtp_port: u16,
    http_port: u16,
    http: reqwest::Client,
    _process: ChildProcess,
    _dir: TempDir,
}

/// One message as mailpit parsed it.
#[derive(Debug, Clone)]
pub struct MailMessage {
    pub id: String,
    /// Recipient addresses.
    pub to: Vec<String>,
    pub subject: String,
    /// The plain-text body.
    pub text: String,
}

#[derive(Deserialize)]
struct MessageList {
    messages: Vec<MessageSummary>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MessageSummary {
    #[serde(rename = "ID")]
    id: String,
    to: Vec<Address>,
    subject: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Address {
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MessageDetail {
    text: String,
}

impl Mailpit {
    /// Starts mailpit on free loopback ports: plain SMTP that accepts any
    /// credentials (so clients configured with a username work too), and
    /// its HTTP API.
    pub async fn start() -> Mailpit {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let smtp_port = free_port();
        let http_port = free_port();
        let args = [
            "--smtp",
            &format!("127.0.0.1:{smtp_port}"),
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--database",
            &dir.path().join("mailpit.db").display().to_string(),
            "--smtp-auth-accept-any",
            "--smtp-auth-allow-insecure",
            // No call home for updates: tests talk to loopback only.
            "--disable-version-check",
        ]
        .map(String::from);
        let log = dir.path().join("mailpit.log");
        let mut process = ChildProcess::spawn("mailpit", &tool("mailpit"), &args, log);
        let http = crate::http_client();
        let ready = format!("http://127.0.0.1:{http_port}/readyz");
        wait_until("mailpit to become ready", STARTUP, || {
            process.assert_running();
            let request = http.get(&ready).send();
            async move { request.await.ok()?.status().is_success().then_some(()) }
        })
        .await;
        wait_until("mailpit's SMTP port to accept", STARTUP, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", smtp_port))
                .await
                .ok()
                .map(drop)
        })
        .await;
        Mailpit {
            smtp_port,
            http_port,
            http,
            _process: process,
            _dir: dir,
        }
    }

    pub fn smtp_port(&self) -> u16 {
        self.smtp_port
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Every message received so far, oldest first.
    pub async fn messages(&self) -> Vec<MailMessage> {
        let list: MessageList = self
            .get_json(&format!("{}/api/v1/messages?limit=1000", self.http_url()))
            .await;
        let mut messages = Vec::with_capacity(list.messages.len());
        // mailpit lists newest first.
        for summary in list.messages.into_iter().rev() {
            let detail: MessageDetail = self
                .get_json(&format!(
                    "{}/api/v1/message/{}",
                    self.http_url(),
                    summary.id
                ))
                .await;
            messages.push(MailMessage {
                id: summary.id,
                to: summary.to.into_iter().map(|a| a.address).collect(),
                subject: summary.subject,
                text: detail.text,
            });
        }
        messages
    }

    /// Waits until at least `count` messages addressed to `to` have arrived;
    /// returns them.
    pub async fn wait_for_messages(
        &self,
        to: &str,
        count: usize,
        deadline: Duration,
    ) -> Vec<MailMessage> {
        let what = format!("{count} messages to {to}");
        wait_until(&what, deadline, || async {
            let messages: Vec<_> = self
                .messages()
                .await
                .into_iter()
                .filter(|m| m.to.iter().any(|address| address == to))
                .collect();
            (messages.len() >= count).then_some(messages)
        })
        .await
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, url: &str) -> T {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("mailpit did not answer {url}: {e}"));
        assert!(
            response.status().is_success(),
            "mailpit answered {} to {url}",
            response.status()
        );
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("mailpit's answer to {url} is not what we expect: {e}"))
    }
}
