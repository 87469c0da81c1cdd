//! When a pool's maintenance (one thread or task per pool) walks the idle connections, and
//! whether it waits on the budget for borrowed headroom to give back.
//!
//! The adapter's loop, sync or async: wait up to [`Maintenance::tick`] for the budget's
//! pressure (if the class [`borrows`](Maintenance::borrows)) and close that many idle
//! borrowed connections; walk the idle connections when [`Maintenance::sweep_due`] (then
//! [`Maintenance::swept`]); open what is missing of the class's floor
//! ([`PoolState::below_floor`]).

use std::time::{Duration, Instant};

use super::PoolState;
use crate::config::PoolConfig;

/// One pool's maintenance schedule.
#[derive(Debug, Clone)]
pub struct Maintenance {
    sweep_every: Option<Duration>,
    next_sweep: Option<Instant>,
    borrows: bool,
}

impl Maintenance {
    /// The schedule of the pool `state`, its first walk one [`sweep_interval`] from now.
    pub fn new(state: &PoolState) -> Maintenance {
        let sweep_every = sweep_interval(state.config());
        Maintenance {
            sweep_every,
            next_sweep: sweep_every.map(|every| Instant::now() + every),
            borrows: state.budget().is_some_and(|(budget, class)| {
                budget.limits(class).max > budget.limits(class).reserved
            }),
        }
    }

    /// Whether the pool's budget class may hold more than its floor: then its maintenance
    /// waits on the budget's pressure, to give borrowed headroom back.
    pub fn borrows(&self) -> bool {
        self.borrows
    }

    /// How long to wait before looking again: until the next walk (a second with none
    /// scheduled), at most `max`.
    pub fn tick(&self, max: Duration) -> Duration {
        self.next_sweep
            .map_or(Duration::from_secs(1), |at| {
                at.saturating_duration_since(Instant::now())
            })
            .min(max)
    }

    /// Whether the idle connections are due a walk.
    pub fn sweep_due(&self) -> bool {
        self.next_sweep.is_some_and(|at| Instant::now() >= at)
    }

    /// A walk just ended: the next one is one interval from now.
    pub fn swept(&mut self) {
        self.next_sweep = self.sweep_every.map(|every| Instant::now() + every);
    }
}

/// How often the maintenance walks the idle connections: often enough for the keepalive
/// interval, the idle timeout and lifetimes, never more than every 30 s (a walk costs
/// microseconds per idle connection); `None` when nothing needs walks.
pub fn sweep_interval(cfg: &PoolConfig) -> Option<Duration> {
    let l = &cfg.lifecycle;
    [
        l.keepalive_ping.map(|d| d / 2),
        l.idle_timeout.map(|d| d / 4),
        l.max_lifetime.map(|d| d / 8),
    ]
    .into_iter()
    .flatten()
    .min()
    .map(|d| d.clamp(Duration::from_millis(20), Duration::from_secs(30)))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::PoolConfigBuilder;

    #[test]
    fn the_sweep_runs_as_often_as_the_shortest_deadline_needs() {
        let cfg = |b: PoolConfigBuilder| b.build().unwrap();
        let url = "postgres://app@db/app";
        assert_eq!(
            sweep_interval(&cfg(
                PoolConfig::builder(url).keepalive_ping(Some(Duration::from_secs(60)))
            )),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            sweep_interval(&cfg(
                PoolConfig::builder(url).keepalive_ping(Some(Duration::from_millis(200)))
            )),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            sweep_interval(&cfg(PoolConfig::builder(url)
                .max_lifetime(None)
                .idle_timeout(None))),
            None
        );
    }
}
