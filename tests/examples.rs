//! The examples, run as a user runs them: `quickstart` on SQLite and against a private
//! PostgreSQL server (its backends terminated halfway: 0 errors for our pool), and
//! `reserved_classes` on SQLite (the ad-hoc query gets in).
//!
//! `cargo test` builds the examples before it runs the tests; the binaries are taken from
//! `target/<profile>/examples/`. When one is missing or older than its source (as after
//! `cargo test --test examples` with an edited example), it is built first with
//! `cargo build --example`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    // One check-and-build at a time: cargo re-links an example's binary even when it is
    // fresh, so a second `cargo build` racing a test that is starting the binary can make it
    // vanish for an instant.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(&bin), modified(&source)) {
        (Some(b), Some(s)) => b >= s,
        _ => false,
    };
    if !fresh {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--example", name, "--manifest-path"])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if cfg!(feature = "metrics") {
            cargo.args(["--features", "metrics"]);
        }
        let status = cargo.status().expect("running cargo build --example");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    bin
}

/// Runs an example with `DATABASE_URL` (or without it) and no `DB_*` setting of the caller's;
/// returns its stdout, after checking it succeeded within `limit`.
fn run(name: &str, database_url: Option<&str>, limit: Duration) -> String {
    let mut cmd = Command::new(example(name));
    cmd.env_remove("DATABASE_URL");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DB_") {
            cmd.env_remove(key);
        }
    }
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the example");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    let mut stdout = String::new();
    let mut last_line = started;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let Ok(line) = line else { break };
        last_line = Instant::now();
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().expect("the example's exit");
    let took = started.elapsed();
    // From the last line printed to the process gone: the pools' threads and connections
    // must not hold the exit (1.5-2 s was once seen after heavy use).
    let exit_after = last_line.elapsed();
    let stderr = errors.join().unwrap_or_default();
    println!(
        "{name} ({took:.1?}, exited {exit_after:.1?} after its last line):\n{stdout}\n{stderr}"
    );
    assert!(status.success(), "{name} failed: {stderr}");
    assert!(took < limit, "{name} took {took:?}, more than {limit:?}");
    assert!(
        exit_after < Duration::from_secs(1),
        "{name} took {exit_after:?} to exit after its last line"
    );
    stdout
}

#[test]
fn quickstart_runs_on_sqlite_and_says_what_it_cannot_show_there() {
    let out = run("quickstart", None, Duration::from_secs(30));
    assert!(out.contains("pool_size 4 + max_overflow 0"), "{out}");
    assert!(out.contains("not shown on SQLite"), "{out}");
    assert!(
        out.contains("ours (commit_with_retry): 100 of 100 inserted, 0 errors"),
        "{out}"
    );
    assert!(out.contains("Connections: 4 opened"), "{out}");
    assert!(out.contains("DATABASE CONNECTION STATUS"), "{out}");
}

#[test]
fn quickstart_against_postgres_has_0_errors_through_its_backends_terminated() {
    test_support::capture_logs();
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let out = run(
        "quickstart",
        Some(&pg.url_with("sslmode=disable")),
        Duration::from_secs(60),
    );
    assert!(
        !out.contains(test_support::PgServer::PASSWORD),
        "the password was printed"
    );
    let terminated = out
        .lines()
        .find(|l| l.contains("terminated"))
        .unwrap_or_else(|| panic!("no terminate line:\n{out}"));
    assert!(
        !terminated.contains("terminated 0 backend(s) of ours"),
        "nothing of ours was terminated:\n{out}"
    );
    assert!(
        out.contains("ours (commit_with_retry): 100 of 100 inserted, 0 errors"),
        "{out}"
    );
    assert!(
        out.contains("plain r2d2 at its defaults"),
        "no control line:\n{out}"
    );
    assert!(out.contains("DATABASE CONNECTION STATUS"), "{out}");
}

#[test]
fn reserved_classes_gets_the_adhoc_query_in_while_automation_is_saturated() {
    let out = run("reserved_classes", None, Duration::from_secs(30));
    let waiting: u32 = out
        .lines()
        .find_map(|l| {
            let before = &l[..l.find(" thread(s) waiting in its queue")?];
            before.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or(0);
    assert!(waiting > 0, "automation was not saturated:\n{out}");
    assert!(out.contains("ad-hoc query got in: checkout took"), "{out}");
    assert!(out.contains("Connection budget: 5 connections"), "{out}");
}

#[test]
fn reserved_classes_against_postgres_gets_the_adhoc_query_in() {
    test_support::capture_logs();
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let out = run(
        "reserved_classes",
        Some(&pg.url_with("sslmode=disable")),
        Duration::from_secs(60),
    );
    assert!(out.contains("database: PostgreSQL"), "{out}");
    assert!(out.contains("ad-hoc query got in: checkout took"), "{out}");
    assert!(
        !out.contains(test_support::PgServer::PASSWORD),
        "the password was printed"
    );
}
