//! Durations in configuration, written the way people write them: `"5s"`,
//! `"250ms"`, `"1h 30m"` (humantime's syntax). Use it with
//! `#[serde(with = "herald_core::duration_serde")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*duration).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Config {
        #[serde(with = "super")]
        timeout: Duration,
    }

    #[test]
    fn a_duration_round_trips_through_its_text() {
        let config: Config = serde_json::from_str(r#"{"timeout": "1m 30s"}"#).unwrap();
        assert_eq!(config.timeout, Duration::from_secs(90));
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"timeout":"1m 30s"}"#
        );
    }

    #[test]
    fn a_bare_number_or_a_typo_is_refused() {
        for bad in [
            r#"{"timeout": "30"}"#,
            r#"{"timeout": "5 seconds later"}"#,
            r#"{"timeout": 5}"#,
        ] {
            assert!(
                serde_json::from_str::<Config>(bad).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
