//! Reading a [`PoolConfig`] from an application's configuration file, through `serde`.
//!
//! The keys are `url` and the names of the [settings table](crate::settings::SETTINGS) (the
//! builder's method names: `pool_size`, `max_lifetime`, ...); the values are what the
//! environment variables take, written as strings, numbers or booleans: durations as
//! `"30s"`, `"250ms"`, `"5m"` (a bare number is seconds), optional ones also as `"off"`.
//! Every value is checked as [`PoolConfig::from_env`] checks it, and an error names the
//! setting and shows its value with any secret masked.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{env, PoolConfig};
use crate::error::ConfigError;

impl PoolConfig {
    /// Builds a configuration from settings given by name (`url` is required), values as
    /// text: what a configuration file deserializes to (see [`PoolConfig`]'s `Deserialize`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pool_core::config::PoolConfig;
    ///
    /// let config = PoolConfig::from_settings([
    ///     ("url", "postgres://app:secret@db/app"),
    ///     ("pool_size", "20"),
    ///     ("max_lifetime", "30m"),
    ///     ("connect_timeout", "off"),
    /// ])?;
    /// assert_eq!(config.pool_size, 20);
    /// assert_eq!(config.lifecycle.max_lifetime, Some(Duration::from_secs(1800)));
    /// # Ok::<(), pool_core::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError::UnknownSetting`] for a name the table does not have,
    /// [`ConfigError::MissingVar`] without `url`, [`ConfigError::InvalidVar`] (naming the
    /// setting) for a value that cannot be used.
    pub fn from_settings<K, V>(
        settings: impl IntoIterator<Item = (K, V)>,
    ) -> Result<PoolConfig, ConfigError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let values: BTreeMap<String, String> = settings
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        env::from_named(&values)
    }
}

/// A configuration file's pool section: a map from `url` and the settings' names to strings,
/// numbers or booleans, checked as [`PoolConfig::from_settings`] checks them.
///
/// ```
/// use std::time::Duration;
/// use pool_core::config::PoolConfig;
///
/// #[derive(serde::Deserialize)]
/// struct AppConfig {
///     database: PoolConfig,
/// }
///
/// let app: AppConfig = serde_json::from_str(r#"{
///     "database": {
///         "url": "postgres://app:secret@db/app",
///         "pool_size": 20,
///         "pool_timeout": "5s",
///         "validate_on_checkout": true,
///         "application_name": "orders-api"
///     }
/// }"#)?;
/// assert_eq!(app.database.pool_timeout, Duration::from_secs(5));
/// # Ok::<(), serde_json::Error>(())
/// ```
impl<'de> Deserialize<'de> for PoolConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let values = deserializer.deserialize_map(SettingsVisitor)?;
        env::from_named(&values).map_err(de::Error::custom)
    }
}

struct SettingsVisitor;

impl<'de> Visitor<'de> for SettingsVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of pool settings (url, pool_size, pool_timeout, ...)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Scalar>()?;
            if values.insert(key.clone(), value.0).is_some() {
                return Err(de::Error::custom(format!(
                    "the setting {:?} is given twice",
                    crate::redact::redact(&key)
                )));
            }
        }
        Ok(values)
    }
}

/// A setting's value: a string, a number or a boolean, kept as text. Its errors never quote
/// the value (it may be a password).
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a number or a boolean")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
        Ok(Scalar(v))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SENTINEL: &str = "p@ss:/%#?&='w ördS3NT1NEL";

    fn url() -> String {
        let encoded: String = SENTINEL
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("postgres://app:{encoded}@db/app")
    }

    #[test]
    fn every_setting_is_read_by_its_name() {
        let c = PoolConfig::from_settings([
            ("url", url().as_str()),
            ("pool_size", "3"),
            ("max_overflow", "0"),
            ("pool_timeout", "250ms"),
            ("max_lifetime", "off"),
            ("lifetime_jitter", "0.25"),
            ("validation_timeout", "2s"),
            ("application_name", "orders-api"),
        ])
        .unwrap();
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.max_overflow, 0);
        assert_eq!(c.pool_timeout, Duration::from_millis(250));
        assert_eq!(c.lifecycle.max_lifetime, None);
        assert_eq!(c.lifecycle.lifetime_jitter, 0.25);
        assert_eq!(c.connect.application_name.as_deref(), Some("orders-api"));
    }

    #[test]
    fn a_refusal_of_a_setting_the_file_did_not_give_keeps_the_builders_words() {
        // pool_size alone is within bounds; with the default max_overflow the sum is not,
        // and the builder names max_overflow, which the file does not set.
        let size = crate::config::MAX_CONNECTIONS.to_string();
        let err =
            PoolConfig::from_settings([("url", url().as_str()), ("pool_size", &size)]).unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::Invalid {
                    setting: "max_overflow",
                    ..
                }
            ),
            "{err:?}"
        );
        // A setting the file gives is named as the file spells it, with its value.
        let err = PoolConfig::from_settings([
            ("url", url().as_str()),
            ("pool_size", "0"),
            ("max_overflow", "0"),
        ])
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::InvalidVar { var, .. } if var == "pool_size"),
            "{err:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_map_of_settings_says_what_is_expected() {
        let err = serde_json::from_str::<PoolConfig>("[1, 2]").unwrap_err();
        assert!(err.to_string().contains("a map of pool settings"), "{err}");
    }

    #[test]
    fn json_numbers_booleans_and_strings_all_work() {
        let json = format!(
            r#"{{"url": {:?}, "pool_size": 4, "validate_on_checkout": false, "pool_timeout": "3s",
                "lifetime_jitter": 0.5}}"#,
            url()
        );
        let c: PoolConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(c.pool_size, 4);
        assert!(!c.lifecycle.validation.on_checkout);
        assert_eq!(c.pool_timeout, Duration::from_secs(3));
        assert_eq!(c.lifecycle.lifetime_jitter, 0.5);
    }

    #[test]
    fn errors_name_the_setting_and_never_show_the_password() {
        let bad = |json: String| -> String {
            let e = serde_json::from_str::<PoolConfig>(&json)
                .map(|c| format!("accepted: {c:?}"))
                .unwrap_or_else(|e| e.to_string());
            assert!(!e.contains("S3NT1NEL"), "{e}");
            e
        };
        let u = url();
        let e = bad(format!(r#"{{"url": {u:?}, "pool_size": "ten"}}"#));
        assert!(
            e.contains("pool_size") && e.contains("not a whole number"),
            "{e}"
        );
        let e = bad(format!(r#"{{"url": {u:?}, "pool_timeout": "1.5s"}}"#));
        assert!(e.contains("pool_timeout") && e.contains("1500ms"), "{e}");
        let e = bad(format!(r#"{{"url": {u:?}, "pool_sise": 3}}"#));
        assert!(e.contains("unknown setting \"pool_sise\""), "{e}");
        let e = bad(r#"{"pool_size": 3}"#.to_owned());
        assert!(e.contains("url is not set"), "{e}");
        let e = bad(format!(
            r#"{{"url": {u:?}, "pool_size": 0, "max_overflow": 0}}"#
        ));
        assert!(e.contains("accepted") || e.contains("at least 1"), "{e}");
        // A password in another setting's value (a shifted line) is masked too.
        let e = bad(format!(
            r#"{{"url": {u:?}, "application_name": "x", "pool_timeout": {SENTINEL:?}}}"#
        ));
        assert!(e.contains("pool_timeout"), "{e}");
        // A URL that does not parse: the value is shown masked.
        let e = bad(format!(
            r#"{{"url": "postgres://app:{SENTINEL}@db:notaport/app"}}"#
        ));
        assert!(e.contains("url"), "{e}");
        let e = bad(format!(r#"{{"url": {u:?}, "pool_size": [1]}}"#));
        assert!(e.contains("a string, a number or a boolean"), "{e}");
        let e = bad(format!(
            r#"{{"url": {u:?}, "pool_size": 1, "pool_size": 2}}"#
        ));
        assert!(e.contains("twice"), "{e}");
        let e = bad(format!(r#"{{"url": {u:?}, {SENTINEL:?}: 2}}"#));
        assert!(e.contains("unknown setting"), "{e}");
    }
}
