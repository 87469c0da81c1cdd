//! The binary's start-up refusals, as a user meets them: without `DATABASE_URL` it exits
//! with status 2 and says which variable to set; with a URL whose server refuses the
//! connection it exits with a failure naming the cause, never the URL's password. No server
//! is needed (port 1 on loopback refuses every connection).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the service's binary with `env` set (and `DATABASE_URL` removed unless given), at
/// most 30 s: the run is killed and the test fails past that.
fn run(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_webhook-service"));
    cmd.env_remove("DATABASE_URL")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the service's binary starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the service did not exit within 30 s with {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the service's output")
}

#[test]
fn without_database_url_it_exits_with_status_2_and_names_the_variable() {
    for env in [&[][..], &[("DATABASE_URL", "")][..]] {
        let out = run(env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains("set DATABASE_URL"), "{env:?}: {stderr}");
    }
}

#[test]
fn a_server_that_refuses_fails_the_start_with_the_cause_and_without_the_password() {
    let secret = "S3nt1nel-pw";
    let url = format!("postgres://app:{secret}@127.0.0.1:1/app?sslmode=disable");
    // Refused is transient (a server starting up): the build waits out `pool_timeout`.
    let out = run(&[("DATABASE_URL", &url), ("DB_POOL_TIMEOUT", "2s")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot build the pool"), "{stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
}
