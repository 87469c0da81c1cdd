//! `r2d2::Error` values with our own message.
//!
//! [`ExtPool::get`](crate::ExtPool::get) keeps r2d2's signature (so that every
//! `impl From<r2d2::Error>` of an application keeps compiling), but r2d2's error type can only
//! be made by r2d2, when a checkout of an r2d2 pool times out, quoting that pool's last error.
//! Some of our failures are not r2d2's timeouts: a checkout that fails fast because the
//! server refuses connections for a hopeless reason, or one that timed out in our queue before
//! it reached r2d2 (asking the real pool for its error then could take the connection meant
//! for the next caller in line).
//!
//! So one process-wide r2d2 pool of one fake connection (`()`, no I/O), whose validity check
//! fails with the message asked for, makes them: a zero-timeout checkout of it finds the
//! connection, fails its check (r2d2 records the message as its last error), finds nothing
//! else and returns `Error(Some(message))`. No user code ever runs on its threads; it never
//! touches a real pool or connection.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The fake connection's error: the message to forge.
#[derive(Debug)]
struct Forged(String);

impl std::fmt::Display for Forged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Forged {}

#[derive(Debug)]
struct ForgeManager {
    message: Arc<Mutex<String>>,
}

impl r2d2::ManageConnection for ForgeManager {
    type Connection = ();
    type Error = Forged;

    fn connect(&self) -> Result<(), Forged> {
        Ok(())
    }

    fn is_valid(&self, _conn: &mut ()) -> Result<(), Forged> {
        Err(Forged(self.message.lock().clone()))
    }

    fn has_broken(&self, _conn: &mut ()) -> bool {
        false
    }
}

struct Forge {
    pool: r2d2::Pool<ForgeManager>,
    message: Arc<Mutex<String>>,
    /// One forging at a time (the message slot is shared).
    turn: Mutex<()>,
}

fn forge() -> &'static Forge {
    static FORGE: OnceLock<Forge> = OnceLock::new();
    FORGE.get_or_init(|| {
        let message = Arc::new(Mutex::new(String::new()));
        let pool = r2d2::Pool::builder()
            .max_size(1)
            .min_idle(Some(0))
            .test_on_check_out(true)
            .connection_timeout(Duration::from_secs(1))
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(ForgeManager {
                message: message.clone(),
            });
        Forge {
            pool,
            message,
            turn: Mutex::new(()),
        }
    })
}

/// An `r2d2::Error` whose `Display` is `timed out waiting for connection: {message}` (r2d2's
/// fixed prefix, then ours).
pub(crate) fn r2d2_error(message: &str) -> r2d2::Error {
    let forge = forge();
    let _turn = forge.turn.lock();
    *forge.message.lock() = message.to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // The fake connection is opened again in the background after each forging: wait for
        // it to be idle, so that the zero-timeout checkout below finds it.
        while forge.pool.state().idle_connections == 0 && Instant::now() < deadline {
            if forge.pool.state().connections == 0 {
                // Nothing open or opening yet: a checkout starts the connect.
                let _ = forge.pool.get_timeout(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let error = match forge.pool.get_timeout(Duration::ZERO) {
            Err(error) => error,
            // Cannot happen (the check always fails), and bounded anyway: past the deadline,
            // with the pool's one connection held, a zero-timeout checkout fails at once
            // (r2d2's own error, without our message).
            Ok(held) if Instant::now() >= deadline => {
                let Err(error) = forge.pool.get_timeout(Duration::ZERO) else {
                    continue;
                };
                drop(held);
                return error;
            }
            Ok(_) => continue,
        };
        // The background connect may finish between r2d2 recording our message and taking
        // it (it clears the last error): then the message is missing; forge again.
        if error.to_string().ends_with(message) || Instant::now() >= deadline {
            return error;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forged_errors_carry_the_message_every_time() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let msg = format!("thread {t} error {i}");
                        let started = std::time::Instant::now();
                        let e = super::r2d2_error(&msg);
                        assert_eq!(
                            e.to_string(),
                            format!("timed out waiting for connection: {msg}")
                        );
                        // The bound this proves: a forging waits for the fake connection
                        // only while it is being reopened (microseconds), never until its
                        // 2 s deadline.
                        assert!(
                            started.elapsed() < std::time::Duration::from_secs(1),
                            "forging took {:?}",
                            started.elapsed()
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
