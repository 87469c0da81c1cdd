//! A proxy that slows connection set-up only.
//!
//! `FaultProxy::set_latency` delays every chunk in both directions, queries included, so it
//! cannot make connects slow while queries on open connections stay fast. This proxy waits
//! `delay` after accepting a connection, before it connects upstream and forwards the first
//! byte, then copies bytes both ways untouched: a connect costs `delay` more, a query on an
//! open connection costs one more loopback hop (the same for every contender). It sits in
//! front of a counting `FaultProxy`, so connections and round trips are still counted.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

struct Shared {
    target: SocketAddr,
    delay_us: AtomicU64,
    shutdown: AtomicBool,
    /// Both ends of every live connection, shut down when the proxy is dropped.
    streams: Mutex<Vec<TcpStream>>,
}

/// See the module docs.
pub struct DelayProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Forwards `127.0.0.1:<port>` to `target`, with no delay until [`DelayProxy::set_delay`].
    pub fn start(target: SocketAddr) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            target,
            delay_us: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("delay-proxy-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    if accept_shared.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let shared = accept_shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("delay-proxy-conn".into())
                        .spawn(move || serve(&shared, client));
                }
            })?;
        Ok(DelayProxy {
            port,
            shared,
            accept: Some(accept),
        })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long connections accepted from now on wait before they are forwarded.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::SeqCst);
    }
}

fn serve(shared: &Shared, client: TcpStream) {
    let delay = Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let Ok(upstream) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    {
        let mut streams = shared.streams.lock();
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
            streams.push(a);
            streams.push(b);
        }
    }
    let back = std::thread::Builder::new()
        .name("delay-proxy-s2c".into())
        .spawn(move || copy(u2, c2));
    copy(client, upstream);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

/// Copies `from` to `to` until EOF or an error, then passes the EOF on.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for stream in self.shared.streams.lock().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}
