//! Configuration errors: what was wrong, with which setting or variable, and what to do.
//!
//! Every string a [`ConfigError`] carries is already safe to print: URLs and values that can
//! hold a secret are redacted before the error is built, so `Display` and `Debug` never show a
//! password.

/// A database URL, an environment variable or a pool setting was rejected.
///
/// The message says what happened, names the setting or variable, and says what to do, e.g.
/// `DB_POOL_SIZE="ten" is not a whole number; set it to a non-negative integer such as 10`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The database URL could not be understood.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with its password replaced by `***`.
        url: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The URL names a database this crate does not handle (or has no scheme at all).
    #[error("{}", unsupported_scheme_message(.scheme))]
    UnsupportedScheme {
        /// The scheme as written (`redis`), or empty when the text has none.
        scheme: String,
    },
    /// A required environment variable is not set.
    #[error("{var} is not set; {}", missing_var_hint(.var))]
    MissingVar {
        /// The variable's name.
        var: String,
    },
    /// An environment variable (or a setting of a configuration file) holds a value that
    /// cannot be used.
    #[error("{var}={value:?} {reason}")]
    InvalidVar {
        /// The variable's name.
        var: String,
        /// The value as given, redacted when the variable can hold a secret.
        value: String,
        /// What is wrong and what to set instead, phrased to follow the value
        /// (`is not a whole number; set it to ...`).
        reason: String,
    },
    /// A pool setting has a value that cannot work (e.g. `pool_size + max_overflow = 0`).
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting's name, as spelled by the builder method that sets it.
        setting: &'static str,
        /// What is wrong and what to set instead.
        reason: String,
    },
    /// A configuration file names a setting that does not exist.
    #[error(
        "unknown setting {name:?}; use `url` and the names of the settings table \
         (pool_size, max_overflow, pool_timeout, max_lifetime, ...)"
    )]
    UnknownSetting {
        /// The name as written (redacted, in case a line slipped).
        name: String,
    },
    /// An `sslmode` that libpq does not know.
    #[error(
        "unknown sslmode {value:?}; use one of disable, allow, prefer, require, verify-ca, \
         verify-full"
    )]
    UnknownSslMode {
        /// The value as given.
        value: String,
    },
}

/// The schemes and forms [`DatabaseUrl::parse`](crate::url::DatabaseUrl::parse) accepts, for
/// messages.
const ACCEPTED_FORMS: &str = "postgres://, postgresql://, mysql://, mariadb:// or sqlite:// \
     (or a file path ending in .db, .sqlite or .sqlite3, or :memory:)";

fn unsupported_scheme_message(scheme: &str) -> String {
    if scheme.is_empty() {
        format!(
            "the database URL has no scheme such as postgres:// (its text is not shown in case \
             it is a secret); start it with {ACCEPTED_FORMS}"
        )
    } else {
        format!("unsupported database URL scheme {scheme:?}; use {ACCEPTED_FORMS}")
    }
}

fn missing_var_hint(var: &str) -> &'static str {
    if var == "DATABASE_URL" || var == "url" {
        "set it to the database URL, e.g. postgres://user:password@host:5432/dbname or \
         sqlite://app.db"
    } else {
        "set it and start again"
    }
}

/// From the mutation run: the hints say what to write.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn hints_say_what_to_write() {
        let none = unsupported_scheme_message("");
        assert!(
            none.contains("no scheme") && none.contains("postgres://"),
            "{none}"
        );
        let redis = unsupported_scheme_message("redis");
        assert!(
            redis.contains("\"redis\"") && redis.contains("sqlite://"),
            "{redis}"
        );
        assert!(missing_var_hint("DATABASE_URL").contains("postgres://user:password@"));
        assert!(missing_var_hint("url").contains("postgres://user:password@"));
        assert_eq!(missing_var_hint("DB_OTHER"), "set it and start again");
    }
}
