//! PostgreSQL: the typed connection settings rendered as libpq URL parameters.
//!
//! libpq and tokio-postgres disagree on keys and units, so settings are held typed in
//! [`ConnectSettings`] and rendered here for libpq. A parameter the user already wrote in the
//! URL wins and is kept exactly as written; ours only fill the gaps.

use std::time::Duration;

use pool_core::config::{ConnectSettings, PoolConfig};
use pool_core::error::ConfigError;

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

/// The URL handed to libpq.
///
/// The user's URL is kept byte for byte (libpq accepts forms a strict URL parser rejects, such
/// as `postgres://app@/db?host=/run/postgresql`); missing parameters are appended,
/// percent-encoded the way libpq decodes them.
pub(crate) fn render(config: &PoolConfig) -> Result<String, ConfigError> {
    let raw = config.url.expose_secret();
    let existing = config.url.query_pairs();
    let has = |key: &str| existing.iter().any(|(k, _)| k == key);
    // A raw `#` never gets here: `DatabaseUrl::parse` refuses it (libpq has no fragments).
    let base = raw;
    let mut out = base.to_owned();
    let mut sep = if base.contains('?') {
        if base.ends_with('?') || base.ends_with('&') {
            ""
        } else {
            "&"
        }
    } else {
        "?"
    };
    for (k, v) in libpq_params(&config.connect) {
        if !has(k) {
            out.push_str(sep);
            out.push_str(k);
            out.push('=');
            out.push_str(&percent_encode(&v));
            sep = "&";
        }
    }
    Ok(out)
}

/// Percent-encodes everything but RFC 3986's unreserved characters (libpq decodes `%XX` in
/// URI parameters, but not `+`).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
        let url = render(&config("postgres://u:pw@db.example:6543/app")).unwrap();
        assert!(url.contains("keepalives=1"));
        assert!(url.contains("keepalives_idle=30"));
        assert!(url.contains("keepalives_interval=10"), "{url}");
        assert!(url.contains("keepalives_count=3"));
        assert!(url.contains("tcp_user_timeout=3000"), "{url}");
        assert!(url.contains("connect_timeout=10"));
        assert!(url.contains("application_name=orders-api"));
    }

    #[test]
    fn the_tls_settings_become_libpq_parameters_from_the_builder_and_the_environment() {
        use pool_core::config::SslMode;
        let built = PoolConfig::builder("postgres://u:pw@h/app")
            .ssl_mode(SslMode::VerifyFull)
            .ssl_root_cert("/etc/ssl/rds ca.pem")
            .build()
            .unwrap();
        let url = render(&built).unwrap();
        assert!(url.contains("sslmode=verify-full"), "{url}");
        assert!(url.contains("sslrootcert=/etc/ssl/rds%20ca.pem"), "{url}");
        let env = |key: &str| match key {
            "DATABASE_URL" => Some("postgres://u:pw@h/app".to_owned()),
            "DB_SSLMODE" => Some("require".to_owned()),
            "DB_SSLROOTCERT" => Some("/etc/ssl/root.pem".to_owned()),
            _ => None,
        };
        let url = render(&PoolConfig::from_lookup(env, None).unwrap()).unwrap();
        assert!(url.contains("sslmode=require"), "{url}");
        assert!(url.contains("sslrootcert=/etc/ssl/root.pem"), "{url}");
        // The URL's own word wins, and is not repeated.
        let url = render(
            &PoolConfig::builder("postgres://u:pw@h/app?sslmode=disable")
                .ssl_mode(SslMode::VerifyFull)
                .build()
                .unwrap(),
        )
        .unwrap();
        assert!(url.contains("sslmode=disable"), "{url}");
        assert!(!url.contains("verify-full"), "{url}");
        // Unset: libpq's own default, nothing written.
        let url = render(&config("postgres://u:pw@h/app")).unwrap();
        assert!(
            !url.contains("sslmode") && !url.contains("sslrootcert"),
            "{url}"
        );
    }

    #[test]
    fn libpq_seconds_round_up_and_are_never_zero() {
        // libpq takes whole seconds, and 0 means "the OS default" (for `connect_timeout`,
        // "wait forever"): a part of a second rounds up, and nothing becomes 0.
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(200)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        let url = render(
            &PoolConfig::builder("postgres://u:pw@h/app")
                .keepalives_idle(Duration::from_millis(2500))
                .connect_timeout(Some(Duration::from_millis(300)))
                .build()
                .unwrap(),
        )
        .unwrap();
        assert!(url.contains("keepalives_idle=3"), "{url}");
        assert!(url.contains("connect_timeout=1"), "{url}");
    }

    #[test]
    fn a_url_ending_in_a_separator_gets_no_empty_parameter() {
        for (url, joined) in [
            ("postgres://u:pw@h/app?", "/app?connect_timeout=10"),
            (
                "postgres://u:pw@h/app?sslmode=disable&",
                "sslmode=disable&connect_timeout=10",
            ),
        ] {
            let out = render(&config(url)).unwrap();
            assert!(out.contains(joined), "{out}");
            assert!(!out.contains("?&") && !out.contains("&&"), "{out}");
        }
    }

    #[test]
    fn parameters_written_by_the_user_win_and_are_kept() {
        let url = render(&config(
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
    fn host_less_urls_are_kept_as_written() {
        // A user but no host: libpq's default socket. url::Url rejects this form.
        let url = render(&config("postgres://app@/app?host=/run/postgresql")).unwrap();
        assert!(
            url.starts_with("postgres://app@/app?host=/run/postgresql&connect_timeout=10&"),
            "{url}"
        );
    }

    #[test]
    fn values_are_percent_encoded_as_libpq_decodes_them() {
        let config = PoolConfig::builder("postgres://u@h/app")
            .application_name("orders api/1 & co")
            .build()
            .unwrap();
        let url = render(&config).unwrap();
        assert!(
            url.contains("application_name=orders%20api/1%20%26%20co"),
            "{url}"
        );
        assert!(!url.contains('+'));
    }
}
