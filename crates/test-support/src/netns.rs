//! A private network namespace whose loopback can be blackholed.
//!
//! Network namespaces belong to threads on Linux: a thread that calls
//! `unshare(CLONE_NEWNET)` gets a fresh namespace with only a loopback interface, and the
//! threads and processes it starts inherit it. [`NetNs`] keeps one such thread as a command
//! runner and starts workers inside the namespace with [`NetNs::spawn`]: a PostgreSQL server
//! started there listens on the namespace's own `127.0.0.1`, and a client there talks to it.
//! [`NetNs::blackhole`] takes that loopback down — packets are dropped, no RST, no FIN, like a
//! dead NAT or a cut cable — and [`NetNs::restore`] brings it back.
//!
//! Needs `CAP_SYS_ADMIN` (root in a container is enough); [`NetNs::new`] says clearly when
//! the namespace cannot be made.

use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::TestSupportError;

type Job = Box<dyn FnOnce() + Send>;

/// A private network namespace whose loopback can be blackholed.
///
/// Network namespaces belong to threads on Linux: the namespace lives on a runner thread, and
/// [`NetNs::spawn`] starts threads inside it (they, and the processes they start, inherit it).
/// Needs `CAP_SYS_ADMIN`.
pub struct NetNs {
    jobs: Option<mpsc::Sender<Job>>,
    runner: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetNs").finish_non_exhaustive()
    }
}

fn ip_link(state: &str) -> Result<(), TestSupportError> {
    let out = Command::new("ip")
        .args(["link", "set", "lo", state])
        .output()
        .map_err(|e| TestSupportError::io("running `ip link set lo`", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestSupportError::Command {
            binary: "ip".into(),
            command: format!("ip link set lo {state}"),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

impl NetNs {
    /// Creates the namespace (on a new thread) and brings its loopback up.
    pub fn new() -> Result<NetNs, TestSupportError> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let runner = std::thread::Builder::new()
            .name("test-netns".into())
            .spawn(move || {
                // SAFETY: unshare has no memory-safety preconditions; it affects this thread.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                let ready = if rc != 0 {
                    Err(TestSupportError::io(
                        "creating a network namespace (unshare(CLONE_NEWNET); needs CAP_SYS_ADMIN)",
                        std::io::Error::last_os_error(),
                    ))
                } else {
                    ip_link("up")
                };
                let ok = ready.is_ok();
                let _ = ready_tx.send(ready);
                if ok {
                    for job in inbox {
                        job();
                    }
                }
            })
            .map_err(|e| TestSupportError::io("starting the namespace thread", e))?;
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(TestSupportError::io(
                "starting the namespace thread",
                std::io::Error::other("the thread died"),
            ))
        });
        if let Err(e) = ready {
            let _ = runner.join();
            return Err(e);
        }
        Ok(NetNs {
            jobs: Some(jobs),
            runner: Some(runner),
        })
    }

    /// Runs `f` on the namespace's runner thread and returns its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("runner alive while NetNs exists")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("namespace runner thread is alive");
        rx.recv().expect("namespace job finished")
    }

    /// Starts `f` on a new thread inside the namespace (it inherits the namespace; so do the
    /// threads and processes it starts).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.run(move || std::thread::spawn(f))
    }

    /// Takes the loopback down: every packet in the namespace is dropped from now on.
    pub fn blackhole(&self) -> Result<(), TestSupportError> {
        self.run(|| ip_link("down"))
    }

    /// Brings the loopback back up.
    pub fn restore(&self) -> Result<(), TestSupportError> {
        self.run(|| ip_link("up"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Closing the channel ends the runner; the namespace goes when its last user does.
        drop(self.jobs.take());
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
    }
}
