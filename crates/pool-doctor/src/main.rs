//! `pool-doctor`: diagnoses a resilient-diesel setup from outside the process.
//!
//! * `check`: reads the configuration as the library does (`DATABASE_URL`, `DB_*`, or
//!   `--url`), connects once with it, and reports pass / warn / fail per line — TLS,
//!   keepalives as the socket really has them, server timeouts against the pool's lifetimes,
//!   `max_connections` against the budget, round trips, poolers in front, usage per
//!   `application_name`. `--json` for machines; exit code 2 on a failure.
//! * `size --replicas N`: slices what the server has left between the replicas of a service,
//!   keeping every class's reserved floor.
//! * `status URL [--watch 5s]`: fetches a running application's status report over HTTP.
//!
//! No output ever holds a password: every line goes through the library's redaction.

mod args;
mod check;
mod load;
mod pg;
mod report;
mod size;
mod socket;
mod sqlite;
mod status;

use std::io::Write;

fn main() {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let code = match args::parse(&argv) {
        Ok(args::Command::Help) => {
            print_out(args::USAGE);
            0
        }
        Ok(args::Command::Check(a)) => {
            let report = check::run(&a);
            let text = if a.json {
                report.to_json()
            } else {
                report.to_text()
            };
            print_out(&text);
            report.exit_code()
        }
        Ok(args::Command::Size(a)) => {
            let (text, code) = size::run(&a);
            print_out(&text);
            code
        }
        Ok(args::Command::Status(a)) => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let code = status::run(&a, &mut out);
            let _ = out.flush();
            code
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pool-doctor: {e}\n\n{}", args::USAGE);
            2
        }
    };
    std::process::exit(code);
}

/// Prints `text` with one final newline; a closed stdout (`| head`) is not an error worth a
/// panic.
fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", text.trim_end());
    let _ = out.flush();
}
