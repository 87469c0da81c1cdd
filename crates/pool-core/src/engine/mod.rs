//! The checkout engine both adapters run: it decides, the adapter performs.
//!
//! | file | holds |
//! |---|---|
//! | `pool_state.rs` | [`PoolState`]: config (validated once), stats, invalidation epoch, listener, budget slot, gate, open count |
//! | `conn_state.rs` | [`ConnState`]: one connection's state, and the checkout and checkin decisions on it |
//! | `gate.rs` | [`Gate`]: checkouts served in arrival order |
//! | `watchdog.rs` | [`Watchdog`]: deadlines a blocking driver cannot enforce |
//! | `leak.rs` | [`LeakTimer`]: a connection held too long, reported once |
//! | `health.rs` | [`ServerHealth`]: whether the server can be reached; hopeless vs transient connect errors, backoff, one probe at a time while down |
//! | `maintenance.rs` | [`Maintenance`]: when the pool's maintenance walks the idle connections, and whether it waits on the budget |
//!
//! A checkout, in any adapter:
//!
//! 1. [`ConnState::begin_checkout`] with the adapter's zero-round-trip probe: retire it
//!    (reclaim, broken, expired, idle too long, found dead), ping it, or reuse it;
//! 2. if asked, the adapter pings within the timeout and reports [`ConnState::finish_ping`];
//! 3. [`ConnState::handed_out`] once the caller has it (stats, event, leak timer).
//!
//! A checkin: [`ConnState::checkin`] with the adapter's verdict on the session (transaction
//! left open, panic) decides keep or close (broken, reclaimed, expired, overflow). Errors seen
//! on the connection go through [`ConnState::observe_error`]. Dropping the [`ConnState`]
//! records the close.

mod conn_state;
mod gate;
pub mod health;
mod leak;
mod maintenance;
mod pool_state;
mod watchdog;

pub use conn_state::{CheckoutStep, CloseWait, ConnState};
pub use gate::Gate;
pub use health::{Attempt, ConnectClass, ServerHealth, ServerState};
pub use leak::LeakTimer;
pub use maintenance::{sweep_interval, Maintenance};
pub use pool_state::{PoolState, CONFIRM_BOUND_MAX, HEDGE_FACTOR, HEDGE_FLOOR};
pub use watchdog::{Armed, Watchdog};

#[cfg(all(test, not(loom)))]
mod tests;
