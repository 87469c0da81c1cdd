//! The command line, parsed by hand (the workspace has no argument parser, and three
//! subcommands do not need one).

use std::time::Duration;

use pool_core::capacity::slices::ClassShare;
use pool_core::config::parse_duration;

/// The usage text.
pub const USAGE: &str = "\
pool-doctor: diagnose a resilient-diesel setup from outside the process

USAGE:
  pool-doctor check [--url URL] [--class SPEC]... [--budget N] [--samples N] [--timeout DUR] [--json]
  pool-doctor size --replicas N [--url URL | --total N] [--class SPEC]... [--budget N] [--app NAME] [--json]
  pool-doctor status URL [--watch DUR] [--count N] [--json]

  check    reads DATABASE_URL and the DB_* settings as the library does (--url replaces
           DATABASE_URL), connects once and reports pass / warn / fail per line; exit code 2
           on a failure, 0 otherwise
  size     slices the connections the server has left (or the role's CONNECTION LIMIT, or
           --total) between N replicas, keeping every class's reserved floor
  status   fetches a running application's status report (JSON over HTTP) and prints it;
           --watch repeats every DUR (--count stops after N reports)

  SPEC     NAME[:reserved=N][,pool_size=N][,max_overflow=N], e.g. adhoc:reserved=5
  --budget the classes' budget total per replica (ClassPools::builder(url, N))
  --app    application_name of the service's own running connections: not counted as
           other clients (they are what is being sliced)
";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `check`.
    Check(CheckArgs),
    /// `size`.
    Size(SizeArgs),
    /// `status`.
    Status(StatusArgs),
    /// `help`, `--help`, `-h`.
    Help,
}

/// Arguments of `check`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckArgs {
    /// Replaces `DATABASE_URL`.
    pub url: Option<String>,
    /// Classes of one replica.
    pub classes: Vec<ClassShare>,
    /// The classes' budget total.
    pub budget: Option<u32>,
    /// Round trips timed.
    pub samples: u32,
    /// The longest the connect may take.
    pub timeout: Duration,
    /// JSON output.
    pub json: bool,
}

/// Arguments of `size`.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeArgs {
    /// Replaces `DATABASE_URL`.
    pub url: Option<String>,
    /// Replicas.
    pub replicas: u32,
    /// The total to slice, instead of asking the server.
    pub total: Option<u32>,
    /// Classes of one replica.
    pub classes: Vec<ClassShare>,
    /// The classes' budget total per replica.
    pub budget: Option<u32>,
    /// The service's own `application_name`, not counted as other clients.
    pub app: Option<String>,
    /// The longest the connect may take.
    pub timeout: Duration,
    /// JSON output.
    pub json: bool,
}

/// Arguments of `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusArgs {
    /// `http://host:port/path`.
    pub url: String,
    /// Repeat every this long.
    pub watch: Option<Duration>,
    /// Stop after this many reports (with `--watch`).
    pub count: Option<u32>,
    /// Print the JSON as fetched.
    pub json: bool,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses the arguments after the program name.
///
/// # Errors
/// A sentence saying which argument is wrong and what it should be.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let Some((command, rest)) = args.split_first() else {
        return Err("no command given; use check, size or status".to_owned());
    };
    let mut it = Flags::new(rest);
    match command.as_str() {
        "help" | "--help" | "-h" => Ok(Command::Help),
        "check" => {
            let mut a = CheckArgs {
                url: None,
                classes: Vec::new(),
                budget: None,
                samples: 10,
                timeout: DEFAULT_TIMEOUT,
                json: false,
            };
            while let Some(flag) = it.next_flag()? {
                match flag.as_str() {
                    "--url" => a.url = Some(it.value(&flag)?),
                    "--class" => a.classes.push(class_spec(&it.value(&flag)?)?),
                    "--budget" => a.budget = Some(number(&flag, &it.value(&flag)?, 1)?),
                    "--samples" => a.samples = number(&flag, &it.value(&flag)?, 1)?.min(1000),
                    "--timeout" => a.timeout = duration(&flag, &it.value(&flag)?)?,
                    "--json" => a.json = true,
                    _ => return Err(unknown(&flag, "check")),
                }
            }
            Ok(Command::Check(a))
        }
        "size" => {
            let mut a = SizeArgs {
                url: None,
                replicas: 0,
                total: None,
                classes: Vec::new(),
                budget: None,
                app: None,
                timeout: DEFAULT_TIMEOUT,
                json: false,
            };
            let mut replicas = None;
            while let Some(flag) = it.next_flag()? {
                match flag.as_str() {
                    "--url" => a.url = Some(it.value(&flag)?),
                    "--replicas" => replicas = Some(number(&flag, &it.value(&flag)?, 1)?),
                    "--total" => a.total = Some(number(&flag, &it.value(&flag)?, 0)?),
                    "--class" => a.classes.push(class_spec(&it.value(&flag)?)?),
                    "--budget" => a.budget = Some(number(&flag, &it.value(&flag)?, 1)?),
                    "--app" => a.app = Some(it.value(&flag)?),
                    "--timeout" => a.timeout = duration(&flag, &it.value(&flag)?)?,
                    "--json" => a.json = true,
                    _ => return Err(unknown(&flag, "size")),
                }
            }
            a.replicas =
                replicas.ok_or("size needs --replicas N (how many replicas share the server)")?;
            Ok(Command::Size(a))
        }
        "status" => {
            let mut url = None;
            let mut a = StatusArgs {
                url: String::new(),
                watch: None,
                count: None,
                json: false,
            };
            while let Some(arg) = it.next_any() {
                match arg.as_str() {
                    "--watch" => a.watch = Some(duration(&arg, &it.value(&arg)?)?),
                    "--count" => a.count = Some(number(&arg, &it.value(&arg)?, 1)?),
                    "--json" => a.json = true,
                    s if s.starts_with("--") => return Err(unknown(s, "status")),
                    _ if url.is_some() => {
                        return Err("status takes one URL".to_owned());
                    }
                    _ => url = Some(arg),
                }
            }
            a.url = url.ok_or(
                "status needs the URL of the application's status endpoint, e.g. \
                 http://127.0.0.1:8080/status",
            )?;
            Ok(Command::Status(a))
        }
        other => Err(format!(
            "unknown command {:?}; use check, size or status (pool-doctor help)",
            pool_core::redact::redact(other)
        )),
    }
}

struct Flags<'a> {
    args: std::slice::Iter<'a, String>,
}

impl<'a> Flags<'a> {
    fn new(args: &'a [String]) -> Self {
        Flags { args: args.iter() }
    }

    fn next_any(&mut self) -> Option<String> {
        self.args.next().cloned()
    }

    /// The next flag; `--flag=value` is split, the value kept for [`Flags::value`].
    fn next_flag(&mut self) -> Result<Option<String>, String> {
        match self.args.next() {
            None => Ok(None),
            Some(a) if a.starts_with("--") => Ok(Some(a.clone())),
            Some(a) => Err(format!(
                "unexpected argument {:?}; flags start with --",
                pool_core::redact::redact(a)
            )),
        }
    }

    fn value(&mut self, flag: &str) -> Result<String, String> {
        self.args
            .next()
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))
    }
}

fn unknown(flag: &str, command: &str) -> String {
    format!(
        "unknown flag {:?} for {command} (pool-doctor help lists the flags)",
        pool_core::redact::redact(flag)
    )
}

fn number(flag: &str, v: &str, min: u32) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{flag} {:?} is not a whole number of at least {min}",
            pool_core::redact::redact(v)
        )),
    }
}

fn duration(flag: &str, v: &str) -> Result<Duration, String> {
    match parse_duration(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{flag} must be longer than zero, e.g. 5s")),
        Err(reason) => Err(format!("{flag}: {reason}")),
    }
}

/// `NAME[:reserved=N][,pool_size=N][,max_overflow=N]`.
fn class_spec(spec: &str) -> Result<ClassShare, String> {
    let shown = || pool_core::redact::redact(spec);
    let (name, sizes) = spec.split_once(':').unwrap_or((spec, ""));
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "--class {:?} has no name; write NAME[:reserved=N][,pool_size=N][,max_overflow=N]",
            shown()
        ));
    }
    let mut class = ClassShare::new(name);
    for part in sizes.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!(
                "--class {:?}: {:?} is not key=value (reserved, pool_size, max_overflow)",
                shown(),
                pool_core::redact::redact(part)
            ));
        };
        let n = number(&format!("--class {name}: {}", key.trim()), value, 0)?;
        match key.trim() {
            "reserved" => class.reserved = n,
            "pool_size" => class.pool_size = Some(n),
            "max_overflow" => class.max_overflow = Some(n),
            other => {
                return Err(format!(
                    "--class {:?}: unknown size {:?}; use reserved, pool_size or max_overflow",
                    shown(),
                    pool_core::redact::redact(other)
                ))
            }
        }
    }
    Ok(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn class_specs_parse_and_bad_ones_say_why() {
        let c = class_spec("automation:pool_size=50,max_overflow=5").unwrap();
        assert_eq!(
            (c.pool_size, c.max_overflow, c.reserved),
            (Some(50), Some(5), 0)
        );
        assert_eq!(class_spec("adhoc:reserved=5").unwrap().reserved, 5);
        assert_eq!(class_spec("plain").unwrap(), ClassShare::new("plain"));
        assert!(class_spec(":reserved=1").unwrap_err().contains("no name"));
        assert!(class_spec("a:reserved").unwrap_err().contains("key=value"));
        assert!(class_spec("a:size=1").unwrap_err().contains("unknown size"));
        assert!(class_spec("a:reserved=-1")
            .unwrap_err()
            .contains("whole number"));
    }

    #[test]
    fn commands_parse() {
        let Command::Size(s) = parse(&args(
            "size --replicas 3 --total 57 --class adhoc:reserved=5 --json",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!((s.replicas, s.total, s.json), (3, Some(57), true));
        assert!(parse(&args("size --total 5"))
            .unwrap_err()
            .contains("--replicas"));
        assert!(parse(&args("size --replicas 0")).is_err());
        let Command::Status(s) = parse(&args("status http://h:1/s --watch 5s --count 2")).unwrap()
        else {
            panic!()
        };
        assert_eq!(s.watch, Some(Duration::from_secs(5)));
        assert!(parse(&args("status")).is_err());
        assert!(parse(&args("check --bogus"))
            .unwrap_err()
            .contains("unknown flag"));
        assert!(parse(&args("check --url"))
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&[]).is_err());
        assert_eq!(parse(&args("help")).unwrap(), Command::Help);
    }
}
