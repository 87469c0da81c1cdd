//! A server that accepts TCP connections and never says a word.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::TestSupportError;

/// A listener on a free loopback port that accepts every connection and never answers: a
/// hung server, for `connect_timeout` tests. Dropping it closes the listener and every
/// accepted connection.
pub struct SilentServer {
    port: u16,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SilentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SilentServer")
            .field("port", &self.port)
            .finish()
    }
}

impl SilentServer {
    /// Binds `127.0.0.1:<free port>` and starts accepting.
    pub fn start() -> Result<SilentServer, TestSupportError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| TestSupportError::io("binding the silent server on 127.0.0.1", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| TestSupportError::io("reading the silent server's address", e))?
            .port();
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&shutdown);
        let thread = std::thread::Builder::new()
            .name(format!("silent-server-{port}"))
            .spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                loop {
                    let accepted = listener.accept();
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    match accepted {
                        Ok((stream, _)) => held.push(stream),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .map_err(|e| TestSupportError::io("spawning the silent server's thread", e))?;
        Ok(SilentServer {
            port,
            shutdown,
            thread: Some(thread),
        })
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
