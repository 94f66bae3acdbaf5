//! Endpoints from a YAML file, for `herald dev`: `WebhookEndpoint`
//! documents, shaped exactly like the custom resource, and the `Secret`
//! documents their `secretRef`s name. Each becomes an endpoint record the
//! way the operator makes one ([`herald_crd`]), so a file and a cluster
//! accept and refuse the same things.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use anyhow::{Context, bail};
use herald_core::{payload::EndpointConfig, signing::SigningSecret};
use herald_crd::{API_VERSION, KIND, WebhookEndpointSpec};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    spec: Option<WebhookEndpointSpec>,
    #[serde(default)]
    data: HashMap<String, String>,
    #[serde(default)]
    string_data: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
}

/// An endpoint read from the file, with where it came from.
#[derive(Debug)]
pub struct FileEndpoint {
    pub config: EndpointConfig,
    /// The secret was generated because the document has no `secretRef`.
    pub generated_secret: bool,
}

/// Reads every endpoint in `path`. Any invalid document fails the whole
/// file, naming the document, so a typo never silently drops an endpoint.
pub fn load(path: &Path) -> anyhow::Result<Vec<FileEndpoint>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read endpoints file {}", path.display()))?;
    parse(&text).with_context(|| format!("in endpoints file {}", path.display()))
}

pub fn parse(text: &str) -> anyhow::Result<Vec<FileEndpoint>> {
    let mut documents = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc)
            .with_context(|| format!("document {} is not YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        let document: Document = serde_norway::from_value(value).with_context(|| {
            format!("document {} is not a WebhookEndpoint or Secret", index + 1)
        })?;
        documents.push((index + 1, document));
    }

    let mut secrets = HashMap::new();
    for (index, doc) in &documents {
        if doc.kind.as_deref() == Some("Secret") {
            let namespace = doc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let mut values: BTreeMap<String, ByteString> = doc
                .string_data
                .iter()
                .map(|(key, text)| (key.clone(), ByteString(text.clone().into_bytes())))
                .collect();
            for (key, encoded) in &doc.data {
                let decoded = decode_base64(encoded)
                    .with_context(|| format!("document {index}: data.{key} is not base64"))?;
                values.insert(key.clone(), ByteString(decoded.into_bytes()));
            }
            let secret = Secret {
                data: Some(values),
                ..Default::default()
            };
            secrets.insert((namespace, doc.metadata.name.clone()), secret);
        }
    }

    let mut endpoints = Vec::new();
    for (index, doc) in documents {
        match doc.kind.as_deref() {
            Some("Secret") => continue,
            Some(KIND) => {}
            other => bail!("document {index}: kind {other:?} is neither {KIND} nor Secret"),
        }
        if doc.api_version.as_deref() != Some(API_VERSION) {
            bail!("document {index}: apiVersion must be {API_VERSION}");
        }
        let name = &doc.metadata.name;
        let namespace = doc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let spec = doc
            .spec
            .with_context(|| format!("document {index} ({name}): no spec"))?;
        let (secret, generated_secret) = match &spec.secret_ref {
            Some(reference) => {
                let found = secrets.get(&(namespace.clone(), reference.name.clone()));
                let secret = reference
                    .signing_secret(&namespace, found)
                    .with_context(|| format!("document {index} ({name}): secretRef"))?;
                (secret, false)
            }
            None => (SigningSecret::generate(), true),
        };
        let config = spec
            .to_config(&namespace, name, vec![secret])
            .with_context(|| format!("document {index} ({name})"))?;
        endpoints.push(FileEndpoint {
            config,
            generated_secret,
        });
    }
    Ok(endpoints)
}

fn decode_base64(text: &str) -> anyhow::Result<String> {
    use base64::{Engine, engine::general_purpose::STANDARD};
    Ok(String::from_utf8(STANDARD.decode(text.trim())?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn reads_endpoints_and_their_secrets() {
        let text = format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{ name: demo }}
data: {{ secret: {encoded} }}
---
apiVersion: herald.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{ name: user-1 }}
spec:
  userId: "1"
  url: http://127.0.0.1:8080/webhooks
  email: user1@example.com
  secretRef: {{ name: demo, key: secret }}
  retry: {{ schedule: ["10ms", "20ms"] }}
"#,
            encoded = "d2hzZWNfTWZLUTlyOEdLWXFyVHdqVVBEOElMUFpJbzJMYUxhU3c="
        );
        let endpoints = parse(&text).unwrap();
        assert_eq!(endpoints.len(), 1);
        let config = &endpoints[0].config;
        assert_eq!(config.secrets[0].expose(), SECRET);
        assert_eq!(config.retry_schedule.as_ref().unwrap().max_attempts(), 3);
        assert!(!endpoints[0].generated_secret);
    }

    #[test]
    fn names_the_bad_document() {
        let text = "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {name: x}\nspec: {userId: '1', url: 'ftp://x'}\n";
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(
            err.contains("document 1 (x)") && err.contains("scheme"),
            "{err}"
        );
        let err = format!("{:#}", parse("kind: Deployment\n").unwrap_err());
        assert!(err.contains("Deployment"), "{err}");
        let missing = "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {name: x}\nspec: {userId: '1', url: 'http://x/', secretRef: {name: nope}}\n";
        let err = format!("{:#}", parse(missing).unwrap_err());
        assert!(err.contains("nope"), "{err}");
        // The same words as the operator's status for the same Secret.
        let no_key = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {other: x}\n---\n\
            apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {name: x}\n\
            spec: {userId: '1', url: 'http://x/', secretRef: {name: s}}\n";
        let err = format!("{:#}", parse(no_key).unwrap_err());
        assert!(err.contains("Secret s has no key secret"), "{err}");
    }
}
