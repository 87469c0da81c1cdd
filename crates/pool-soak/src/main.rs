//! `cargo run --release -p pool-soak -- --seconds 60 [--seed N] [--json]`

use pool_soak::Options;

const USAGE: &str = "usage: pool-soak [--seconds N] [--seed N] [--json] [--quiet]";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = Options {
        seconds: 60,
        seed: None,
        progress: true,
        min_faults: 0,
    };
    let mut json = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n >= 5 => opts.seconds = n,
                _ => exit_usage("--seconds takes a whole number of seconds, at least 5"),
            },
            "--seed" => match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) => opts.seed = Some(n),
                None => exit_usage("--seed takes an unsigned integer"),
            },
            "--json" => json = true,
            "--quiet" => opts.progress = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => exit_usage(&format!("unknown argument {other:?}")),
        }
    }
    match pool_soak::run(&opts) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report.to_json()) {
                    Ok(doc) => println!("{doc}"),
                    Err(e) => eprintln!("pool-soak: could not render JSON: {e}"),
                }
            } else {
                print!("{}", report.to_text());
            }
        }
        Err(e) => {
            eprintln!("pool-soak: {e}");
            std::process::exit(1);
        }
    }
}

fn exit_usage(why: &str) -> ! {
    eprintln!("pool-soak: {why}\n{USAGE}");
    std::process::exit(2);
}
