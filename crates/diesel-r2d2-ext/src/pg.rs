//! PostgreSQL: the typed connection settings rendered as libpq URL parameters.
//!
//! libpq and tokio-postgres disagree on keys and units, so settings are held typed in
//! [`ConnectSettings`] and rendered here for libpq. A parameter the user already wrote in the
//! URL wins and is kept exactly as written; ours only fill the gaps.

use std::time::Duration;

use pool_core::config::{ConnectSettings, PoolConfig};
use pool_core::error::ConfigError;

use crate::socket::PeerHint;

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// The libpq parameters our settings stand for, in libpq's units.
pub(crate) fn libpq_params(s: &ConnectSettings) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(t) = s.connect_timeout {
        // libpq takes whole seconds; round up so a sub-second timeout does not become "none".
        out.push(("connect_timeout", ceil_secs(t).to_string()));
    }
    let k = &s.keepalives;
    out.push(("keepalives", if k.enabled { "1" } else { "0" }.to_string()));
    if k.enabled {
        out.push(("keepalives_idle", ceil_secs(k.idle).to_string()));
        out.push(("keepalives_interval", ceil_secs(k.interval).to_string()));
        out.push(("keepalives_count", k.count.to_string()));
    }
    if let Some(t) = s.tcp_user_timeout {
        out.push(("tcp_user_timeout", t.as_millis().to_string()));
    }
    if let Some(mode) = &s.ssl_mode {
        out.push(("sslmode", mode.as_str().to_string()));
    }
    if let Some(root) = &s.ssl_root_cert {
        out.push(("sslrootcert", root.display().to_string()));
    }
    if let Some(name) = &s.application_name {
        out.push(("application_name", name.clone()));
    }
    out
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs.max(1)
    }
}

/// The URL handed to libpq, and what its socket's peer looks like.
pub(crate) fn render(config: &PoolConfig) -> Result<(String, PeerHint), ConfigError> {
    let raw = config.url.expose_secret();
    let mut url = url::Url::parse(raw).map_err(|e| ConfigError::InvalidUrl {
        url: config.url.redacted(),
        reason: e.to_string(),
    })?;
    let existing: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let has = |key: &str| existing.iter().any(|(k, _)| k == key);
    let missing: Vec<(&str, String)> = libpq_params(&config.connect)
        .into_iter()
        .filter(|(k, _)| !has(k))
        .collect();
    if !missing.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in &missing {
            pairs.append_pair(k, v);
        }
    }
    let host_param = existing
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.clone());
    let unix = match (&host_param, url.host_str()) {
        (Some(h), _) => h.starts_with('/') || h.starts_with('@'),
        (None, None) | (None, Some("")) => true,
        (None, Some(h)) => h.starts_with("%2F") || h.starts_with("%2f"),
    };
    let port = existing
        .iter()
        .find(|(k, _)| k == "port")
        .and_then(|(_, v)| v.parse().ok())
        .or(url.port())
        .unwrap_or(DEFAULT_PORT);
    let hint = if unix {
        PeerHint::Unix
    } else {
        PeerHint::Tcp(port)
    };
    Ok((url.to_string(), hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> PoolConfig {
        PoolConfig::builder(url)
            .application_name("orders-api")
            .tcp_user_timeout(Some(Duration::from_secs(3)))
            .build()
            .unwrap()
    }

    #[test]
    fn settings_become_libpq_parameters_in_libpq_units() {
        let (url, hint) = render(&config("postgres://u:pw@db.example:6543/app")).unwrap();
        assert!(url.contains("keepalives=1"));
        assert!(url.contains("keepalives_idle=30"));
        assert!(url.contains("keepalives_count=3"));
        assert!(url.contains("tcp_user_timeout=3000"), "{url}");
        assert!(url.contains("connect_timeout=10"));
        assert!(url.contains("application_name=orders-api"));
        assert_eq!(hint, PeerHint::Tcp(6543));
    }

    #[test]
    fn parameters_written_by_the_user_win_and_are_kept() {
        let (url, _) = render(&config(
            "postgres://u:pw@h/app?keepalives_idle=7&application_name=mine&sslmode=require",
        ))
        .unwrap();
        assert!(url.contains("keepalives_idle=7"));
        assert!(!url.contains("keepalives_idle=30"));
        assert!(url.contains("application_name=mine"));
        assert!(!url.contains("orders-api"));
        assert!(url.contains("sslmode=require"));
        assert_eq!(url.matches("keepalives_idle").count(), 1);
    }

    #[test]
    fn unix_socket_targets_are_recognised() {
        let (_, hint) = render(&config("postgres:///app?host=/var/run/postgresql")).unwrap();
        assert_eq!(hint, PeerHint::Unix);
        let (_, hint) = render(&config("postgres://u@localhost/app?port=7000")).unwrap();
        assert_eq!(hint, PeerHint::Tcp(7000));
    }
}
