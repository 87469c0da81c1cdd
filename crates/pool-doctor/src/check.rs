//! `pool-doctor check`: the configuration read as the library reads it, one connection made
//! with it, and each finding compared with the settings, one line each.
//!
//! The comparisons ([`evaluate`]) are pure: they take what the server said ([`Facts`]) and
//! the configuration, and are unit-tested without a server.

use std::time::Duration;

use pool_core::capacity::slices::ClassShare;
use pool_core::classes::{Class, ClassSpecs};
use pool_core::config::{PoolConfig, SslMode};
use pool_core::settings::show_duration;
use pool_core::url::Backend;
use serde_json::json;

use crate::args::CheckArgs;
use crate::load::{self, UrlSource};
use crate::pg::{self, Facts};
use crate::report::{Check, Report};

/// A connect slower than this is reported.
const SLOW_CONNECT: Duration = Duration::from_secs(2);

/// Runs `check` and returns the report (never panics on bad input: errors become `fail`
/// lines).
pub fn run(args: &CheckArgs) -> Report {
    let (config, source) = match load::load(args.url.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            let mut report = Report::new("(configuration not readable)", "unknown");
            report.push(Check::fail(
                "config",
                pool_core::redact::redact(&e),
                "fix the value named above (see the README's Settings table)",
            ));
            return report;
        }
    };
    let target = match source {
        UrlSource::Unset => "DATABASE_URL unset".to_owned(),
        _ => config.url.redacted(),
    };
    let mut report = Report::new(target, config.url.backend().as_str());
    report.push(config_line(&config, source));
    match config.url.backend() {
        Backend::Postgres => postgres(&config, args, &mut report),
        Backend::Sqlite => crate::sqlite::check(&config, source, &mut report),
        other => report.push(Check::warn(
            "backend",
            format!("{other}: pool-doctor checks PostgreSQL and SQLite only"),
            "check the server's limits and timeouts by hand",
        )),
    }
    // Belt and braces: no secret of the URL in any line.
    for c in &mut report.checks {
        c.summary = config.redact(&c.summary);
        c.fix = c.fix.as_deref().map(|f| config.redact(f));
    }
    report
}

fn config_line(config: &PoolConfig, source: UrlSource) -> Check {
    let from = match source {
        UrlSource::Flag => "--url",
        UrlSource::Env => "DATABASE_URL",
        UrlSource::Unset => "no URL",
    };
    Check::pass(
        "config",
        format!(
            "settings read as the library reads them ({from}, {} DB_* variable(s) set): \
             pool_size {} + max_overflow {}, max_lifetime {}, idle_timeout {}",
            load::db_vars_set(),
            config.pool_size,
            config.max_overflow,
            opt(config.lifecycle.max_lifetime),
            opt(config.lifecycle.idle_timeout),
        ),
    )
    .with_data(json!({
        "url": config.url.redacted(),
        "source": from,
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
    }))
}

fn opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "off".to_owned(), show_duration)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

fn postgres(config: &PoolConfig, args: &CheckArgs, report: &mut Report) {
    report.push(Check::pass("url", config.url.redacted()));
    if let Err(check) = budget_shape(config, args) {
        report.push(check);
    }
    match pg::gather(config, args.timeout, args.samples, None) {
        Ok(facts) => {
            for check in evaluate(config, args, &facts) {
                report.push(check);
            }
        }
        Err(e) => report.push(Check::fail(
            "connect",
            format!("cannot connect: {e}"),
            "check the host, port, user, password, database and sslmode in the URL; the \
             error above says which",
        )),
    }
}

/// The classes given with `--class` must make a budget `ClassPools::build` accepts.
fn budget_shape(config: &PoolConfig, args: &CheckArgs) -> Result<(), Check> {
    if args.classes.is_empty() {
        return Ok(());
    }
    let mut specs = ClassSpecs::new(requested_budget(config, args));
    for c in &args.classes {
        specs.push(c.name.clone(), class_of(c));
    }
    specs.plan().map(|_| ()).map_err(|e| {
        Check::fail(
            "classes",
            e.to_string(),
            "fix the --class sizes or --budget so the floors and caps fit the total",
        )
    })
}

fn class_of(c: &ClassShare) -> Class {
    let mut class = Class::new().reserved(c.reserved);
    if let Some(n) = c.pool_size {
        class = class.pool_size(n);
    }
    if let Some(n) = c.max_overflow {
        class = class.max_overflow(n);
    }
    class
}

fn requested_budget(config: &PoolConfig, args: &CheckArgs) -> u32 {
    args.budget.unwrap_or_else(|| config.max_size())
}

/// Every comparison of what the server said with the configuration.
pub fn evaluate(config: &PoolConfig, args: &CheckArgs, facts: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    let s = &facts.session;
    let connect = if facts.connect > SLOW_CONNECT {
        Check::warn(
            "connect",
            format!(
                "connected in {:.0} ms (PostgreSQL {}, user {}, database {})",
                ms(facts.connect),
                s.server_version,
                s.user,
                s.database
            ),
            "connects this slow make reconnect storms long: keep pool_size connections open \
             (DB_POOL_SIZE) and check DNS and TLS set-up time",
        )
    } else {
        Check::pass(
            "connect",
            format!(
                "connected in {:.1} ms (PostgreSQL {}, user {}, database {})",
                ms(facts.connect),
                s.server_version,
                s.user,
                s.database
            ),
        )
    };
    out.push(connect.with_data(json!({
        "connect_ms": ms(facts.connect),
        "server_version": s.server_version,
        "user": s.user,
        "database": s.database,
    })));
    if s.in_recovery {
        out.push(Check::warn(
            "standby",
            "the server is a standby (pg_is_in_recovery): writes fail with \"read-only\"",
            "point DATABASE_URL at the primary (or add target_session_attrs=read-write)",
        ));
    }
    out.push(tls(config, facts));
    out.extend(keepalives(config, facts));
    out.extend(server_timeouts(config, facts));
    out.extend(capacity(config, args, facts));
    out.push(latency(config, facts));
    out.push(pooler(config, facts));
    out.extend(usage(args, facts));
    out
}

/// The `sslmode` libpq will use: the URL's, else ours, else `PGSSLMODE`, else `prefer`.
fn effective_sslmode(config: &PoolConfig) -> (String, &'static str) {
    if let Some((_, v)) = config
        .url
        .query_pairs()
        .into_iter()
        .find(|(k, _)| k == "sslmode")
    {
        return (v, "URL");
    }
    if let Some(mode) = &config.connect.ssl_mode {
        return (mode.as_str().to_owned(), "DB_SSLMODE");
    }
    if let Ok(v) = std::env::var("PGSSLMODE") {
        return (v, "PGSSLMODE");
    }
    (SslMode::Prefer.as_str().to_owned(), "libpq default")
}

fn tls(config: &PoolConfig, facts: &Facts) -> Check {
    let (mode, from) = effective_sslmode(config);
    let t = &facts.tls;
    let data = json!({ "ssl": t.ssl, "version": t.version, "cipher": t.cipher, "sslmode": mode });
    let check = if !t.ssl {
        Check::warn(
            "tls",
            format!("TLS is not in use (sslmode {mode}, from {from}): passwords and data cross the network in clear"),
            "set DB_SSLMODE=require (better verify-full with DB_SSLROOTCERT) or add sslmode=require to the URL",
        )
    } else {
        let version = t.version.clone().unwrap_or_else(|| "?".to_owned());
        let cipher = t.cipher.clone().unwrap_or_default();
        match mode.as_str() {
            "verify-full" | "verify-ca" => Check::pass(
                "tls",
                format!("TLS in use: {version} {cipher}, sslmode {mode} (from {from})"),
            ),
            "require" => Check::pass(
                "tls",
                format!(
                    "TLS in use: {version} {cipher}, sslmode require (from {from}); the server's \
                     certificate is not verified (verify-full would)"
                ),
            ),
            _ => Check::warn(
                "tls",
                format!(
                    "TLS in use ({version}), but sslmode {mode} (from {from}) falls back to \
                     plain text if TLS is refused"
                ),
                "set DB_SSLMODE=require (or verify-full with DB_SSLROOTCERT) so TLS cannot be \
                 dropped silently",
            ),
        }
    };
    check.with_data(data)
}

/// A URL parameter, as written.
fn url_param(config: &PoolConfig, key: &str) -> Option<String> {
    config
        .url
        .query_pairs()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn ceil_secs(d: Duration) -> i64 {
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    if d.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs.max(1)
    }
}

fn keepalives(config: &PoolConfig, facts: &Facts) -> Vec<Check> {
    let k = &config.connect.keepalives;
    let param = |key: &str| url_param(config, key).and_then(|v| v.trim().parse::<i64>().ok());
    let enabled = param("keepalives").map_or(k.enabled, |v| v != 0);
    let idle = param("keepalives_idle").unwrap_or_else(|| ceil_secs(k.idle));
    let interval = param("keepalives_interval").unwrap_or_else(|| ceil_secs(k.interval));
    let count = param("keepalives_count").unwrap_or(i64::from(k.count));
    let user_timeout = param("tcp_user_timeout").or_else(|| {
        config
            .connect
            .tcp_user_timeout
            .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
    });
    let mut out = Vec::new();
    let socket = facts.sockets.first();
    let read_back = match socket {
        Some(s) => format!(
            "socket: keepalive {}, idle {} s, interval {} s, count {}, tcp_user_timeout {} ms",
            if s.keepalive { "on" } else { "off" },
            s.keepalive_idle_s,
            s.keepalive_interval_s,
            s.keepalive_count,
            s.user_timeout_ms
        ),
        None => "socket options not readable here (Unix socket, or not Linux)".to_owned(),
    };
    let data = json!({
        "rendered": {
            "keepalives": enabled, "keepalives_idle_s": idle, "keepalives_interval_s": interval,
            "keepalives_count": count, "tcp_user_timeout_ms": user_timeout,
        },
        "socket": socket,
    });
    let mismatch = socket.is_some_and(|s| {
        s.keepalive != enabled
            || enabled
                && (s.keepalive_idle_s != idle
                    || s.keepalive_interval_s != interval
                    || s.keepalive_count != count)
    });
    let detect = idle + interval * count;
    let ka = if !enabled {
        Check::warn(
            "keepalives",
            format!("TCP keepalives are off; {read_back}"),
            "set DB_KEEPALIVES=on: NATs and proxies drop idle connections silently (Railway after \
             about 5 minutes), and only keepalives notice while a connection idles",
        )
    } else if mismatch {
        Check::warn(
            "keepalives",
            format!(
                "settings render keepalives idle {idle} s, interval {interval} s, count {count}, \
                 but the {read_back}"
            ),
            "something overrides the keepalive settings (PGKEEPALIVES* variables or a \
             wrapper); remove the override or set DB_KEEPALIVES_* to what you want",
        )
    } else if detect > 240 {
        Check::warn(
            "keepalives",
            format!("keepalives on, but a dead peer is noticed only after {detect} s (idle {idle} + {interval} × {count}); {read_back}"),
            "set DB_KEEPALIVES_IDLE=30s (many NATs and load balancers forget idle flows after 4-5 minutes)",
        )
    } else {
        Check::pass(
            "keepalives",
            format!(
                "keepalives on: idle {idle} s, interval {interval} s, count {count} (a dead \
                 peer noticed within {detect} s); {read_back}"
            ),
        )
    };
    out.push(ka.with_data(data));
    let ut = match (user_timeout, socket) {
        (None, _) => Check::warn(
            "tcp_user_timeout",
            "tcp_user_timeout is off: a query on a cut network waits for the system's \
             retransmission timeout (15 minutes or more)",
            "set DB_TCP_USER_TIMEOUT=30s",
        ),
        (Some(want), Some(s)) if s.user_timeout_ms != want => Check::warn(
            "tcp_user_timeout",
            format!(
                "settings render tcp_user_timeout {want} ms, the socket has {} ms",
                s.user_timeout_ms
            ),
            "something overrides tcp_user_timeout; remove the override or set DB_TCP_USER_TIMEOUT",
        ),
        (Some(want), _) => Check::pass(
            "tcp_user_timeout",
            format!(
                "tcp_user_timeout {want} ms{}",
                if socket.is_some() {
                    " (socket agrees)"
                } else {
                    ""
                }
            ),
        ),
    };
    out.push(ut.with_data(json!({ "rendered_ms": user_timeout })));
    out
}

fn setting_ms(facts: &Facts, name: &str) -> Option<u64> {
    facts.settings.get(name).and_then(pg::ServerSetting::millis)
}

fn dur(ms: u64) -> String {
    show_duration(Duration::from_millis(ms))
}

fn server_timeouts(config: &PoolConfig, facts: &Facts) -> Vec<Check> {
    let l = &config.lifecycle;
    let mut out = Vec::new();
    let ist = setting_ms(facts, "idle_session_timeout").unwrap_or(0);
    let data = json!({
        "idle_session_timeout_ms": ist,
        "max_lifetime_ms": l.max_lifetime.map(|d| d.as_millis() as u64),
        "idle_timeout_ms": l.idle_timeout.map(|d| d.as_millis() as u64),
        "keepalive_ping_ms": l.keepalive_ping.map(|d| d.as_millis() as u64),
    });
    let ist_d = Duration::from_millis(ist);
    let below = |d: Option<Duration>| d.is_some_and(|d| d < ist_d);
    let check = if ist == 0 {
        Check::pass(
            "idle_session_timeout",
            "off: the server does not end idle sessions",
        )
    } else if below(l.idle_timeout) || below(l.keepalive_ping) {
        Check::pass(
            "idle_session_timeout",
            format!(
                "{}: our idle_timeout {} / keepalive_ping {} close or ping idle connections first",
                dur(ist),
                opt(l.idle_timeout),
                opt(l.keepalive_ping)
            ),
        )
    } else {
        let lifetime = if l.max_lifetime.is_none_or(|m| m > ist_d) {
            format!(
                ", and max_lifetime {} retires them later still",
                opt(l.max_lifetime)
            )
        } else {
            String::new()
        };
        let suggest = dur((ist * 3 / 4).max(1000));
        Check::warn(
            "idle_session_timeout",
            format!(
                "the server ends sessions idle for {}, before our idle_timeout ({}) closes \
                 them{lifetime}: pooled connections are killed under the pool (it recovers, \
                 at a reconnect each)",
                dur(ist),
                opt(l.idle_timeout)
            ),
            format!(
                "set DB_POOL_IDLE_TIMEOUT={suggest} (below the server's {}) or \
                 DB_KEEPALIVE_PING={suggest} to keep them alive; or raise idle_session_timeout",
                dur(ist)
            ),
        )
    };
    out.push(check.with_data(data));
    let iitst = setting_ms(facts, "idle_in_transaction_session_timeout").unwrap_or(0);
    out.push(
        Check::pass(
            "idle_in_transaction",
            if iitst == 0 {
                "idle_in_transaction_session_timeout off".to_owned()
            } else {
                format!(
                    "idle_in_transaction_session_timeout {}: a transaction left waiting that long \
                     loses its session (the pool replaces it)",
                    dur(iitst)
                )
            },
        )
        .with_data(json!({ "ms": iitst })),
    );
    let st = setting_ms(facts, "statement_timeout").unwrap_or(0);
    out.push(
        if st > 0 && Duration::from_millis(st) < l.validation.timeout {
            Check::warn(
                "statement_timeout",
                format!(
                    "statement_timeout {} is shorter than our validation_timeout {}",
                    dur(st),
                    show_duration(l.validation.timeout)
                ),
                format!("set DB_VALIDATION_TIMEOUT below {}", dur(st)),
            )
        } else {
            Check::pass(
                "statement_timeout",
                if st == 0 {
                    "statement_timeout off: a runaway query holds its connection until it ends"
                        .to_owned()
                } else {
                    format!("statement_timeout {}", dur(st))
                },
            )
        }
        .with_data(json!({ "ms": st })),
    );
    let ka = |n: &str| {
        facts
            .settings
            .get(n)
            .map(|s| s.setting.clone())
            .unwrap_or_default()
    };
    out.push(Check::pass(
        "server_keepalives",
        format!(
            "server side: tcp_keepalives_idle {} s, interval {} s, count {}, tcp_user_timeout {} ms (0: the system's default)",
            ka("tcp_keepalives_idle"),
            ka("tcp_keepalives_interval"),
            ka("tcp_keepalives_count"),
            ka("tcp_user_timeout")
        ),
    ));
    if l.max_lifetime.is_none() {
        out.push(Check::warn(
            "max_lifetime",
            "connections are never retired (max_lifetime off)",
            "set DB_POOL_RECYCLE=30m: proxies, failovers and credential rotations end \
             long-lived connections",
        ));
    }
    out
}

fn capacity(config: &PoolConfig, args: &CheckArgs, facts: &Facts) -> Vec<Check> {
    let count = |n: &str| {
        facts
            .settings
            .get(n)
            .and_then(pg::ServerSetting::count)
            .unwrap_or(0)
    };
    let max = count("max_connections");
    let su = count("superuser_reserved_connections");
    let reserved = count("reserved_connections");
    let hard = max.saturating_sub(su).saturating_sub(reserved);
    let others = facts.activity.others;
    let available = hard.saturating_sub(others);
    let budget = requested_budget(config, args);
    let what = if args.classes.is_empty() {
        format!("pool_size + max_overflow {budget}")
    } else {
        format!("class budget {budget}")
    };
    let data = json!({
        "max_connections": max, "superuser_reserved": su, "reserved_connections": reserved,
        "other_clients": others, "available": available, "budget": budget,
    });
    let summary = format!(
        "{what} vs. {available} left (max_connections {max} - superuser_reserved {su} - \
         reserved {reserved} - {others} other client(s))"
    );
    let mut out = Vec::new();
    let check = if budget > hard {
        Check::fail(
            "budget",
            format!("{summary}: can never be opened, whatever else is connected"),
            format!(
                "lower DB_POOL_SIZE + DB_MAX_OVERFLOW (or the class budget) to at most {hard}, \
                 or raise max_connections; several replicas: pool-doctor size --replicas N"
            ),
        )
    } else if budget > available {
        Check::warn(
            "budget",
            format!(
                "{summary}: {} connection(s) would fail with \"too many clients\"",
                budget - available
            ),
            format!(
                "lower the budget to {available} or fewer (other clients include running \
                 replicas of this application: pool-doctor size --replicas N --app NAME slices \
                 it between them)"
            ),
        )
    } else {
        Check::pass("budget", format!("{summary}: fits"))
    };
    out.push(check.with_data(data));
    let s = &facts.session;
    for (id, limit, used, what) in [
        (
            "role_limit",
            s.role_conn_limit,
            facts.activity.role_others,
            format!("role {}", s.user),
        ),
        (
            "database_limit",
            s.db_conn_limit,
            facts.activity.db_others,
            format!("database {}", s.database),
        ),
    ] {
        let Some(limit) = limit.and_then(|l| u32::try_from(l).ok()) else {
            continue; // -1: no limit
        };
        let left = limit.saturating_sub(used);
        let summary = format!(
            "{what} has CONNECTION LIMIT {limit}, {used} in use by others: {left} left for a \
             budget of {budget}"
        );
        let data = json!({ "limit": limit, "used": used, "left": left, "budget": budget });
        out.push(
            if s.superuser == Some(true) {
                Check::pass(id, format!("{summary} (not enforced for a superuser)"))
            } else if budget > limit {
                Check::fail(
                    id,
                    summary,
                    format!("lower the budget to at most {limit}, or ALTER ROLE/DATABASE ... CONNECTION LIMIT"),
                )
            } else if budget > left {
                Check::warn(id, summary, format!("lower the budget to {left} or fewer"))
            } else {
                Check::pass(id, summary)
            }
            .with_data(data),
        );
    }
    out
}

fn latency(config: &PoolConfig, facts: &Facts) -> Check {
    let mut rt: Vec<f64> = facts.round_trips.iter().map(|d| ms(*d)).collect();
    rt.sort_by(f64::total_cmp);
    let median = rt.get(rt.len() / 2).copied().unwrap_or(0.0);
    let max = rt.last().copied().unwrap_or(0.0);
    let data = json!({ "samples": rt.len(), "median_ms": median, "max_ms": max });
    let timeout = ms(config.lifecycle.validation.timeout);
    let summary = format!(
        "round trip (SELECT 1): median {median:.2} ms, max {max:.2} ms over {} sample(s)",
        rt.len()
    );
    if max * 4.0 > timeout {
        Check::warn(
            "latency",
            format!(
                "{summary}: close to validation_timeout {}",
                show_duration(config.lifecycle.validation.timeout)
            ),
            format!(
                "raise DB_VALIDATION_TIMEOUT to at least {:.0}ms",
                (max * 10.0).max(1000.0)
            ),
        )
        .with_data(data)
    } else {
        Check::pass("latency", summary).with_data(data)
    }
}

fn pooler(config: &PoolConfig, facts: &Facts) -> Check {
    let s = &facts.session;
    let mut signs = Vec::new();
    let mut transaction = false;
    if let Some(mode) = &facts.pool_mode {
        signs.push(format!("SHOW pool_mode answered {mode:?}"));
        transaction |= mode == "transaction" || mode == "statement";
    }
    let version = s.server_version.to_ascii_lowercase();
    for name in ["bouncer", "supavisor", "pgcat", "odyssey", "pgpool"] {
        if version.contains(name) {
            signs.push(format!("server_version {:?}", s.server_version));
        }
    }
    let mut pids = facts.pids.clone();
    pids.sort_unstable();
    pids.dedup();
    if pids.len() > 1 {
        signs.push(format!(
            "pg_backend_pid changed between transactions ({} backends in {} transactions)",
            pids.len(),
            facts.pids.len()
        ));
        transaction = true;
    }
    let shared: Vec<i32> = facts
        .pids_second
        .iter()
        .copied()
        .filter(|p| facts.pids.contains(p))
        .collect();
    if !shared.is_empty() {
        signs.push(format!(
            "two client connections were served by the same backend (pid {})",
            shared[0]
        ));
        transaction = true;
    }
    let configured_app =
        url_param(config, "application_name").or_else(|| config.connect.application_name.clone());
    if let Some(app) = configured_app {
        if app != s.application_name {
            signs.push(format!(
                "application_name {app:?} arrived as {:?}",
                s.application_name
            ));
        }
    }
    let proxied = match (facts.sockets.as_slice(), s.client_port) {
        ([one], Some(port)) => u16::try_from(port).is_ok_and(|p| p != one.local_port),
        _ => false,
    };
    if proxied {
        signs.push(
            "the server sees another client port than ours (a proxy relays the connection)"
                .to_owned(),
        );
    }
    let data =
        json!({ "signs": signs, "transaction_mode": transaction, "pool_mode": facts.pool_mode });
    let declared = std::env::var("DB_POOLER").unwrap_or_default();
    if transaction {
        if declared.trim().eq_ignore_ascii_case("transaction") {
            Check::pass(
                "pooler",
                format!(
                    "transaction-mode pooler detected, DB_POOLER=transaction set: {}",
                    signs.join("; ")
                ),
            )
        } else {
            Check::warn(
                "pooler",
                format!("transaction-mode pooler detected: {}", signs.join("; ")),
                "transaction-mode pooler detected: set DB_POOLER=transaction",
            )
        }
    } else if signs.is_empty() {
        Check::pass(
            "pooler",
            "no pooler or proxy detected (same backend across transactions)",
        )
    } else {
        Check::pass(
            "pooler",
            format!(
                "something sits in front, session mode or a plain proxy: {}",
                signs.join("; ")
            ),
        )
    }
    .with_data(data)
}

fn usage(args: &CheckArgs, facts: &Facts) -> Vec<Check> {
    let a = &facts.activity;
    let line = |u: &pg::AppUsage| {
        format!(
            "{} {} ({} active, {} idle, {} idle in transaction)",
            if u.name.is_empty() {
                "(no application_name)"
            } else {
                &u.name
            },
            u.total,
            u.active,
            u.idle,
            u.idle_in_transaction
        )
    };
    let mut out = Vec::new();
    let listed: Vec<String> = a.apps.iter().take(8).map(line).collect();
    let stuck: u32 = a.apps.iter().map(|u| u.idle_in_transaction).sum();
    let summary = format!(
        "{} other client backend(s){}{}",
        a.others,
        if listed.is_empty() { "" } else { ": " },
        listed.join(", ")
    );
    let data = json!({ "apps": a.apps });
    out.push(if stuck > 0 {
        Check::warn(
            "usage",
            summary,
            format!("{stuck} session(s) sit idle inside a transaction, holding locks and connections: find them in pg_stat_activity (state 'idle in transaction') and end the transaction"),
        )
    } else {
        Check::pass("usage", summary)
    }
    .with_data(data));
    for class in &args.classes {
        let found = a
            .apps
            .iter()
            .find(|u| u.name == class.name || u.name.ends_with(&format!("-{}", class.name)));
        out.push(match found {
            Some(u) => Check::pass("class_usage", format!("class {}: {}", class.name, line(u))),
            None => Check::pass(
                "class_usage",
                format!("class {}: no backend named after it in pg_stat_activity (set application_name per class to see it here)", class.name),
            ),
        }
        .with_data(json!({ "class": class.name, "usage": found })));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{ServerSetting, Session};
    use crate::report::Outcome;
    use crate::socket::SocketOptions;

    fn args() -> CheckArgs {
        CheckArgs {
            url: None,
            classes: Vec::new(),
            budget: None,
            samples: 1,
            timeout: Duration::from_secs(1),
            json: true,
        }
    }

    fn facts(settings: &[(&str, &str, Option<&str>)]) -> Facts {
        Facts {
            session: Session {
                server_version: "16.4".into(),
                pid: 1,
                ..Session::default()
            },
            settings: settings
                .iter()
                .map(|(n, v, u)| {
                    (
                        (*n).to_owned(),
                        ServerSetting {
                            setting: (*v).to_owned(),
                            unit: u.map(str::to_owned),
                        },
                    )
                })
                .collect(),
            pids: vec![7, 7, 7],
            ..Facts::default()
        }
    }

    fn outcome(checks: &[Check], id: &str) -> Outcome {
        checks
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.outcome)
            .unwrap_or_else(|| panic!("no {id}"))
    }

    #[test]
    fn an_idle_session_timeout_below_our_idle_timeout_warns_with_the_fix() {
        let config = PoolConfig::builder("postgres://u@h/db").build().unwrap();
        let f = facts(&[
            ("idle_session_timeout", "2000", Some("ms")),
            ("max_connections", "100", None),
        ]);
        let checks = evaluate(&config, &args(), &f);
        let c = checks
            .iter()
            .find(|c| c.id == "idle_session_timeout")
            .unwrap();
        assert_eq!(c.outcome, Outcome::Warn);
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .contains("DB_POOL_IDLE_TIMEOUT=1500ms"),
            "{c:?}"
        );
        let config = PoolConfig::builder("postgres://u@h/db")
            .keepalive_ping(Some(Duration::from_secs(1)))
            .build()
            .unwrap();
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "idle_session_timeout"),
            Outcome::Pass
        );
    }

    #[test]
    fn a_budget_above_the_server_fails_and_one_above_what_is_left_warns() {
        let config = PoolConfig::builder("postgres://u@h/db")
            .pool_size(10)
            .max_overflow(10)
            .build()
            .unwrap();
        let server = [
            ("max_connections", "20", None),
            ("superuser_reserved_connections", "3", None),
        ];
        assert_eq!(
            outcome(&evaluate(&config, &args(), &facts(&server)), "budget"),
            Outcome::Fail
        );
        let server = [
            ("max_connections", "30", None),
            ("superuser_reserved_connections", "3", None),
        ];
        let mut f = facts(&server);
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "budget"),
            Outcome::Pass
        );
        f.activity.others = 8;
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "budget"),
            Outcome::Warn
        );
    }

    #[test]
    fn pid_changes_mean_a_transaction_pooler() {
        let config = PoolConfig::builder("postgres://u@h/db").build().unwrap();
        let mut f = facts(&[]);
        f.pids = vec![1, 2, 1];
        let checks = evaluate(&config, &args(), &f);
        let c = checks.iter().find(|c| c.id == "pooler").unwrap();
        if std::env::var_os("DB_POOLER").is_none() {
            assert_eq!(
                c.fix.as_deref(),
                Some("transaction-mode pooler detected: set DB_POOLER=transaction")
            );
        }
    }

    #[test]
    fn plain_text_and_prefer_warn() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        let config = PoolConfig::builder("postgres://u@h/db").build().unwrap();
        let mut f = facts(&[]);
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "tls"),
            Outcome::Warn
        );
        f.tls.ssl = true;
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "tls"),
            Outcome::Warn
        );
        let config = PoolConfig::builder("postgres://u@h/db?sslmode=require")
            .build()
            .unwrap();
        assert_eq!(
            outcome(&evaluate(&config, &args(), &f), "tls"),
            Outcome::Pass
        );
    }

    fn check<'a>(checks: &'a [Check], id: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no {id}"))
    }

    fn config(url: &str) -> PoolConfig {
        PoolConfig::builder(url).build().unwrap()
    }

    fn socket(idle: i64, interval: i64, count: i64, user_timeout_ms: i64) -> SocketOptions {
        SocketOptions {
            local_port: 40000,
            peer_port: 5432,
            keepalive: true,
            keepalive_idle_s: idle,
            keepalive_interval_s: interval,
            keepalive_count: count,
            user_timeout_ms,
        }
    }

    #[test]
    fn milliseconds_are_rounded_to_two_decimals_and_seconds_round_up() {
        assert_eq!(ms(Duration::from_micros(1234)), 1.23);
        assert_eq!(ms(Duration::from_micros(1236)), 1.24);
        assert_eq!(ms(Duration::from_secs(2)), 2000.0);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 1, "0 s is no keepalive idle");
    }

    #[test]
    fn a_connect_slower_than_two_seconds_warns() {
        let c = config("postgres://u@h/db");
        let mut f = facts(&[("max_connections", "100", None)]);
        for (took, want) in [
            (Duration::from_secs(1), Outcome::Pass),
            (SLOW_CONNECT, Outcome::Pass),
            (SLOW_CONNECT + Duration::from_millis(1), Outcome::Warn),
        ] {
            f.connect = took;
            assert_eq!(
                outcome(&evaluate(&c, &args(), &f), "connect"),
                want,
                "{took:?}"
            );
        }
    }

    #[test]
    fn tls_that_verifies_the_server_passes() {
        let mut f = facts(&[]);
        f.tls.ssl = true;
        for mode in ["verify-full", "verify-ca"] {
            let c = config(&format!("postgres://u@h/db?sslmode={mode}"));
            let checks = evaluate(&c, &args(), &f);
            let t = check(&checks, "tls");
            assert_eq!(t.outcome, Outcome::Pass, "{t:?}");
            assert!(t.summary.contains(&format!("sslmode {mode}")), "{t:?}");
            assert!(!t.summary.contains("not verified"), "{t:?}");
        }
    }

    #[test]
    fn keepalives_off_in_the_url_warn() {
        let f = facts(&[]);
        let off = evaluate(&config("postgres://u@h/db?keepalives=0"), &args(), &f);
        let k = check(&off, "keepalives");
        assert_eq!(k.outcome, Outcome::Warn);
        assert!(k.summary.contains("off"), "{k:?}");
        let on = evaluate(&config("postgres://u@h/db?keepalives=1"), &args(), &f);
        assert_eq!(outcome(&on, "keepalives"), Outcome::Pass);
    }

    #[test]
    fn a_socket_that_disagrees_with_the_settings_warns() {
        // The defaults render idle 30 s, interval 10 s, count 3.
        let c = config("postgres://u@h/db");
        let mut f = facts(&[]);
        f.sockets = vec![socket(30, 10, 3, 30_000)];
        let checks = evaluate(&c, &args(), &f);
        assert_eq!(outcome(&checks, "keepalives"), Outcome::Pass);
        let ut = check(&checks, "tcp_user_timeout");
        assert_eq!(ut.outcome, Outcome::Pass);
        assert!(ut.summary.contains("socket agrees"), "{ut:?}");
        let mut off = socket(30, 10, 3, 30_000);
        off.keepalive = false;
        for (what, s) in [
            ("keepalive off", off),
            ("idle", socket(31, 10, 3, 30_000)),
            ("interval", socket(30, 11, 3, 30_000)),
            ("count", socket(30, 10, 4, 30_000)),
        ] {
            f.sockets = vec![s];
            let k = evaluate(&c, &args(), &f);
            let k = check(&k, "keepalives");
            assert_eq!(k.outcome, Outcome::Warn, "{what}: {k:?}");
            assert!(k.summary.contains("but the socket"), "{what}: {k:?}");
        }
        f.sockets = vec![socket(30, 10, 3, 0)];
        assert_eq!(
            outcome(&evaluate(&c, &args(), &f), "tcp_user_timeout"),
            Outcome::Warn,
            "the socket has another tcp_user_timeout"
        );
    }

    #[test]
    fn keepalives_that_notice_a_dead_peer_after_more_than_four_minutes_warn() {
        let f = facts(&[]);
        let at = |idle: u32, interval: u32, count: u32| {
            let c = config(&format!(
                "postgres://u@h/db?keepalives_idle={idle}&keepalives_interval={interval}\
                 &keepalives_count={count}"
            ));
            let checks = evaluate(&c, &args(), &f);
            let k = check(&checks, "keepalives").clone();
            k
        };
        let k = at(200, 10, 4);
        assert_eq!(k.outcome, Outcome::Pass, "240 s: {k:?}");
        assert!(k.summary.contains("within 240 s"), "{k:?}");
        let k = at(200, 10, 5);
        assert_eq!(k.outcome, Outcome::Warn, "250 s: {k:?}");
        assert!(k.summary.contains("only after 250 s"), "{k:?}");
    }

    #[test]
    fn an_idle_session_timeout_equal_to_our_idle_timeout_still_warns() {
        let c = PoolConfig::builder("postgres://u@h/db")
            .idle_timeout(Some(Duration::from_secs(300)))
            .build()
            .unwrap();
        let f = facts(&[("idle_session_timeout", "300000", Some("ms"))]);
        assert_eq!(
            outcome(&evaluate(&c, &args(), &f), "idle_session_timeout"),
            Outcome::Warn
        );
        // max_lifetime: named when it retires connections later than the server ends them.
        for (lifetime, later) in [(300, false), (301, true)] {
            let c = PoolConfig::builder("postgres://u@h/db")
                .idle_timeout(None)
                .max_lifetime(Some(Duration::from_secs(lifetime)))
                .build()
                .unwrap();
            let checks = evaluate(&c, &args(), &f);
            let t = check(&checks, "idle_session_timeout");
            assert_eq!(t.outcome, Outcome::Warn);
            assert_eq!(
                t.summary.contains("retires them later still"),
                later,
                "max_lifetime {lifetime} s: {t:?}"
            );
        }
    }

    #[test]
    fn server_timeouts_are_named_and_a_statement_timeout_below_validation_warns() {
        let c = PoolConfig::builder("postgres://u@h/db")
            .validation_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let run = |st: &str, iitst: &str| {
            let f = facts(&[
                ("statement_timeout", st, Some("ms")),
                ("idle_in_transaction_session_timeout", iitst, Some("ms")),
            ]);
            evaluate(&c, &args(), &f)
        };
        for (st, want, text) in [
            ("0", Outcome::Pass, "statement_timeout off"),
            ("4000", Outcome::Warn, "shorter than our validation_timeout"),
            ("5000", Outcome::Pass, "statement_timeout 5s"),
            ("6000", Outcome::Pass, "statement_timeout 6s"),
        ] {
            let checks = run(st, "0");
            let t = check(&checks, "statement_timeout");
            assert_eq!(t.outcome, want, "{st}: {t:?}");
            assert!(t.summary.contains(text), "{st}: {t:?}");
        }
        let checks = run("0", "0");
        let t = check(&checks, "idle_in_transaction");
        assert!(t.summary.ends_with("off"), "{t:?}");
        let checks = run("0", "60000");
        let t = check(&checks, "idle_in_transaction");
        assert!(t.summary.contains("loses its session"), "{t:?}");
    }

    #[test]
    fn a_budget_that_exactly_fits_passes() {
        let c = PoolConfig::builder("postgres://u@h/db")
            .pool_size(10)
            .max_overflow(7)
            .build()
            .unwrap();
        let f = facts(&[
            ("max_connections", "20", None),
            ("superuser_reserved_connections", "3", None),
        ]);
        assert_eq!(outcome(&evaluate(&c, &args(), &f), "budget"), Outcome::Pass);
    }

    #[test]
    fn a_role_connection_limit_fails_only_below_the_budget_and_warns_when_others_use_it() {
        let c = PoolConfig::builder("postgres://u@h/db")
            .pool_size(10)
            .max_overflow(0)
            .build()
            .unwrap();
        let mut f = facts(&[("max_connections", "100", None)]);
        f.session.superuser = Some(false);
        for (limit, used, want) in [
            (9, 0, Outcome::Fail),
            (10, 0, Outcome::Pass),
            (12, 2, Outcome::Pass),
            (12, 4, Outcome::Warn),
        ] {
            f.session.role_conn_limit = Some(limit);
            f.activity.role_others = used;
            assert_eq!(
                outcome(&evaluate(&c, &args(), &f), "role_limit"),
                want,
                "limit {limit}, {used} used by others"
            );
        }
    }

    #[test]
    fn latency_is_the_median_and_warns_when_the_slowest_is_a_quarter_of_the_timeout() {
        let c = PoolConfig::builder("postgres://u@h/db")
            .validation_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let mut f = facts(&[]);
        f.round_trips = [4, 1, 3, 2].map(Duration::from_millis).to_vec();
        let checks = evaluate(&c, &args(), &f);
        let l = check(&checks, "latency");
        assert_eq!(l.data["median_ms"], 3.0, "{l:?}");
        assert_eq!(l.data["max_ms"], 4.0, "{l:?}");
        for (slowest, want) in [(250, Outcome::Pass), (251, Outcome::Warn)] {
            f.round_trips = vec![Duration::from_millis(slowest)];
            assert_eq!(
                outcome(&evaluate(&c, &args(), &f), "latency"),
                want,
                "slowest {slowest} ms of a 1 s timeout"
            );
        }
    }

    #[test]
    fn a_pooler_is_told_by_its_mode_its_name_and_what_it_changes() {
        if std::env::var_os("DB_POOLER").is_some() {
            return;
        }
        let c = config("postgres://u@h/db?application_name=api");
        let base = || {
            let mut f = facts(&[]);
            f.session.application_name = "api".into();
            f
        };
        let pooler = |f: &Facts| check(&evaluate(&c, &args(), f), "pooler").clone();
        let p = pooler(&base());
        assert_eq!(p.outcome, Outcome::Pass);
        assert!(
            p.summary.starts_with("no pooler or proxy detected"),
            "{p:?}"
        );
        for (mode, transaction) in [
            ("transaction", true),
            ("statement", true),
            ("session", false),
        ] {
            let mut f = base();
            f.pool_mode = Some(mode.into());
            let p = pooler(&f);
            assert_eq!(p.data["transaction_mode"], transaction, "{mode}: {p:?}");
            let want = if transaction {
                Outcome::Warn
            } else {
                Outcome::Pass
            };
            assert_eq!(p.outcome, want, "{mode}: {p:?}");
        }
        let mut f = base();
        f.session.application_name = "other".into();
        let p = pooler(&f);
        assert!(p.summary.contains("arrived as \"other\""), "{p:?}");
        let mut f = base();
        f.sockets = vec![socket(30, 10, 3, 30_000)];
        f.session.client_port = Some(40000);
        let p = pooler(&f);
        assert!(
            p.summary.starts_with("no pooler or proxy detected"),
            "{p:?}"
        );
        f.session.client_port = Some(40001);
        let p = pooler(&f);
        assert!(p.summary.contains("another client port than ours"), "{p:?}");
    }

    #[test]
    fn sessions_idle_inside_a_transaction_warn() {
        let mut f = facts(&[]);
        f.activity.apps = vec![pg::AppUsage {
            name: "worker".into(),
            total: 2,
            active: 0,
            idle: 1,
            idle_in_transaction: 1,
        }];
        let checks = evaluate(&config("postgres://u@h/db"), &args(), &f);
        let u = check(&checks, "usage");
        assert_eq!(u.outcome, Outcome::Warn, "{u:?}");
        f.activity.apps[0].idle_in_transaction = 0;
        let checks = evaluate(&config("postgres://u@h/db"), &args(), &f);
        assert_eq!(outcome(&checks, "usage"), Outcome::Pass);
    }
}
