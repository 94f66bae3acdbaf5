//! The tokens file: its entries, checking them, finding a presented token
//! by its hash, generating new tokens, and re-reading the file.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use herald_core::UserId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every token `herald token new` makes starts with this, so secret
/// scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "herald_";

/// Random bytes in a generated token: 256 bits.
const TOKEN_BYTES: usize = 32;

/// One `[[tokens]]` entry of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Shown in logs instead of the token.
    pub name: String,
    /// The token's SHA-256, in hex. A plain, fast hash is enough here:
    /// tokens are 256-bit random strings, so there is no dictionary to try
    /// and no brute force that could finish; slow password hashes (argon2,
    /// bcrypt) protect low-entropy passwords, and would only cost CPU on
    /// every request.
    pub sha256: String,
    /// The users this token may act for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Instead of `users`: every user (an operator's or a backend's token).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_users: bool,
}

impl TokenEntry {
    /// The entry as it goes into the tokens file.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct One<'a> {
            tokens: [&'a TokenEntry; 1],
        }
        toml::to_string(&One { tokens: [self] }).expect("a token entry always serializes")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// Who a token may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    AllUsers,
    Users(BTreeSet<UserId>),
}

impl Scope {
    /// Whether a token of this scope may act for `user`.
    pub fn allows(&self, user: &str) -> bool {
        match self {
            Scope::AllUsers => true,
            Scope::Users(users) => users.iter().any(|u| u.as_str() == user),
        }
    }
}

pub(super) struct Token {
    pub(super) name: String,
    digest: [u8; 32],
    pub(super) scope: Scope,
}

/// The tokens of a tokens file, checked.
pub struct Tokens {
    tokens: Vec<Token>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.tokens.iter().map(|t| &t.name).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

/// Why the tokens file cannot be used; the API does not start.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("api.tokens_file {path}: cannot read it: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("api.tokens_file {path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error(
        "api.metrics_require_token needs api.tokens_file: without tokens nothing could scrape /metrics"
    )]
    MetricsWithoutTokens,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Parses and checks a tokens file; the error names the entry and the
    /// problem.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.tokens.is_empty() {
            return Err("holds no [[tokens]]: every request would be refused \
                 (leave api.tokens_file empty to turn authentication off)"
                .into());
        }
        let mut tokens: Vec<Token> = Vec::with_capacity(file.tokens.len());
        for (index, entry) in file.tokens.into_iter().enumerate() {
            let token = check_entry(entry).map_err(|e| format!("token #{}: {e}", index + 1))?;
            if let Some(same) = tokens.iter().find(|t| t.name == token.name) {
                return Err(format!("two tokens are named {:?}", same.name));
            }
            if let Some(same) = tokens.iter().find(|t| t.digest == token.digest) {
                return Err(format!(
                    "tokens {:?} and {:?} have the same sha256",
                    same.name, token.name
                ));
            }
            tokens.push(token);
        }
        Ok(Tokens { tokens })
    }

    /// The token whose hash matches `presented`. Every hash is compared in
    /// constant time and every entry is looked at, so the time taken says
    /// nothing about how close a guess came or which entry matched.
    pub(super) fn find(&self, presented: &str) -> Option<&Token> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        found
    }
}

/// The tokens of the file at `path`, and its text.
pub(super) fn read_tokens(path: &Path) -> Result<(Tokens, String), TokensFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let tokens = Tokens::parse(&text).map_err(|problem| TokensFileError::Invalid {
        path: path.display().to_string(),
        problem,
    })?;
    Ok((tokens, text))
}

fn check_entry(entry: TokenEntry) -> Result<Token, String> {
    let name = entry.name.trim().to_string();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err("name must be a non-empty line of text".into());
    }
    let digest = parse_sha256(&entry.sha256)
        .ok_or_else(|| format!("{name}: sha256 must be 64 hex digits (the token's SHA-256)"))?;
    let scope = match (entry.all_users, entry.users.is_empty()) {
        (true, true) => Scope::AllUsers,
        (false, false) => {
            let users = entry
                .users
                .into_iter()
                .map(|u| UserId::new(u).map_err(|e| format!("{name}: {e}")))
                .collect::<Result<_, _>>()?;
            Scope::Users(users)
        }
        (true, false) => return Err(format!("{name}: set users or all_users = true, not both")),
        (false, true) => {
            return Err(format!(
                "{name}: says for whom it is valid with users = [...] or all_users = true"
            ));
        }
    };
    Ok(Token {
        name,
        digest,
        scope,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A freshly generated token and the entry that admits it.
pub struct NewToken {
    /// Shown once; only its hash is kept.
    pub token: String,
    pub entry: TokenEntry,
}

/// Generates a token (`herald_` and 256 random bits) for `scope`.
pub fn new_token(name: &str, scope: &Scope) -> Result<NewToken, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let (users, all_users) = match scope {
        Scope::AllUsers => (vec![], true),
        Scope::Users(users) => (users.iter().map(ToString::to_string).collect(), false),
    };
    let entry = TokenEntry {
        name: name.to_string(),
        sha256: to_hex(&Sha256::digest(token.as_bytes())),
        users,
        all_users,
    };
    // The entry must pass the same checks as the file it goes into.
    check_entry(entry.clone())?;
    Ok(NewToken { token, entry })
}

/// The tokens file and what it held when last read well.
#[derive(Debug)]
pub(super) struct TokenStore {
    path: PathBuf,
    current: RwLock<(Arc<Tokens>, String)>,
}

impl TokenStore {
    /// Reads the file; a bad one is an error naming it.
    pub(super) fn open(path: PathBuf) -> Result<TokenStore, TokensFileError> {
        let (tokens, text) = read_tokens(&path)?;
        Ok(TokenStore {
            path,
            current: RwLock::new((Arc::new(tokens), text)),
        })
    }

    pub(super) fn tokens(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Re-reads the file; a changed, valid file replaces the tokens. A file
    /// that cannot be used leaves the previous tokens in force (the API
    /// stays as protected as it was) and is logged.
    pub(super) fn reload(&self) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e,
                    "cannot read the tokens file; the previous tokens stay in force");
                return;
            }
        };
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == text {
            return;
        }
        match Tokens::parse(&text) {
            Ok(tokens) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.tokens.len(),
                    "tokens file changed: reloaded");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(tokens), text);
            }
            Err(problem) => tracing::error!(path = %self.path.display(), %problem,
                "the changed tokens file is invalid; the previous tokens stay in force"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, token: &str, users: &[&str], all_users: bool) -> String {
        TokenEntry {
            name: name.into(),
            sha256: to_hex(&Sha256::digest(token.as_bytes())),
            users: users.iter().map(ToString::to_string).collect(),
            all_users,
        }
        .to_toml()
    }

    #[test]
    fn tokens_are_found_by_hash_with_their_scope() {
        let file = [
            entry("ci", "t-ci", &["alice", "bob"], false),
            entry("ops", "t-ops", &[], true),
        ]
        .join("\n");
        let tokens = Tokens::parse(&file).unwrap();
        let ci = tokens.find("t-ci").unwrap();
        assert_eq!(ci.name, "ci");
        assert!(ci.scope.allows("alice") && ci.scope.allows("bob"));
        assert!(!ci.scope.allows("carol"));
        assert!(tokens.find("t-ops").unwrap().scope.allows("anyone"));
        assert!(tokens.find("t-c").is_none());
        assert!(tokens.find("").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let ok = entry("ci", "t", &["alice"], false);
        let cases = [
            ("", "no [[tokens]]"),
            (
                "[[tokens]]\nname = \"x\"\ntoken = \"plain\"\n",
                "unknown field `token`",
            ),
            (
                &ok.replace(
                    &ok[ok.find("sha256").unwrap()..ok.find("users").unwrap()],
                    "sha256 = \"abc\"\n",
                ),
                "64 hex digits",
            ),
            (&entry("ci", "t", &[], false), "users = [...] or all_users"),
            (&entry("ci", "t", &["alice"], true), "not both"),
            (&entry("ci", "t", &["a.b"], false), "may only contain"),
            (&entry(" ", "t", &["a"], false), "name"),
            (
                &[ok.clone(), entry("ci", "u", &["a"], false)].join("\n"),
                "two tokens are named \"ci\"",
            ),
            (
                &[ok.clone(), entry("other", "t", &["a"], false)].join("\n"),
                "same sha256",
            ),
            ("tokens = 3", "invalid type"),
        ];
        for (text, wanted) in cases {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(wanted), "{text:?}: {err}");
        }
    }

    #[test]
    fn new_tokens_are_random_prefixed_and_match_their_entry() {
        let scope = Scope::Users([UserId::new("alice").unwrap()].into());
        let first = new_token("ci", &scope).unwrap();
        let second = new_token("ci", &scope).unwrap();
        assert_ne!(first.token, second.token);
        assert!(first.token.starts_with(TOKEN_PREFIX));
        assert_eq!(first.token.len(), TOKEN_PREFIX.len() + 43);
        let tokens = Tokens::parse(&first.entry.to_toml()).unwrap();
        let found = tokens.find(&first.token).unwrap();
        assert_eq!(found.scope, scope);
        assert!(tokens.find(&second.token).is_none());
        assert!(new_token("", &Scope::AllUsers).is_err());
    }
}
