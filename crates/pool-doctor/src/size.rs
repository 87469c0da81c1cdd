//! `pool-doctor size --replicas N`: the connections the server has left (or the role's or
//! database's `CONNECTION LIMIT`, or `--total`), sliced between the replicas of one service
//! by [`pool_core::capacity::slices::slice`].

use pool_core::capacity::slices::{slice, Slice, SliceRequest};
use pool_core::url::Backend;
use serde_json::json;

use crate::args::SizeArgs;
use crate::load;
use crate::pg;

/// The output and the exit code (2 when no slice can be made).
pub fn run(args: &SizeArgs) -> (String, i32) {
    match plan(args) {
        Ok((source, s)) => {
            let text = if args.json {
                serde_json::to_string_pretty(&json!({ "source": source, "slice": s }))
                    .unwrap_or_default()
            } else {
                text(
                    &source,
                    &s,
                    args.classes.is_empty() || args.budget.is_some(),
                )
            };
            (text, 0)
        }
        Err(e) => {
            let text = if args.json {
                serde_json::to_string_pretty(&json!({ "error": e })).unwrap_or_default()
            } else {
                format!("error: {e}")
            };
            (text, 2)
        }
    }
}

/// Where the total came from, for the output.
fn plan(args: &SizeArgs) -> Result<(serde_json::Value, Slice), String> {
    let (config, _) = load::load(args.url.as_deref())?;
    let (total, source) = match args.total {
        Some(total) => (total, json!({ "total": total, "from": "--total" })),
        None => {
            if config.url.backend() != Backend::Postgres {
                return Err(
                    "size needs a PostgreSQL server to ask (--url or DATABASE_URL), or --total N"
                        .to_owned(),
                );
            }
            let facts = pg::gather(&config, args.timeout, 1, args.app.as_deref())
                .map_err(|e| format!("cannot connect: {e}"))?;
            let limits = pg::limits(facts, args.app.as_deref());
            let total = limits.total();
            let source = json!({
                "total": total,
                "from": "server",
                "server": limits.server,
                "other_clients": limits.others,
                "own_clients": args.app.as_ref().map(|_| limits.facts.activity.app_own),
                "role_limit_left": limits.role,
                "database_limit_left": limits.database,
                "summary": format!(
                    "max_connections - reserved slots = {}, minus {} other client(s){}{}",
                    limits.server,
                    limits.others,
                    limits.role.map(|r| format!(", role limit leaves {r}")).unwrap_or_default(),
                    limits.database.map(|d| format!(", database limit leaves {d}")).unwrap_or_default(),
                ),
            });
            (total, source)
        }
    };
    let request = SliceRequest {
        total,
        replicas: args.replicas,
        pool_size: config.pool_size,
        max_overflow: config.max_overflow,
        budget: args.budget,
        classes: args.classes.clone(),
    };
    let s = slice(&request).map_err(|e| config.redact(&e.to_string()))?;
    Ok((source, s))
}

/// `compare`: whether a configured size was given to compare (`--budget` with classes).
fn text(source: &serde_json::Value, s: &Slice, compare: bool) -> String {
    let mut out = format!(
        "pool-doctor size: {} replica(s) sharing {} connection(s)",
        s.replicas, s.total
    );
    if let Some(summary) = source.get("summary").and_then(|v| v.as_str()) {
        out.push_str(&format!(" ({summary})"));
    }
    out.push('\n');
    out.push_str(&format!(
        "per replica: {} connection(s){}\n",
        s.per_replica,
        if s.unused > 0 {
            format!(" ({} of the total unused)", s.unused)
        } else {
            String::new()
        }
    ));
    if s.classes.is_empty() {
        out.push_str(&format!(
            "  DB_POOL_SIZE={} DB_MAX_OVERFLOW={}\n",
            s.pool_size, s.max_overflow
        ));
    } else {
        out.push_str(&format!("  ClassPools::builder(url, {})\n", s.per_replica));
        for c in &s.classes {
            out.push_str(&format!(
                "    .class({:?}, Class::new().reserved({}).pool_size({}).max_overflow({}))\n",
                c.name, c.reserved, c.pool_size, c.max_overflow
            ));
        }
    }
    if !compare {
        out.push_str("      no --budget given: each replica's ClassPools total is its slice\n");
    } else if s.fits_as_configured {
        out.push_str(&format!(
            "PASS  as configured: {} × {} = {} fit in {}\n",
            s.replicas,
            s.requested_per_replica,
            u64::from(s.replicas) * u64::from(s.requested_per_replica),
            s.total
        ));
    } else {
        out.push_str(&format!(
            "WARN  as configured: {} × {} = {} do not fit in {}: use the sizes above\n",
            s.replicas,
            s.requested_per_replica,
            u64::from(s.replicas) * u64::from(s.requested_per_replica),
            s.total
        ));
    }
    for note in &s.notes {
        out.push_str(&format!("      {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_core::capacity::slices::ClassShare;
    use std::time::Duration;

    fn args(classes: Vec<ClassShare>, budget: Option<u32>) -> SizeArgs {
        SizeArgs {
            url: Some("postgres://app@127.0.0.1:1/app".to_owned()),
            replicas: 3,
            total: Some(30),
            classes,
            budget,
            app: None,
            timeout: Duration::from_secs(1),
            json: false,
        }
    }

    fn class(name: &str) -> ClassShare {
        ClassShare {
            name: name.to_owned(),
            reserved: 1,
            pool_size: Some(4),
            max_overflow: Some(2),
        }
    }

    #[test]
    fn the_text_compares_with_the_configuration_only_when_there_is_one_to_compare() {
        // No classes: the pool's own sizes are compared.
        let (text, code) = run(&args(Vec::new(), None));
        assert_eq!(code, 0, "{text}");
        assert!(
            text.starts_with("pool-doctor size: 3 replica(s) sharing 30 connection(s)"),
            "{text}"
        );
        assert!(text.contains("per replica: 10 connection(s)"), "{text}");
        assert!(text.contains("DB_POOL_SIZE="), "{text}");
        assert!(text.contains("as configured"), "{text}");
        assert!(!text.contains("no --budget given"), "{text}");
        // Classes without a budget: nothing to compare.
        let (text, _) = run(&args(vec![class("web")], None));
        assert!(text.contains("ClassPools::builder(url, 10)"), "{text}");
        assert!(text.contains("no --budget given"), "{text}");
        assert!(!text.contains("as configured"), "{text}");
        // Classes and a budget: compared.
        let (text, _) = run(&args(vec![class("web")], Some(8)));
        assert!(text.contains("as configured"), "{text}");
        assert!(!text.contains("no --budget given"), "{text}");
    }
}
