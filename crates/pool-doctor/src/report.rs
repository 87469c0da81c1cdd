//! What `check` finds: one line per check, pass / warn / fail, each warning with what to
//! change; printed for people or as JSON.

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Nothing to change.
    Pass,
    /// Works, but something should change (the line says what).
    Warn,
    /// Does not work, or cannot work as configured.
    Fail,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// A stable name, for machines (`tls`, `idle_session_timeout`, `budget`, ...).
    pub id: &'static str,
    /// The outcome.
    pub outcome: Outcome,
    /// What was found.
    pub summary: String,
    /// What to change, for warnings and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The numbers behind it.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Check {
    /// A passed check.
    pub fn pass(id: &'static str, summary: impl Into<String>) -> Check {
        Check {
            id,
            outcome: Outcome::Pass,
            summary: summary.into(),
            fix: None,
            data: serde_json::Value::Null,
        }
    }

    /// A warning with what to change.
    pub fn warn(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id,
            outcome: Outcome::Warn,
            summary: summary.into(),
            fix: Some(fix.into()),
            data: serde_json::Value::Null,
        }
    }

    /// A failure with what to change.
    pub fn fail(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id,
            outcome: Outcome::Fail,
            summary: summary.into(),
            fix: Some(fix.into()),
            data: serde_json::Value::Null,
        }
    }

    /// Attaches the numbers behind the check.
    pub fn with_data(mut self, data: serde_json::Value) -> Check {
        self.data = data;
        self
    }
}

/// The whole report of `pool-doctor check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The database checked, redacted (or what stood for it).
    pub target: String,
    /// `postgres`, `sqlite`, `mysql`, or `unknown` when the configuration could not be read.
    pub backend: String,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// An empty report about `target`.
    pub fn new(target: impl Into<String>, backend: impl Into<String>) -> Report {
        Report {
            target: target.into(),
            backend: backend.into(),
            checks: Vec::new(),
        }
    }

    /// Adds a check.
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// The worst outcome (pass when there are no checks).
    pub fn outcome(&self) -> Outcome {
        self.checks
            .iter()
            .map(|c| c.outcome)
            .max()
            .unwrap_or(Outcome::Pass)
    }

    /// The process exit code: 2 on a failure, 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.outcome() == Outcome::Fail {
            2
        } else {
            0
        }
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    /// The report as pretty JSON: `target`, `backend`, `outcome`, `counts`, `checks`.
    pub fn to_json(&self) -> String {
        let value = serde_json::json!({
            "target": self.target,
            "backend": self.backend,
            "outcome": self.outcome(),
            "exit_code": self.exit_code(),
            "counts": {
                "pass": self.count(Outcome::Pass),
                "warn": self.count(Outcome::Warn),
                "fail": self.count(Outcome::Fail),
            },
            "checks": self.checks,
        });
        serde_json::to_string_pretty(&value)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// The report for a person: one line per check, `fix:` under warnings and failures.
    pub fn to_text(&self) -> String {
        let mut out = format!("pool-doctor check: {} ({})\n", self.target, self.backend);
        for c in &self.checks {
            out.push_str(&format!(
                "{}  {:<22} {}\n",
                c.outcome.label(),
                c.id,
                c.summary
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("      {:<22} fix: {}\n", "", fix));
            }
        }
        out.push_str(&format!(
            "result: {} ({} pass, {} warn, {} fail)\n",
            self.outcome().label(),
            self.count(Outcome::Pass),
            self.count(Outcome::Warn),
            self.count(Outcome::Fail)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_counts_each_outcome() {
        let mut report = Report::new("postgres://app:***@h/app", "postgres");
        report.push(Check::pass("a", "fine"));
        report.push(Check::pass("b", "fine"));
        report.push(Check::warn("c", "not quite", "change it"));
        let text = report.to_text();
        assert!(
            text.ends_with("result: WARN (2 pass, 1 warn, 0 fail)\n"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            json["counts"],
            serde_json::json!({ "pass": 2, "warn": 1, "fail": 0 })
        );
    }
}
