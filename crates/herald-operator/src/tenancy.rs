//! Which users a namespace may serve.
//!
//! A `WebhookEndpoint` names the user whose task results it receives
//! (`spec.userId`), and whoever can create one in a namespace chooses that
//! field. So the operator only writes an endpoint for a user its namespace
//! was granted by the cluster admin, in one of two places a tenant cannot
//! edit:
//!
//! - the operator's configuration, `operator.tenancy.namespaces` (the
//!   chart's `operator.tenancy.namespaces` values), namespace to patterns;
//! - the Namespace object's `herald.dev/users` annotation, comma-separated
//!   patterns (when `operator.tenancy.namespace_annotation` is on; it is by
//!   default). Tenants normally cannot edit their Namespace, and a change
//!   reconciles the namespace's endpoints at once.
//!
//! A pattern is a user id, or a glob where `*` stands for any run of
//! characters (`team-a-*`, `*`). The grant is the union of both places; a
//! namespace granted nothing serves no user.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The annotation on a Namespace granting it users.
pub const USERS_ANNOTATION: &str = "herald.dev/users";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    /// Namespace to the user patterns its WebhookEndpoints may name.
    pub namespaces: BTreeMap<String, Vec<String>>,
    /// Whether a Namespace's `herald.dev/users` annotation grants users
    /// too (the operator then watches Namespaces).
    pub namespace_annotation: bool,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self {
            namespaces: BTreeMap::new(),
            namespace_annotation: true,
        }
    }
}

impl TenancyConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (namespace, patterns) in &self.namespaces {
            if let Some(bad) = patterns.iter().find(|p| !valid_pattern(p)) {
                return Err(format!(
                    "operator.tenancy.namespaces.{namespace}: {bad:?} is not a user id or a pattern \
                     of letters, digits, '-', '_' and '*'"
                ));
            }
        }
        Ok(())
    }

    /// Whether `namespace` may serve `user`, given the value of its
    /// Namespace's annotation (if read).
    pub fn allows(&self, namespace: &str, annotation: Option<&str>, user: &str) -> bool {
        let configured = self.namespaces.get(namespace).into_iter().flatten();
        let annotated = annotation
            .filter(|_| self.namespace_annotation)
            .into_iter()
            .flat_map(annotation_patterns);
        configured
            .map(String::as_str)
            .chain(annotated)
            .any(|pattern| matches(pattern, user))
    }

    /// What the admin can do to let `namespace` serve `user`, for the
    /// refusal's status message and Event.
    pub fn refusal(&self, namespace: &str, user: &str) -> String {
        let mut message = format!(
            "namespace {namespace} is not allowed to serve user {user:?}: a cluster admin grants it \
             with operator.tenancy.namespaces.{namespace}: [\"{user}\"] in the Herald chart's values"
        );
        if self.namespace_annotation {
            message.push_str(&format!(
                ", or with the annotation {USERS_ANNOTATION}=\"{user}\" on the Namespace \
                 (kubectl annotate namespace {namespace} {USERS_ANNOTATION}={user})"
            ));
        }
        message
    }
}

/// The patterns of a `herald.dev/users` value: comma-separated, blanks
/// ignored; an invalid one matches nothing.
fn annotation_patterns(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|p| valid_pattern(p))
}

fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*'))
}

/// A glob match where `*` is any run of characters (none included).
fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(namespace: &str, patterns: &[&str]) -> TenancyConfig {
        TenancyConfig {
            namespaces: BTreeMap::from([(
                namespace.to_string(),
                patterns.iter().map(|p| p.to_string()).collect(),
            )]),
            ..Default::default()
        }
    }

    #[test]
    fn patterns_match_whole_ids_or_globs() {
        for (pattern, user, want) in [
            ("alice", "alice", true),
            ("alice", "alice2", false),
            ("alice", "malice", false),
            ("team-a-*", "team-a-1", true),
            ("team-a-*", "team-a-", true),
            ("team-a-*", "team-b-1", false),
            ("*", "anyone", true),
            ("*-prod", "billing-prod", true),
            ("*-prod", "billing-prod-x", false),
            ("a*b*c", "a-x-b-y-c", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(matches(pattern, user), want, "{pattern} {user}");
        }
    }

    #[test]
    fn a_namespace_serves_only_what_it_was_granted() {
        let tenancy = config("team-a", &["alice", "team-a-*"]);
        assert!(tenancy.allows("team-a", None, "alice"));
        assert!(tenancy.allows("team-a", None, "team-a-7"));
        assert!(!tenancy.allows("team-a", None, "bob"));
        // Granted nothing: serves nobody.
        assert!(!tenancy.allows("team-b", None, "alice"));
        // The annotation grants too, the two add up.
        assert!(tenancy.allows("team-b", Some("bob, alice"), "alice"));
        assert!(tenancy.allows("team-a", Some("bob"), "bob"));
        // Blanks and invalid patterns grant nothing.
        assert!(!tenancy.allows("team-b", Some(" , ,"), "alice"));
        assert!(!tenancy.allows("team-b", Some("al ice"), "al ice"));
    }

    #[test]
    fn the_annotation_can_be_switched_off() {
        let tenancy = TenancyConfig {
            namespace_annotation: false,
            ..Default::default()
        };
        assert!(!tenancy.allows("team-b", Some("*"), "alice"));
        assert!(
            !tenancy
                .refusal("team-b", "alice")
                .contains(USERS_ANNOTATION)
        );
    }

    #[test]
    fn the_refusal_names_the_rule_to_add() {
        let message = TenancyConfig::default().refusal("team-b", "alice");
        assert!(
            message.contains("operator.tenancy.namespaces.team-b")
                && message.contains("kubectl annotate namespace team-b herald.dev/users=alice"),
            "{message}"
        );
    }

    #[test]
    fn bad_configured_patterns_are_refused_at_start() {
        assert!(config("team-a", &["alice"]).validate().is_ok());
        assert!(config("team-a", &["a.b"]).validate().is_err());
        assert!(config("team-a", &[""]).validate().is_err());
    }
}
