//! A status report of one or more pools: for a person (`Display`) and for machines (JSON).
//!
//! ```
//! use pool_core::stats::{Gauges, PoolStats};
//! use pool_core::status::StatusReport;
//!
//! let stats = PoolStats::new();
//! let gauges = Gauges { name: "automation".into(), in_use: 52, idle: 1, pool_size: 50, max_overflow: 5, ..Gauges::default() };
//! let report = StatusReport::new(vec![stats.snapshot(gauges)]).with_budget(60, 5);
//! let text = report.to_string();
//! assert!(text.contains("In Use: 52/55"));
//! assert!(text.contains("High load"));
//! assert!(report.to_json().contains("\"in_use\": 52"));
//! ```

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::budget::BudgetSnapshot;
use crate::stats::StatsSnapshot;

/// Pools at or above this share of `total_possible` in use are reported under high load.
const HIGH_LOAD_PERCENT: u64 = 90;

/// The state of a set of pools at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    /// When the report was made: RFC 3339, UTC, whole seconds (`2025-10-16T11:42:00Z`).
    pub generated_at: String,
    /// One snapshot per pool (or budget class).
    pub pools: Vec<StatsSnapshot>,
    /// The connection budget shared by the pools (e.g. the server's 60), if there is one.
    pub budget_total: Option<u32>,
    /// Connections of the budget reserved for particular classes, if any.
    pub budget_reserved: Option<u32>,
    /// The budget's own state (permits per class, waiters), when the pools share a
    /// [`Budget`](crate::budget::Budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSnapshot>,
}

impl StatusReport {
    /// A report of `pools`, stamped with the current time, without a budget.
    pub fn new(pools: Vec<StatsSnapshot>) -> Self {
        StatusReport {
            generated_at: format_rfc3339(SystemTime::now()),
            pools,
            budget_total: None,
            budget_reserved: None,
            budget: None,
        }
    }

    /// Adds a [`Budget`](crate::budget::Budget)'s state: its total, the sum of its reserved
    /// floors, and per class the permits held and waiters.
    pub fn with_budget_snapshot(mut self, snapshot: BudgetSnapshot) -> Self {
        self.budget_total = Some(snapshot.total);
        self.budget_reserved = Some(snapshot.classes.iter().map(|c| c.reserved).sum());
        self.budget = Some(snapshot);
        self
    }

    /// Adds the connection budget the pools share: `total` connections, `reserved` of them
    /// held for particular classes.
    pub fn with_budget(mut self, total: u32, reserved: u32) -> Self {
        self.budget_total = Some(total);
        self.budget_reserved = Some(reserved);
        self
    }

    /// Whether every pool can hand out a connection now (see
    /// [`StatsSnapshot::is_healthy`]).
    pub fn is_healthy(&self) -> bool {
        self.pools.iter().all(|p| p.is_healthy) && self.budget.as_ref().is_none_or(|b| b.healthy)
    }

    /// The report as pretty-printed JSON (the fields of [`StatusReport`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            // Plain data always serializes; keep the output JSON even if that ever changes.
            format!("{{\"error\": {:?}}}", e.to_string())
        })
    }

    fn health_line(&self) -> String {
        if self.pools.is_empty() {
            return "No pools to report.".to_owned();
        }
        if self.budget.as_ref().is_some_and(|b| !b.healthy) {
            return "❌ Reserved capacity is NOT available: a class cannot get its floor"
                .to_owned();
        }
        let down: Vec<String> = self
            .pools
            .iter()
            .filter_map(|p| {
                let d = p.server_down.as_ref()?;
                Some(format!(
                    "{:?} ({}, {} failed attempt(s) in {:.1} s)",
                    p.name,
                    d.class,
                    d.failed_attempts,
                    d.since_ms as f64 / 1000.0
                ))
            })
            .collect();
        if !down.is_empty() {
            return format!(
                "❌ Server unreachable: {}: checkouts that need a new connection wait or fail",
                down.join(", ")
            );
        }
        let exhausted: Vec<String> = self
            .pools
            .iter()
            .filter(|p| !p.is_healthy)
            .map(|p| {
                let waiting = p
                    .waiters
                    .map(|w| format!(", {w} waiting"))
                    .unwrap_or_default();
                format!(
                    "{:?} ({}/{} in use{waiting})",
                    p.name, p.in_use, p.total_possible
                )
            })
            .collect();
        if !exhausted.is_empty() {
            return format!(
                "❌ EXHAUSTED: {}: checkouts wait for a connection to be returned and may time out",
                exhausted.join(", ")
            );
        }
        let loaded: Vec<String> = self
            .pools
            .iter()
            .filter(|p| {
                u64::from(p.in_use) * 100 >= u64::from(p.total_possible) * HIGH_LOAD_PERCENT
            })
            .map(|p| format!("{:?} ({}/{} in use)", p.name, p.in_use, p.total_possible))
            .collect();
        if !loaded.is_empty() {
            return format!("⚠️  High load: {}", loaded.join(", "));
        }
        let mut line = "✅ Healthy: every pool can hand out a connection now".to_owned();
        if let Some(reserved) = self.budget_reserved.filter(|r| *r > 0) {
            let _ = write!(line, "; {reserved} connections of the budget are reserved");
        }
        line
    }
}

/// A wait in milliseconds with a sensible number of decimals.
fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Writes `lines` as a tree: `├─` before each but the last, `└─` before the last.
fn tree(f: &mut fmt::Formatter<'_>, lines: &[String]) -> fmt::Result {
    for (i, line) in lines.iter().enumerate() {
        let branch = if i + 1 == lines.len() {
            "└─"
        } else {
            "├─"
        };
        writeln!(f, "   {branch} {line}")?;
    }
    Ok(())
}

fn pool_lines(p: &StatsSnapshot) -> Vec<String> {
    let mut lines = vec![
        format!("In Use: {}/{}", p.in_use, p.total_possible),
        format!("Idle: {}", p.idle),
        format!("Available: {}", p.available),
        format!(
            "Overflow Active: {} (of {})",
            p.overflow_active, p.max_overflow
        ),
    ];
    if p.reserved > 0 {
        lines.push(format!("Reserved: {}", p.reserved));
    }
    if let Some(w) = p.waiters {
        lines.push(format!("Waiters: {w}"));
    }
    lines.push(if p.checkouts == 0 {
        "Wait p50/p95/p99: no checkouts yet".to_owned()
    } else {
        format!(
            "Wait p50/p95/p99: {} / {} / {} ms (max {} ms)",
            ms(p.wait_p50_ms),
            ms(p.wait_p95_ms),
            ms(p.wait_p99_ms),
            ms(p.wait_max_ms)
        )
    });
    lines.push(format!(
        "Checkouts: {}, Timeouts: {}",
        p.checkouts, p.timeouts
    ));
    let mut closed = format!(
        "Connections: {} opened, {} failed, {} closed",
        p.connects,
        p.connect_failures,
        p.closed.total()
    );
    let reasons = p.closed.non_zero();
    if !reasons.is_empty() {
        let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = write!(closed, " ({})", parts.join(", "));
    }
    lines.push(closed);
    lines.push(format!(
        "Validations failed: {} of {} pings; found dead by probe: {}; invalidations: {} \
         ({} reported)",
        p.validations_failed,
        p.pings,
        p.probe_detected_dead,
        p.invalidations,
        p.invalidation_events
    ));
    lines.push(format!(
        "Retries: {} ({} exhausted), ambiguous commits resolved: {}, leaks: {}",
        p.retries, p.retries_exhausted, p.commits_resolved, p.leaks
    ));
    if let Some(d) = &p.server_down {
        lines.push(format!(
            "Server: unreachable for {:.1} s ({} failed attempt(s), {}), next try in {} ms; \
             last error: {}",
            d.since_ms as f64 / 1000.0,
            d.failed_attempts,
            d.class,
            d.next_attempt_in_ms,
            d.last_error
        ));
    }
    if !p.probe_available {
        lines.push(
            "Liveness probe: UNAVAILABLE on this platform (every checkout pings; a hung \
             server can block the ping)"
                .to_owned(),
        );
    }
    lines
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const RULE: &str = "============================================================";
        writeln!(f, "DATABASE CONNECTION STATUS  {}", self.generated_at)?;
        writeln!(f, "{RULE}")?;
        if let Some(total) = self.budget_total {
            writeln!(f, "Connection budget: {total} connections")?;
            let in_use: u64 = self.pools.iter().map(|p| u64::from(p.in_use)).sum();
            let mut lines = Vec::new();
            if let Some(reserved) = self.budget_reserved {
                lines.push(format!("Reserved: {reserved}"));
            }
            lines.push(format!("In use across pools: {in_use}"));
            if let Some(b) = &self.budget {
                lines.push(format!(
                    "Permits: {}/{} held, {} free; reserved floors {}",
                    b.in_use,
                    b.total,
                    b.free,
                    if b.healthy {
                        "available"
                    } else {
                        "NOT available"
                    }
                ));
                for c in &b.classes {
                    lines.push(format!(
                        "{}: {}/{} (reserved {}), {} waiting, {} timeouts",
                        c.name, c.in_use, c.max, c.reserved, c.waiters, c.timeouts
                    ));
                }
            }
            tree(f, &lines)?;
            writeln!(f)?;
        }
        for p in &self.pools {
            writeln!(
                f,
                "Pool {:?}: {} + {} overflow",
                p.name, p.pool_size, p.max_overflow
            )?;
            tree(f, &pool_lines(p))?;
            writeln!(f)?;
        }
        writeln!(f, "{}", self.health_line())?;
        write!(f, "{RULE}")
    }
}

/// Formats a time as RFC 3339 in UTC with whole seconds, e.g. `2025-10-16T11:42:00Z`.
/// Times before 1970 are shown as the epoch.
pub fn format_rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{CloseReason, Gauges, PoolStats};
    use std::time::Duration;

    fn snapshot(name: &str, in_use: u32, idle: u32, waiters: Option<u32>) -> StatsSnapshot {
        let stats = PoolStats::new();
        stats.record_checkout(Duration::from_millis(2));
        stats.record_close(CloseReason::Expired);
        stats.snapshot(Gauges {
            name: name.into(),
            in_use,
            idle,
            pool_size: 50,
            max_overflow: 5,
            reserved: 0,
            waiters,
        })
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_760_614_920, "2025-10-16T11:42:00Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(format_rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(StatusReport::new(vec![]).generated_at.len(), 20);
    }

    #[test]
    fn the_report_shows_each_pool_as_a_tree_and_a_health_line() {
        let mut report =
            StatusReport::new(vec![snapshot("automation", 3, 2, Some(0))]).with_budget(60, 5);
        report.generated_at = "2025-10-16T11:42:00Z".into();
        let text = report.to_string();
        for expected in [
            "DATABASE CONNECTION STATUS  2025-10-16T11:42:00Z",
            "Connection budget: 60 connections",
            "   ├─ Reserved: 5",
            "   └─ In use across pools: 3",
            "Pool \"automation\": 50 + 5 overflow",
            "   ├─ In Use: 3/55",
            "   ├─ Available: 52",
            "   ├─ Overflow Active: 0 (of 5)",
            "   ├─ Waiters: 0",
            "   ├─ Wait p50/p95/p99: ",
            "   ├─ Checkouts: 1, Timeouts: 0",
            "closed (expired 1)",
            "   ├─ Validations failed: 0 of 0 pings",
            "   └─ Retries: 0",
            "✅ Healthy: every pool can hand out a connection now; 5 connections of the budget are reserved",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_saturated_pool_is_high_load_and_a_full_one_is_exhausted() {
        let report = StatusReport::new(vec![snapshot("a", 50, 0, None), snapshot("b", 1, 0, None)]);
        assert!(report
            .to_string()
            .contains("⚠️  High load: \"a\" (50/55 in use)"));
        assert!(report.is_healthy());
        let report = StatusReport::new(vec![snapshot("a", 55, 0, Some(3))]);
        assert!(report
            .to_string()
            .contains("❌ EXHAUSTED: \"a\" (55/55 in use, 3 waiting)"));
        assert!(!report.is_healthy());
        assert!(StatusReport::new(vec![])
            .to_string()
            .contains("No pools to report."));
    }

    #[test]
    fn every_day_from_1970_to_2600_is_the_calendars() {
        // A plain walk through the Gregorian calendar, a day at a time.
        let leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let month_len = |y: u64, m: u64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..240_000 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > month_len(y, m) {
                (m, d) = (m + 1, 1);
                if m > 12 {
                    (y, m) = (y + 1, 1);
                }
            }
        }
        assert!(y > 2600);
    }

    #[test]
    fn waits_are_shown_with_fewer_decimals_as_they_grow() {
        for (v, shown) in [
            (0.0, "0.00"),
            (2.345, "2.35"),
            (9.99, "9.99"),
            (10.0, "10.0"),
            (12.34, "12.3"),
            (99.9, "99.9"),
            (100.0, "100"),
            (1234.5, "1234"),
        ] {
            assert_eq!(ms(v), shown, "{v}");
        }
    }

    #[test]
    fn a_pool_shows_its_reserved_floor_and_its_waits_only_when_it_has_them() {
        let mut reserved = snapshot("a", 1, 1, None);
        reserved.reserved = 3;
        let text = StatusReport::new(vec![reserved]).to_string();
        assert!(text.contains("   ├─ Reserved: 3\n"), "{text}");
        assert!(
            text.contains("   ├─ Wait p50/p95/p99: 2.00 / 2.00 / 2.00 ms (max 2.00 ms)\n"),
            "{text}"
        );
        let fresh = PoolStats::new().snapshot(Gauges {
            name: "b".into(),
            in_use: 0,
            idle: 0,
            pool_size: 5,
            max_overflow: 0,
            reserved: 0,
            waiters: None,
        });
        let text = StatusReport::new(vec![fresh]).to_string();
        assert!(!text.contains("Reserved"), "{text}");
        assert!(
            text.contains("   ├─ Wait p50/p95/p99: no checkouts yet\n"),
            "{text}"
        );
    }

    #[test]
    fn the_health_line_says_when_a_class_cannot_get_its_floor_and_what_is_reserved() {
        let budget = |healthy: bool| BudgetSnapshot {
            total: 10,
            in_use: 4,
            free: 6,
            healthy,
            classes: Vec::new(),
        };
        let pools = || vec![snapshot("a", 1, 1, None)];
        let with_budget = |healthy: bool| {
            StatusReport::new(pools())
                .with_budget_snapshot(budget(healthy))
                .to_string()
        };
        let healthy = "✅ Healthy: every pool can hand out a connection now\n";
        for (text, expected) in [
            (with_budget(false), "❌ Reserved capacity is NOT available"),
            (with_budget(true), healthy),
            // Nothing reserved, nothing said.
            (
                StatusReport::new(pools()).with_budget(60, 0).to_string(),
                healthy,
            ),
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn json_holds_every_field_and_reads_back() {
        let report = StatusReport::new(vec![snapshot("a", 1, 1, None)]).with_budget(60, 5);
        let json = report.to_json();
        for key in [
            "generated_at",
            "budget_total",
            "in_use",
            "wait_p99_ms",
            "is_healthy",
            "expired",
        ] {
            assert!(
                json.contains(&format!("\"{key}\"")),
                "{key} missing in {json}"
            );
        }
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
    }
}
