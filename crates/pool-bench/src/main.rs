//! `cargo run --release -p pool-bench [-- --json] [--quick] [--only <scenario>]...
//! [--pinning split|same_core|unpinned]... [--save-json <file>]`

use pool_bench::{Options, Pinning, SCENARIOS};

fn usage() -> String {
    format!(
        "usage: pool-bench [--json] [--quick] [--only <scenario>[,<scenario>]]... \
         [--pinning split|same_core|unpinned]... [--save-json <file>]\n\
         scenarios: {}",
        SCENARIOS.join(", ")
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = Options {
        command: std::iter::once("cargo run --release -p pool-bench --".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        ..Options::default()
    };
    let mut json = false;
    let mut save_json: Option<String> = None;
    let mut pinnings = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--quick" => opts.quick = true,
            "--save-json" => match args.next() {
                Some(path) => save_json = Some(path),
                None => exit_usage("--save-json needs a file"),
            },
            "--only" => match args.next() {
                Some(s) => opts.only.extend(s.split(',').map(str::to_owned)),
                None => exit_usage("--only needs a scenario"),
            },
            "--pinning" => match args.next().as_deref() {
                Some("split") => pinnings.push(Pinning::Split),
                Some("same_core") => pinnings.push(Pinning::SameCore),
                Some("unpinned") => pinnings.push(Pinning::Unpinned),
                _ => exit_usage("--pinning takes split, same_core or unpinned"),
            },
            // `cargo test --benches` and harness-style callers.
            "--bench" | "--list" => return,
            "-h" | "--help" => {
                println!("{}", usage());
                return;
            }
            other => exit_usage(&format!("unknown argument {other:?}")),
        }
    }
    if !pinnings.is_empty() {
        opts.pinnings = pinnings;
    } else if opts.quick {
        // A quick run stays under a minute with one pinning.
        opts.pinnings = vec![Pinning::Split];
    }
    match pool_bench::run(opts) {
        Ok(report) => {
            let doc = serde_json::to_string_pretty(&report.to_json()).expect("JSON");
            if let Some(path) = save_json {
                if let Err(e) = std::fs::write(&path, &doc) {
                    eprintln!("pool-bench: could not write {path}: {e}");
                }
            }
            if json {
                println!("{doc}");
            } else {
                print!("{}", report.to_text());
            }
        }
        Err(e) => {
            eprintln!("pool-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn exit_usage(why: &str) -> ! {
    eprintln!("pool-bench: {why}\n{}", usage());
    std::process::exit(2);
}
