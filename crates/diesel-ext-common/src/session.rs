//! Session settings applied with `SET` right after connecting (PostgreSQL): what the
//! adapters' `SessionSettings` customizers render, validated here once for both.
//!
//! Values are checked where they are given and the first bad one is kept: rendering then
//! fails with it ([`SettingsError`]), so a customizer with a bad value fails every connect with
//! a message naming the setting, never a panic and never a value PostgreSQL would read
//! differently (a sub-millisecond timeout that would round to 0 and disable it, a name it would
//! cut or mangle).

use std::time::Duration;

/// A session setting that cannot be applied as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session setting {setting} {reason}")]
pub struct SettingsError {
    /// The setting's name (`statement_timeout`, `busy_timeout`, ...).
    pub setting: &'static str,
    /// What is wrong and what to give instead.
    pub reason: String,
}

/// The settings of one session, with the first invalid value given (if any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    statement_timeout: Option<u64>,
    lock_timeout: Option<u64>,
    idle_in_transaction_session_timeout: Option<u64>,
    application_name: Option<String>,
    error: Option<SettingsError>,
}

/// `d` in whole milliseconds as PostgreSQL's `int` timeouts take them: 0 (off) or
/// 1 ms ..= `i32::MAX` ms.
pub fn timeout_millis(setting: &'static str, d: Duration) -> Result<u64, SettingsError> {
    if d.is_zero() {
        return Ok(0);
    }
    if d < Duration::from_millis(1) || !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(SettingsError {
            setting,
            reason: format!(
                "is {d:?}: PostgreSQL counts whole milliseconds (and 0 disables the timeout); \
                 give a whole number of milliseconds"
            ),
        });
    }
    let ms = d.as_millis();
    if ms > i32::MAX as u128 {
        return Err(SettingsError {
            setting,
            reason: format!("is {d:?}, above the largest PostgreSQL accepts (2147483647 ms)"),
        });
    }
    Ok(ms as u64)
}

impl Session {
    fn keep_first(&mut self, result: Result<(), SettingsError>) {
        if let (Err(e), None) = (result, &self.error) {
            self.error = Some(e);
        }
    }

    /// Sets `statement_timeout` (0 disables it).
    pub fn set_statement_timeout(&mut self, d: Duration) {
        let r = timeout_millis("statement_timeout", d).map(|ms| self.statement_timeout = Some(ms));
        self.keep_first(r);
    }

    /// Sets `lock_timeout` (0 disables it).
    pub fn set_lock_timeout(&mut self, d: Duration) {
        let r = timeout_millis("lock_timeout", d).map(|ms| self.lock_timeout = Some(ms));
        self.keep_first(r);
    }

    /// Sets `idle_in_transaction_session_timeout` (0 disables it).
    pub fn set_idle_in_transaction_session_timeout(&mut self, d: Duration) {
        let r = timeout_millis("idle_in_transaction_session_timeout", d)
            .map(|ms| self.idle_in_transaction_session_timeout = Some(ms));
        self.keep_first(r);
    }

    /// Sets `application_name` (printable ASCII, 1 to 63 bytes, as pool-core checks it).
    pub fn set_application_name(&mut self, name: &str) {
        let r = pool_core::config::check_application_name(name)
            .map(|()| self.application_name = Some(name.to_owned()))
            .map_err(|e| SettingsError {
                setting: "application_name",
                reason: match e {
                    pool_core::error::ConfigError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                },
            });
        self.keep_first(r);
    }

    /// The statements to run on a new connection (empty when nothing is set), one round
    /// trip as a batch.
    ///
    /// # Errors
    /// The first invalid value given.
    pub fn sql(&self) -> Result<String, SettingsError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut sql = String::new();
        for (name, value) in [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout,
            ),
        ] {
            if let Some(ms) = value {
                sql.push_str(&format!("SET {name} = {ms}; "));
            }
        }
        if let Some(app) = &self.application_name {
            // Printable ASCII only (checked): doubling quotes is all the quoting it needs.
            sql.push_str(&format!(
                "SET application_name = '{}'; ",
                app.replace('\'', "''")
            ));
        }
        Ok(sql.trim_end().to_owned())
    }
}

/// The setters of a session-settings customizer: a newtype over [`Session`] in each adapter
/// (each implements its own pool's customizer trait), with the same methods and docs.
#[macro_export]
#[doc(hidden)]
macro_rules! session_setters {
    () => {
        /// No setting: add those you want. Each value is checked where it is given; the
        /// first bad one fails [`Self::validate`] and every connect, with a message naming it.
        pub fn new() -> Self {
            Self::default()
        }

        /// `SET statement_timeout` on every new connection: statements running longer are
        /// cancelled by the server. Whole milliseconds, up to `i32::MAX`; zero disables it.
        pub fn statement_timeout(mut self, timeout: ::std::time::Duration) -> Self {
            self.0.set_statement_timeout(timeout);
            self
        }

        /// `SET lock_timeout`: a statement waiting longer for a lock fails. Whole
        /// milliseconds, up to `i32::MAX`; zero disables it.
        pub fn lock_timeout(mut self, timeout: ::std::time::Duration) -> Self {
            self.0.set_lock_timeout(timeout);
            self
        }

        /// `SET idle_in_transaction_session_timeout`: the server ends a session left idle
        /// inside a transaction this long. Whole milliseconds, up to `i32::MAX`; zero
        /// disables it.
        pub fn idle_in_transaction_session_timeout(
            mut self,
            timeout: ::std::time::Duration,
        ) -> Self {
            self.0.set_idle_in_transaction_session_timeout(timeout);
            self
        }

        /// `SET application_name`, shown in `pg_stat_activity` (printable ASCII, at most 63
        /// bytes; anything else is refused rather than cut or mangled by the server).
        pub fn application_name(mut self, name: &str) -> Self {
            self.0.set_application_name(name);
            self
        }

        /// Checks the values given: `Ok(self)` if every one can be applied, else the first
        /// bad one. Optional: a customizer with a bad value fails every connect with the
        /// same error, so call it at startup to fail there instead.
        ///
        /// # Errors
        /// The first invalid value given.
        pub fn validate(self) -> Result<Self, $crate::session::SettingsError> {
            self.0.sql().map(|_| self)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_render_as_one_batch_of_set_statements_in_milliseconds() {
        let mut s = Session::default();
        s.set_statement_timeout(Duration::from_secs(5));
        s.set_lock_timeout(Duration::from_millis(1500));
        s.set_idle_in_transaction_session_timeout(Duration::ZERO);
        s.set_application_name("it's-me");
        assert_eq!(
            s.sql().unwrap(),
            "SET statement_timeout = 5000; SET lock_timeout = 1500; \
             SET idle_in_transaction_session_timeout = 0; SET application_name = 'it''s-me';"
        );
        assert_eq!(Session::default().sql().unwrap(), "");
    }

    #[test]
    fn bad_values_are_refused_by_name_and_the_first_one_is_kept() {
        let mut s = Session::default();
        s.set_statement_timeout(Duration::from_micros(500));
        s.set_application_name("é");
        let e = s.sql().unwrap_err();
        assert_eq!(e.setting, "statement_timeout");
        assert!(e.to_string().contains("whole milliseconds"), "{e}");
        let mut s = Session::default();
        s.set_lock_timeout(Duration::from_secs(3_000_000));
        assert_eq!(s.sql().unwrap_err().setting, "lock_timeout");
        let mut s = Session::default();
        s.set_application_name(&"x".repeat(64));
        let e = s.sql().unwrap_err();
        assert_eq!(e.setting, "application_name");
        assert!(e.to_string().contains("63 bytes"), "{e}");
        let mut s = Session::default();
        s.set_statement_timeout(Duration::from_nanos(1_000_001));
        assert!(s.sql().is_err());
    }

    #[test]
    fn the_smallest_and_the_largest_timeouts_postgresql_takes_are_accepted() {
        let ms = |d| timeout_millis("statement_timeout", d);
        assert_eq!(ms(Duration::from_millis(1)).unwrap(), 1);
        assert_eq!(ms(Duration::ZERO).unwrap(), 0);
        assert_eq!(
            ms(Duration::from_millis(i32::MAX as u64)).unwrap(),
            2_147_483_647
        );
        let e = ms(Duration::from_millis(i32::MAX as u64 + 1)).unwrap_err();
        assert!(e.to_string().contains("2147483647 ms"), "{e}");
        assert!(ms(Duration::from_micros(999)).is_err());
    }
}
