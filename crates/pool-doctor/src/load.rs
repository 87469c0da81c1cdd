//! The configuration, read exactly as the library reads it: `DATABASE_URL` and the `DB_*`
//! variables through [`PoolConfig::from_lookup`], with `--url` standing in for
//! `DATABASE_URL`.

use pool_core::config::{env_vars, PoolConfig};

/// Where the database URL came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlSource {
    /// `--url`.
    Flag,
    /// `DATABASE_URL`.
    Env,
    /// Neither: the library's `from_env` would fail, `from_env_or` would use its fallback.
    Unset,
}

/// The SQLite database a configuration without any URL is checked as (nothing is opened).
pub const UNSET_FALLBACK: &str = "sqlite://:memory:";

/// Reads the configuration; `url` replaces `DATABASE_URL`.
///
/// # Errors
/// The library's own error (naming the variable, redacted), or a variable that is not UTF-8.
pub fn load(url: Option<&str>) -> Result<(PoolConfig, UrlSource), String> {
    for var in env_vars() {
        if var == "DATABASE_URL" && url.is_some() {
            continue;
        }
        if let Some(value) = std::env::var_os(var) {
            if value.to_str().is_none() {
                return Err(format!("{var} is not valid UTF-8; set it to text"));
            }
        }
    }
    let source = match (url, std::env::var_os("DATABASE_URL")) {
        (Some(_), _) => UrlSource::Flag,
        (None, Some(_)) => UrlSource::Env,
        (None, None) => UrlSource::Unset,
    };
    let lookup = |name: &str| {
        if name == "DATABASE_URL" {
            if let Some(url) = url {
                return Some(url.to_owned());
            }
        }
        std::env::var(name).ok()
    };
    let fallback = (source == UrlSource::Unset).then_some(UNSET_FALLBACK);
    PoolConfig::from_lookup(lookup, fallback)
        .map(|c| (c, source))
        .map_err(|e| {
            let text = e.to_string();
            match (source, url) {
                // The library names DATABASE_URL; the value came from --url.
                (UrlSource::Flag, _) => text.replacen("DATABASE_URL", "--url", 1),
                _ => text,
            }
        })
}

/// How many `DB_*` variables are set.
pub fn db_vars_set() -> usize {
    env_vars()
        .filter(|v| *v != "DATABASE_URL" && std::env::var_os(v).is_some())
        .count()
}
