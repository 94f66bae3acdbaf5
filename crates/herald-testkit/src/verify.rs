//! The reference Standard Webhooks verifier, run out of process.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::{ReceivedWebhook, tools_dir};

/// Verifies `webhook` with the `standardwebhooks` PyPI package (through
/// `scripts/verify_standard_webhook.py` in the venv that
/// `scripts/install-tools.sh` builds): an implementation of the spec that
/// shares no code with Herald's signer. `Err` carries the library's reason.
pub fn verify_with_standardwebhooks(secret: &str, webhook: &ReceivedWebhook) -> Result<(), String> {
    let python = tools_dir().join("venv/bin/python");
    assert!(
        python.is_file(),
        "the verifier's venv is missing at {}: run `make tools` (scripts/install-tools.sh)",
        python.display()
    );
    let script = crate::workspace_root().join("scripts/verify_standard_webhook.py");
    let headers: serde_json::Map<String, serde_json::Value> = webhook
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("webhook-"))
        .map(|(name, value)| (name.clone(), value.clone().into()))
        .collect();
    let request = serde_json::json!({
        "secret": secret,
        "headers": headers,
        "body": webhook.body,
    });
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(request.to_string().as_bytes())
        .expect("cannot write to the verifier");
    let output = child
        .wait_with_output()
        .expect("the verifier did not finish");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}
