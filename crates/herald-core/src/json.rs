//! What JSON Herald carries: checked once at the door, then passed on as
//! the client's exact bytes.
//!
//! serde_json's raw-value parse (what the API keeps a body as) only checks
//! the syntax: it lets through numbers no parser can hold (`1e400`), lone
//! UTF-16 surrogates (`"\ud800"`) and any depth. Each of those fails later,
//! where a client can no longer be told: a handler parsing the input, or any
//! read of a stored payload nesting deeper than serde_json's recursion
//! limit. [`check`] refuses them up front, with a message naming which.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Containers serde_json reads nested before it gives up ("recursion limit
/// exceeded"); every stored payload must stay within it.
pub const SERDE_DEPTH_LIMIT: usize = 127;

/// Containers around a handler's result in the deepest payload that
/// carries it: a delivery job holds the webhook body, which holds `data`,
/// which holds the result.
const RESULT_ENVELOPE_DEPTH: usize = 3;

/// The deepest handler result that still fits every stored payload.
pub const MAX_RESULT_DEPTH: usize = SERDE_DEPTH_LIMIT - RESULT_ENVELOPE_DEPTH;

/// The highest `api.max_json_depth` allowed: it leaves room for a handler to
/// wrap its input a few times (the demo handlers wrap it once) and still fit
/// [`MAX_RESULT_DEPTH`].
pub const MAX_INPUT_DEPTH: usize = 100;

/// Why a JSON document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("it nests more than {limit} arrays or objects deep")]
    TooDeep { limit: usize },
    #[error("it has a number outside the range of a 64-bit float, such as 1e400 ({0})")]
    NumberOutOfRange(String),
    #[error("it has an invalid \\u escape, such as a lone UTF-16 surrogate \"\\ud800\" ({0})")]
    InvalidEscape(String),
    #[error("it is not valid JSON: {0}")]
    Syntax(String),
}

/// A marker in the custom error a too-deep document stops the parse with.
const TOO_DEEP: &str = "herald: nesting limit reached";

/// Checks that `json` is one JSON value any serde_json parser in Herald can
/// read back: at most `max_depth` nested arrays and objects, numbers within
/// f64 range, strings with valid escapes.
pub fn check(json: &str, max_depth: usize) -> Result<(), JsonError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let outcome = Checker {
        depth_left: max_depth,
    }
    .deserialize(&mut deserializer)
    .and_then(|()| deserializer.end());
    outcome.map_err(|e| classify(e, max_depth))
}

fn classify(error: serde_json::Error, max_depth: usize) -> JsonError {
    let message = error.to_string();
    if message.starts_with(TOO_DEEP) || message.starts_with("recursion limit exceeded") {
        JsonError::TooDeep { limit: max_depth }
    } else if message.starts_with("number out of range") {
        JsonError::NumberOutOfRange(message)
    } else if message.contains("surrogate") || message.contains("escape") {
        JsonError::InvalidEscape(message)
    } else {
        JsonError::Syntax(message)
    }
}

/// Walks a document the way a full parse would (strings decoded, numbers
/// converted) without building it, counting the depth.
#[derive(Clone, Copy)]
struct Checker {
    depth_left: usize,
}

impl Checker {
    fn nested<E: de::Error>(self) -> Result<Checker, E> {
        match self.depth_left.checked_sub(1) {
            Some(depth_left) => Ok(Checker { depth_left }),
            None => Err(E::custom(TOO_DEEP)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Checker {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checker {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        if value.is_finite() {
            Ok(())
        } else {
            Err(E::custom("number out of range"))
        }
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        // A key is a string: decoding it checks its escapes.
        while map.next_key::<String>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// The top-level fields of a JSON object whose values are scalars
/// (strings, numbers, booleans, null), as raw JSON text, without parsing
/// the containers beside them: readable however deep (or broken) those
/// are. For telling what an unreadable stored payload was about.
pub fn top_level_scalars(json: &str) -> Vec<(String, &str)> {
    let bytes = json.as_bytes();
    let mut fields = Vec::new();
    let mut at = skip_space(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return fields;
    }
    at += 1;
    loop {
        at = skip_space(bytes, at);
        let Some(key_end) = string_end(bytes, at) else {
            return fields;
        };
        let Ok(key) = serde_json::from_str::<String>(&json[at..key_end]) else {
            return fields;
        };
        at = skip_space(bytes, key_end);
        if bytes.get(at) != Some(&b':') {
            return fields;
        }
        let start = skip_space(bytes, at + 1);
        let Some(end) = value_end(bytes, start) else {
            return fields;
        };
        if !matches!(bytes[start], b'{' | b'[') {
            fields.push((key, &json[start..end]));
        }
        at = skip_space(bytes, end);
        match bytes.get(at) {
            Some(b',') => at += 1,
            _ => return fields,
        }
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The end (exclusive) of the string starting at `at`.
fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the value starting at `at`, containers skipped
/// by counting brackets (no recursion).
fn value_end(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&b) = bytes.get(i) {
                match b {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = bytes[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(bytes.len() - at);
            Some(at + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn accepts_what_every_parser_reads_back() {
        for ok in [
            "null",
            "1.5e300",
            "-0",
            "123456789012345678901234567890",
            r#"{"b":1,"a":[true,"\u00e9\ud83d\ude00"]}"#,
            r#""\"\\\n\u0000""#,
        ] {
            assert_eq!(check(ok, 32), Ok(()), "{ok}");
        }
        assert_eq!(check(&nested(32), 32), Ok(()));
    }

    #[test]
    fn refuses_with_the_reason() {
        assert_eq!(
            check(&nested(33), 32),
            Err(JsonError::TooDeep { limit: 32 })
        );
        assert_eq!(
            check(&format!(r#"{{"a":{}}}"#, nested(32)), 32),
            Err(JsonError::TooDeep { limit: 32 })
        );
        // Deeper than serde_json itself reads: still our reason.
        assert_eq!(
            check(&nested(500), 32),
            Err(JsonError::TooDeep { limit: 32 })
        );
        assert!(matches!(
            check("1e400", 32),
            Err(JsonError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            check("[-1e400]", 32),
            Err(JsonError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            check(r#""\ud800""#, 32),
            Err(JsonError::InvalidEscape(_))
        ));
        assert!(matches!(
            check(r#"{"\udc00":1}"#, 32),
            Err(JsonError::InvalidEscape(_))
        ));
        assert!(matches!(check("[1,", 32), Err(JsonError::Syntax(_))));
        assert!(matches!(check("1 2", 32), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn top_level_scalars_are_read_beside_any_depth() {
        let deep = nested(10_000);
        let json = format!(
            r#"{{"v":1, "user":"al\"ice","result":{{"x":{deep}}},"n":12,"s":"[{{","type":"echo"}}"#
        );
        let fields = top_level_scalars(&json);
        assert_eq!(
            fields,
            vec![
                ("v".to_string(), "1"),
                ("user".to_string(), r#""al\"ice""#),
                ("n".to_string(), "12"),
                ("s".to_string(), r#""[{""#),
                ("type".to_string(), r#""echo""#),
            ]
        );
        assert!(top_level_scalars("not json").is_empty());
        assert_eq!(top_level_scalars(r#"{"a":"b","c":[[["#).len(), 1);
    }

    #[test]
    fn the_input_limit_leaves_room_for_the_envelope() {
        const { assert!(MAX_INPUT_DEPTH < MAX_RESULT_DEPTH) };
    }
}
