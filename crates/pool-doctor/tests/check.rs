//! `pool-doctor check` against private servers configured to trip each warning, against
//! SQLite, and with bad input: the binary is run and its `--json` output asserted on.

mod common;

use common::{doctor, run, server};
use diesel::{Connection, PgConnection};
use test_support::PgOptions;

/// A password holding `@ : / % # ? & = '`, a space and non-ASCII; `SENTINEL_URL_FORM` is it
/// percent-encoded for a URL.
const SENTINEL: &str = "S3nt!@:/%#?&=' é密";
const SENTINEL_URL_FORM: &str = "S3nt%21%40%3A%2F%25%23%3F%26%3D%27%20%C3%A9%E5%AF%86";

fn assert_no_secret(out: &common::Run) {
    for text in [&out.stdout, &out.stderr] {
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("s3nt") && !text.contains(SENTINEL_URL_FORM) && !text.contains('密'),
            "secret in output:\n{text}"
        );
    }
}

#[test]
fn a_server_ending_idle_sessions_before_the_pool_retires_them_warns_with_the_fix() {
    let Some(pg) = server(PgOptions::new().conf("idle_session_timeout = '2s'")) else {
        return;
    };
    let url = pg.url_with("sslmode=require");
    let out = run(doctor(&["check", "--json", "--url", &url], &[]));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let ist = out.check("idle_session_timeout");
    assert_eq!(ist["outcome"], "warn", "{ist}");
    assert_eq!(ist["data"]["idle_session_timeout_ms"], 2000);
    let fix = ist["fix"].as_str().unwrap();
    assert!(fix.contains("DB_POOL_IDLE_TIMEOUT=1500ms"), "{fix}");
    assert!(
        ist["summary"]
            .as_str()
            .unwrap()
            .contains("max_lifetime 30m"),
        "{ist}"
    );
    // TLS in use and reported with its version; keepalives read back from the socket.
    let tls = out.check("tls");
    assert_eq!(tls["outcome"], "pass", "{tls}");
    assert!(
        tls["data"]["version"].as_str().unwrap().starts_with("TLS"),
        "{tls}"
    );
    let ka = out.check("keepalives");
    assert_eq!(ka["outcome"], "pass", "{ka}");
    assert_eq!(ka["data"]["socket"]["keepalive"], true, "{ka}");
    assert_eq!(ka["data"]["socket"]["keepalive_idle_s"], 30, "{ka}");
    assert_eq!(ka["data"]["socket"]["user_timeout_ms"], 30000, "{ka}");
    assert_eq!(out.outcome("tcp_user_timeout"), "pass");
    assert_eq!(out.outcome("pooler"), "pass");
    assert_eq!(out.outcome("budget"), "pass");
    assert_eq!(out.json()["outcome"], "warn");
    assert_no_secret(&out);

    // The same fixed through the library's own variable: the warning goes away.
    let fixed = run(doctor(
        &["check", "--json", "--url", &url],
        &[("DB_POOL_IDLE_TIMEOUT", "1500ms")],
    ));
    assert_eq!(
        fixed.outcome("idle_session_timeout"),
        "pass",
        "{}",
        fixed.stdout
    );

    // Keepalives the URL sets win, and the socket shows them.
    let url = pg.url_with("sslmode=require&keepalives_idle=7");
    let out = run(doctor(&["check", "--json", "--url", &url], &[]));
    let ka = out.check("keepalives");
    assert_eq!(ka["data"]["socket"]["keepalive_idle_s"], 7, "{ka}");
    assert_eq!(ka["outcome"], "pass", "{ka}");

    // The text form, for people (printed for the README with --nocapture).
    let text = run(doctor(&["check", "--url", &url], &[]));
    println!("{}", text.stdout);
    assert!(
        text.stdout.contains("WARN  idle_session_timeout"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("fix: set DB_POOL_IDLE_TIMEOUT="));
}

#[test]
fn a_budget_above_max_connections_fails_and_one_above_what_is_left_warns() {
    let Some(pg) = server(PgOptions::new().conf("max_connections = 20")) else {
        return;
    };
    let url = pg.url_with("sslmode=require");
    // 20 - 3 superuser_reserved = 17 at most, whatever else is connected.
    let out = run(doctor(
        &["check", "--json", "--url", &url],
        &[("DB_POOL_SIZE", "10"), ("DB_MAX_OVERFLOW", "10")],
    ));
    assert_eq!(out.code, 2, "{}", out.stdout);
    let budget = out.check("budget");
    assert_eq!(budget["outcome"], "fail", "{budget}");
    assert_eq!(budget["data"]["available"], 17, "{budget}");
    assert!(
        budget["fix"].as_str().unwrap().contains("at most 17"),
        "{budget}"
    );
    assert_eq!(out.json()["exit_code"], 2);

    // 15 fits 17, but not once 4 other clients (named after a class) hold connections.
    let held: Vec<PgConnection> = (0..4)
        .map(|_| {
            PgConnection::establish(&pg.url_with("sslmode=require&application_name=adhoc"))
                .expect("other client")
        })
        .collect();
    let env = [("DB_POOL_SIZE", "10"), ("DB_MAX_OVERFLOW", "5")];
    let out = run(doctor(&["check", "--json", "--url", &url], &env));
    assert_eq!(out.code, 0, "{}", out.stdout);
    let budget = out.check("budget");
    assert_eq!(budget["outcome"], "warn", "{budget}");
    // 4, or more while an earlier run's backends are still exiting on a loaded machine.
    let others = budget["data"]["other_clients"].as_u64().unwrap();
    assert!(others >= 4, "{budget}");
    let left = 17u64.saturating_sub(others);
    assert_eq!(budget["data"]["available"], left, "{budget}");
    assert!(
        budget["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("{left} or fewer")),
        "{budget}"
    );

    // Classes: the class budget is compared, and each class's backends are listed.
    let out = run(doctor(
        &[
            "check",
            "--json",
            "--url",
            &url,
            "--class",
            "automation:pool_size=10",
            "--class",
            "adhoc:reserved=2",
            "--budget",
            "10",
        ],
        &env,
    ));
    assert_eq!(out.outcome("budget"), "pass", "{}", out.stdout);
    let json = out.json();
    let adhoc = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "class_usage" && c["data"]["class"] == "adhoc")
        .cloned()
        .unwrap();
    assert_eq!(adhoc["data"]["usage"]["total"], 4, "{adhoc}");
    // An impossible class budget fails before anything connects.
    let out = run(doctor(
        &[
            "check",
            "--json",
            "--url",
            &url,
            "--class",
            "adhoc:reserved=20",
            "--budget",
            "12",
        ],
        &env,
    ));
    assert_eq!(out.outcome("classes"), "fail", "{}", out.stdout);
    assert_eq!(out.code, 2);
    drop(held);
}

#[test]
fn plain_text_and_a_role_connection_limit_are_reported() {
    let Some(pg) = server(PgOptions::new().ssl(false)) else {
        return;
    };
    pg.execute("ALTER ROLE app CONNECTION LIMIT 5").unwrap();
    // No sslmode: libpq's prefer, and this server has no TLS: plain text.
    let out = run(doctor(&["check", "--json", "--url", &pg.url()], &[]));
    let tls = out.check("tls");
    assert_eq!(tls["outcome"], "warn", "{tls}");
    assert!(tls["fix"].as_str().unwrap().contains("DB_SSLMODE=require"));
    assert_eq!(tls["data"]["sslmode"], "prefer");
    // The default 10 + 10 cannot fit a role limited to 5.
    let role = out.check("role_limit");
    assert_eq!(role["outcome"], "fail", "{role}");
    assert_eq!(role["data"]["limit"], 5);
    assert_eq!(out.code, 2);
    // Keepalives and tcp_user_timeout switched off are warnings, each with the variable.
    let out = run(doctor(
        &["check", "--json", "--url", &pg.url()],
        &[
            ("DB_KEEPALIVES", "off"),
            ("DB_TCP_USER_TIMEOUT", "off"),
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "1"),
            ("DB_POOL_RECYCLE", "off"),
        ],
    ));
    assert_eq!(out.code, 0, "{}", out.stdout);
    let ka = out.check("keepalives");
    assert_eq!(ka["outcome"], "warn", "{ka}");
    assert_eq!(ka["data"]["socket"]["keepalive"], false, "{ka}");
    assert!(ka["fix"].as_str().unwrap().contains("DB_KEEPALIVES=on"));
    assert!(out.check("tcp_user_timeout")["fix"]
        .as_str()
        .unwrap()
        .contains("DB_TCP_USER_TIMEOUT=30s"));
    assert!(out.check("max_lifetime")["fix"]
        .as_str()
        .unwrap()
        .contains("DB_POOL_RECYCLE"));
    assert_eq!(out.outcome("role_limit"), "pass");

    // `size` slices what the role's limit leaves, not what max_connections would.
    let out = run(doctor(
        &["size", "--json", "--replicas", "2", "--url", &pg.url()],
        &[],
    ));
    assert_eq!(out.code, 0, "{}", out.stdout);
    let json = out.json();
    let total = json["slice"]["total"].as_u64().unwrap();
    assert!((2..=5).contains(&total), "{json}");
    assert_eq!(json["source"]["role_limit_left"], total, "{json}");
    assert_eq!(json["slice"]["fits_as_configured"], false, "{json}");
    let s = &json["slice"];
    assert!(s["pool_size"].as_u64().unwrap() + s["max_overflow"].as_u64().unwrap() <= total / 2);
}

#[test]
fn a_sentinel_password_never_shows_in_any_output() {
    let Some(pg) = server(PgOptions::new()) else {
        return;
    };
    pg.execute(&format!(
        "ALTER ROLE app PASSWORD '{}'",
        SENTINEL.replace('\'', "''")
    ))
    .unwrap();
    let good = format!(
        "postgres://app:{SENTINEL_URL_FORM}@127.0.0.1:{}/app?sslmode=require",
        pg.port()
    );
    // Through --url and through DATABASE_URL, JSON and text: connected, nothing shown.
    for out in [
        run(doctor(&["check", "--json", "--url", &good], &[])),
        run(doctor(&["check", "--json"], &[("DATABASE_URL", &good)])),
        run(doctor(&["check"], &[("DATABASE_URL", &good)])),
    ] {
        assert_no_secret(&out);
        assert!(out.stdout.contains("app:***@127.0.0.1"), "{}", out.stdout);
    }
    let out = run(doctor(&["check", "--json", "--url", &good], &[]));
    // pass, or warn if a loaded machine made the connect slower than 2 s.
    assert_ne!(out.outcome("connect"), "fail", "{}", out.stdout);

    // A wrong password that holds the sentinel: a clear failure, nothing shown.
    let wrong = good.replace("S3nt", "S3ntX");
    let out = run(doctor(&["check", "--json", "--url", &wrong], &[]));
    assert_eq!(out.code, 2);
    let connect = out.check("connect");
    assert_eq!(connect["outcome"], "fail");
    assert!(
        connect["summary"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{connect}"
    );
    assert_no_secret(&out);
    // A wrong sslmode value in the URL.
    let out = run(doctor(
        &[
            "check",
            "--json",
            "--url",
            &good.replace("sslmode=require", "sslmode=bogus"),
        ],
        &[],
    ));
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(
        out.check("connect")["summary"]
            .as_str()
            .unwrap()
            .contains("sslmode"),
        "{}",
        out.stdout
    );
    assert_no_secret(&out);
}

#[test]
fn bad_urls_and_bad_values_fail_clearly_without_showing_the_secret() {
    let port = test_support::free_port();
    for url in [
        // Raw (not percent-encoded) special characters in the password.
        format!("postgres://app:{SENTINEL}@127.0.0.1:{port}/app"),
        "postgres://app:S3nt@pa ss@db/app".to_owned(),
        "postgres://app:S3nt1@db:port/app".to_owned(),
        "S3nt-not-a-url".to_owned(),
        "redis://app:S3nt1@cache/0".to_owned(),
        "host=db password=S3nt1".to_owned(),
        String::new(),
        // Valid, but nothing listens there.
        format!("postgres://app:{SENTINEL_URL_FORM}@127.0.0.1:{port}/app"),
    ] {
        let out = run(doctor(
            &["check", "--json", "--timeout", "2s", "--url", &url],
            &[],
        ));
        assert_eq!(out.code, 2, "{url}: {}", out.stdout);
        let json = out.json();
        assert_eq!(json["outcome"], "fail", "{url}: {json}");
        assert_no_secret(&out);
        // And in text.
        let out = run(doctor(&["check", "--timeout", "2s", "--url", &url], &[]));
        assert_eq!(out.code, 2);
        assert!(out.stdout.contains("FAIL"), "{}", out.stdout);
        assert_no_secret(&out);
    }
    // A bad setting names its variable; the password in DATABASE_URL stays hidden.
    let out = run(doctor(
        &["check", "--json"],
        &[
            ("DATABASE_URL", "postgres://app:S3nt1@db/app"),
            ("DB_POOL_SIZE", "ten"),
        ],
    ));
    assert_eq!(out.code, 2);
    let config = out.check("config");
    assert!(config["summary"]
        .as_str()
        .unwrap()
        .starts_with("DB_POOL_SIZE=\"ten\""));
    assert_no_secret(&out);
    // A value that is not UTF-8.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut cmd = doctor(&["check", "--json"], &[]);
        cmd.env("DB_POOL_TIMEOUT", std::ffi::OsStr::from_bytes(b"\xff5s"));
        let out = run(cmd);
        assert_eq!(out.code, 2);
        assert!(out.check("config")["summary"]
            .as_str()
            .unwrap()
            .contains("DB_POOL_TIMEOUT is not valid UTF-8"));
    }
    // Slices that cannot be made say why.
    let out = run(doctor(
        &["size", "--json", "--replicas", "10", "--total", "5"],
        &[],
    ));
    assert_eq!(out.code, 2);
    assert!(out.json()["error"]
        .as_str()
        .unwrap()
        .contains("5 connection(s) cannot be shared by 10 replicas"));
    let out = run(doctor(
        &[
            "size",
            "--replicas",
            "2",
            "--total",
            "10",
            "--class",
            "adhoc:reserved=6",
        ],
        &[],
    ));
    assert_eq!(out.code, 2);
    assert!(
        out.stdout.contains("reserve 6 connection(s) per replica"),
        "{}",
        out.stdout
    );
    let out = run(doctor(&["size", "--replicas", "2"], &[]));
    assert_eq!(out.code, 2);
    assert!(out.stdout.contains("--total"), "{}", out.stdout);

    // Bad flags: the usage, exit code 2, no panic.
    for args in [
        &["check", "--bogus"][..],
        &["check", "--url"],
        &["size"],
        &["size", "--replicas", "zero"],
        &["frobnicate"],
        &[],
    ] {
        let out = run(doctor(args, &[]));
        assert_eq!(out.code, 2, "{args:?}");
        assert!(out.stderr.contains("USAGE"), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

#[test]
fn sqlite_reports_what_applies() {
    // No DATABASE_URL at all.
    let out = run(doctor(&["check", "--json"], &[]));
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.json()["backend"], "sqlite");
    assert_eq!(out.json()["target"], "DATABASE_URL unset", "{}", out.stdout);
    assert_eq!(out.check("config")["data"]["source"], "no URL");
    assert_eq!(out.outcome("url"), "warn");
    assert_eq!(out.outcome("not_applicable"), "pass");
    // A SQLite file that exists, and one that does not.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    let url = format!("sqlite://{}", path.display());
    let out = run(doctor(
        &["check", "--json"],
        &[("DATABASE_URL", &url), ("DB_POOL_SIZE", "4")],
    ));
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.outcome("sqlite_file"), "pass", "{}", out.stdout);
    assert_eq!(out.check("config")["data"]["pool_size"], 4);
    let missing = format!("sqlite://{}", dir.path().join("missing.db").display());
    let out = run(doctor(&["check", "--json", "--url", &missing], &[]));
    assert_eq!(out.outcome("sqlite_file"), "warn", "{}", out.stdout);
    assert!(
        !dir.path().join("missing.db").exists(),
        "check must not create it"
    );
}
