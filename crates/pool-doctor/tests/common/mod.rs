//! Running the `pool-doctor` binary in a clean environment, and private servers.
#![allow(dead_code)]

use std::process::Command;

use test_support::{PgOptions, PgServer};

/// A private server with `opts`, or `None` (test skipped, reason printed) outside CI.
pub fn server(opts: PgOptions) -> Option<PgServer> {
    match PgServer::start_with(opts) {
        Ok(server) => Some(server),
        Err(err) if test_support::ci_mode() => panic!(
            "could not start a private PostgreSQL server, and CI=true makes that a failure: {err}"
        ),
        Err(err) => {
            eprintln!("skipping: could not start a private PostgreSQL server: {err}");
            None
        }
    }
}

/// The binary, with none of the settings' variables (nor libpq's) inherited from the
/// developer's environment, plus `env`.
pub fn doctor(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pool-doctor"));
    for var in pool_core::config::env_vars() {
        cmd.env_remove(var);
    }
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("PG") || k == "DB_POOLER" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// What a run printed, and its exit code.
pub struct Run {
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// Exit code.
    pub code: i32,
}

impl Run {
    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }

    /// The check with this id in `check --json` output.
    pub fn check(&self, id: &str) -> serde_json::Value {
        let json = self.json();
        json["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == id).cloned())
            .unwrap_or_else(|| panic!("no check {id:?} in:\n{}", self.stdout))
    }

    /// The outcome of the check with this id.
    pub fn outcome(&self, id: &str) -> String {
        self.check(id)["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// How long one run of the binary may take before the test fails (every command the tests
/// run ends within seconds; a mutation that makes it loop fails here instead of hanging).
const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the command, killing it and failing the test if it has not ended within
/// [`RUN_DEADLINE`].
pub fn run(mut cmd: Command) -> Run {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running pool-doctor");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for pool-doctor") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pool-doctor {cmd:?} did not end within {RUN_DEADLINE:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Run {
        stdout: stdout.join().expect("reading stdout"),
        stderr: stderr.join().expect("reading stderr"),
        code: status.code().unwrap_or(-1),
    }
}
