//! The webhook service over real HTTP against a private PostgreSQL server, while the test
//! kills every backend of the service's pool and then stops and restarts the server: every
//! acknowledged webhook is stored exactly once, redeliveries are answered `200`, `/health`
//! stays up, `/ready` follows the server.
//!
//! The control (a plain `INSERT` retried on a lost connection, which stores a row twice when
//! the connection is cut while `COMMIT` is in flight) is measured in
//! `crates/diesel-async-ext/tests/pg_retry.rs`; this test is the end-to-end form of the
//! guarantee through the service.
//!
//! Every wait has a deadline. Outside CI the server test skips when no PostgreSQL server can
//! be started; under `CI=true` that is a failure (`test_support::pg_or_skip`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel_async_ext::retry::RetryPolicy;
use diesel_async_ext::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const APP: &str = "webhook_faults";
/// The bound on one HTTP exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// One HTTP response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client: one request per connection (`Connection: close`), the whole
/// exchange bounded by [`REQUEST_TIMEOUT`].
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<Reply, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, method, path, body))
        .await
        .map_err(|_| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn exchange(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<Reply, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A chunked body, decoded.
fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("chunk size line missing")?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("short chunk")?);
        rest = after.get(size + 2..).ok_or("short chunk")?;
    }
}

/// The service on a loopback port; dropping `stop` shuts it down.
struct Service {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_service(pool: PgPool, policy: RetryPolicy) -> Service {
    let prometheus = webhook_service::prometheus().expect("the Prometheus recorder");
    let app = webhook_service::app_with_policy(pool, prometheus.clone(), policy);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(webhook_service::serve(
        listener,
        app,
        Some(prometheus),
        async move {
            let _ = stopped.await;
        },
    ));
    Service { addr, _stop: stop }
}

/// Polls `path` until it answers `status`, at most `timeout`; returns whether it did.
async fn wait_for(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(reply) = http(addr, "GET", path, "").await {
            if reply.status == status {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What one sender saw for one event id.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Every status answered to a delivery of the id (any sender), in order per sender.
    statuses: Vec<u16>,
    /// Statuses answered to deliveries made after this sender had a 2xx for the id.
    after_ack: Vec<u16>,
}

/// Delivers `id` until it is acknowledged (2xx) or `deadline`; a `503` or a transport error
/// is redelivered, as webhook providers do. Returns every status seen (0 for a transport
/// error).
async fn deliver(addr: SocketAddr, id: &str, deadline: Instant) -> Vec<u16> {
    let body = serde_json::json!({ "id": id, "payload": format!("payload of {id}") }).to_string();
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match http(addr, "POST", "/webhooks", &body).await {
            Ok(reply) => {
                seen.push(reply.status);
                if (200..300).contains(&reply.status) {
                    return seen;
                }
                assert_eq!(
                    reply.status, 503,
                    "{id}: only 2xx or 503 expected, got {reply:?}"
                );
                assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
            }
            Err(_) => seen.push(0),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_webhook_is_stored_once_through_killed_backends_and_a_restart() {
    let Some(pg) = test_support::pg_or_skip() else {
        return;
    };
    let started = Instant::now();
    // The recorder before the pool: the pool registers its metrics when it is built.
    webhook_service::prometheus().expect("the Prometheus recorder");
    let pool = PgPool::builder(&pg.url_with("sslmode=disable"))
        .application_name(APP)
        .pool_size(4)
        .max_overflow(0)
        .pool_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("pool");
    webhook_service::migrate(&pool).await.expect("migrate");
    // Patient enough to ride out a short outage, bounded well below the test's deadlines.
    let policy = RetryPolicy::builder()
        .max_attempts(100)
        .max_elapsed(Some(Duration::from_secs(6)))
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(250))
        .build()
        .expect("policy");
    let service = start_service(pool.clone(), policy).await;
    let addr = service.addr;

    // /health, every 50 ms, until the end: never anything but 200.
    let done = Arc::new(AtomicBool::new(false));
    let health = tokio::spawn({
        let done = done.clone();
        async move {
            let mut failures = Vec::new();
            let mut checks = 0_u32;
            while !done.load(Ordering::Relaxed) {
                checks += 1;
                match http(addr, "GET", "/health", "").await {
                    Ok(reply) if reply.status == 200 && reply.body == "ok" => {}
                    other => failures.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (checks, failures)
        }
    });

    // Six senders. Sender k delivers its own ids `own-k-n`, and the ids `shared-n` that every
    // sender also delivers (concurrent duplicates); every third acknowledged id is
    // delivered again (a redelivery after the acknowledgement).
    let acked = Arc::new(AtomicU32::new(0));
    let senders_stop = Arc::new(AtomicBool::new(false));
    let send_deadline = Instant::now() + Duration::from_secs(90);
    let mut senders = Vec::new();
    for k in 0..6_u32 {
        let (acked, senders_stop) = (acked.clone(), senders_stop.clone());
        senders.push(tokio::spawn(async move {
            let mut seen: HashMap<String, Seen> = HashMap::new();
            let mut n = 0_u32;
            while !senders_stop.load(Ordering::Relaxed) && Instant::now() < send_deadline {
                let id = if n.is_multiple_of(2) {
                    format!("own-{k}-{n}")
                } else {
                    format!("shared-{}", n / 2)
                };
                let statuses = deliver(addr, &id, send_deadline).await;
                let ok = statuses.last().is_some_and(|s| (200..300).contains(s));
                let entry = seen.entry(id.clone()).or_default();
                entry.statuses.extend(&statuses);
                if ok {
                    acked.fetch_add(1, Ordering::Relaxed);
                    if n.is_multiple_of(3) {
                        let again = deliver(addr, &id, send_deadline).await;
                        entry.statuses.extend(&again);
                        entry.after_ack.extend(&again);
                    }
                }
                n += 1;
            }
            seen
        }));
    }

    // Traffic first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        acked.load(Ordering::Relaxed) >= 30,
        "30 webhooks stored before the faults"
    );

    // (a) Every backend of the pool killed, twice, under traffic.
    for _ in 0..2 {
        let killed = tokio::task::block_in_place(|| pg.terminate_backends(APP)).expect("kill");
        println!("terminated {killed} backend(s) of {APP}");
        let before = acked.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.load(Ordering::Relaxed) < before + 10 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // (b) The server stopped; /ready must say so while it is down; then started again.
    tokio::task::block_in_place(|| pg.stop()).expect("stop");
    let stopped_at = Instant::now();
    let ready_503 = wait_for(addr, "/ready", 503, Duration::from_secs(10)).await;
    let during_stop = http(addr, "GET", "/ready", "").await;
    // Keep it down a little, so deliveries meet the outage.
    let down_for = Duration::from_millis(1500);
    if let Some(rest) = down_for.checked_sub(stopped_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    tokio::task::block_in_place(|| pg.start_again()).expect("start again");
    println!("server down for {:?}", stopped_at.elapsed());
    assert!(
        ready_503,
        "/ready never answered 503 while the server was stopped"
    );
    if let Ok(reply) = &during_stop {
        assert!(
            !reply.body.contains("secret") && !reply.body.contains("password="),
            "{reply:?}"
        );
    }

    // Traffic after the restart, then the senders finish the id they are on.
    let before = acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < before + 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    senders_stop.store(true, Ordering::Relaxed);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for sender in senders {
        let mine = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .expect("a sender finished within its deadline")
            .expect("a sender did not panic");
        for (id, s) in mine {
            let entry = seen.entry(id).or_default();
            entry.statuses.extend(s.statuses);
            entry.after_ack.extend(s.after_ack);
        }
    }

    assert!(
        wait_for(addr, "/ready", 200, Duration::from_secs(20)).await,
        "/ready is 200 again after the restart"
    );
    done.store(true, Ordering::Relaxed);
    let (health_checks, health_failures) = tokio::time::timeout(Duration::from_secs(30), health)
        .await
        .expect("the /health watcher stopped")
        .expect("the /health watcher did not panic");
    assert!(
        health_failures.is_empty(),
        "/health failed {} of {health_checks} times: {health_failures:?}",
        health_failures.len()
    );

    // The rows, per event id.
    let mut conn = pool.get().await.expect("a connection after the restart");
    // Fully qualified: diesel-async's `load` would shadow the atomics' in this file.
    let rows: Vec<Stored> = diesel_async::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT event_id, count(*)::bigint AS n FROM webhook_events GROUP BY event_id",
        ),
        &mut conn,
    )
    .await
    .expect("count rows");
    drop(conn);
    let stored: HashMap<String, i64> = rows.into_iter().map(|r| (r.event_id, r.n)).collect();
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "events stored more than once: {twice:?}");
    let mut acknowledged = 0;
    let mut redeliveries = 0;
    let mut answered_503 = 0;
    for (id, s) in &seen {
        answered_503 += s.statuses.iter().filter(|st| **st == 503).count();
        if s.statuses.iter().any(|st| (200..300).contains(st)) {
            acknowledged += 1;
            assert_eq!(stored.get(id), Some(&1), "{id} acknowledged: {s:?}");
        }
        // Answered 201 once at most, shared ids too: a delivery whose COMMIT was cut off while
        // a concurrent delivery of the same id committed instead is told `AlreadyCommitted`
        // (the key's row carries the other transaction's id), never `Committed`.
        let created = s.statuses.iter().filter(|st| **st == 201).count();
        assert!(created <= 1, "{id} answered 201 more than once: {s:?}");
        for st in &s.after_ack {
            if (200..300).contains(st) {
                redeliveries += 1;
                assert_eq!(*st, 200, "{id}: a redelivery is answered 200: {s:?}");
            }
        }
    }
    let shared_duplicates = seen
        .iter()
        .filter(|(id, s)| id.starts_with("shared-") && s.statuses.contains(&200))
        .count();
    println!(
        "{acknowledged} events acknowledged, {} stored, {redeliveries} redeliveries answered 200, \
         {shared_duplicates} shared ids answered 200 to a duplicate, {answered_503} answers 503, \
         /health checked {health_checks} times, in {:?}",
        stored.len(),
        started.elapsed()
    );
    assert!(acknowledged >= 60, "{acknowledged} events acknowledged");
    assert!(redeliveries > 0, "some redeliveries were made");

    // A stored event reads back through the DbConn extractor; an unknown one is 404.
    let (some_id, _) = stored.iter().next().expect("events stored");
    let event = http(addr, "GET", &format!("/webhooks/{some_id}"), "")
        .await
        .expect("lookup");
    assert_eq!(event.status, 200, "{event:?}");
    assert!(
        event.body.contains(&format!("payload of {some_id}")),
        "{event:?}"
    );
    let missing = http(addr, "GET", "/webhooks/never-sent", "")
        .await
        .expect("lookup");
    assert_eq!(missing.status, 404, "{missing:?}");

    // /pool/status is JSON; /metrics shows the pool's metrics.
    let status = http(addr, "GET", "/pool/status", "").await.expect("status");
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.header("content-type"), Some("application/json"));
    let parsed: serde_json::Value = serde_json::from_str(&status.body).expect("status is JSON");
    assert!(parsed.is_object(), "{parsed}");
    let metrics = http(addr, "GET", "/metrics", "").await.expect("metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    for name in [
        "db_client_connection_count",
        "resilient_diesel_pool_invalidations",
    ] {
        assert!(
            metrics.body.contains(name),
            "{name} missing in /metrics:\n{}",
            metrics.body
        );
    }
}

/// No server needed: bad input is a 400 (never a panic), `/health` answers without the
/// database, and `/ready` and a checkout-free route say 503 without showing the password.
#[tokio::test]
async fn bad_input_is_400_and_an_unreachable_database_is_503_without_secrets() {
    // Port 1 on loopback: nothing listens, connects are refused at once.
    let pool = PgPool::builder("postgres://app:hunter2secret@127.0.0.1:1/app?sslmode=disable")
        .application_name("webhook_no_server")
        .pool_size(1)
        .pool_timeout(Duration::from_millis(500))
        .connect_timeout(Some(Duration::from_millis(500)))
        .build_lazy()
        .await
        .expect("a lazy pool");
    let policy = RetryPolicy::builder()
        .max_attempts(2)
        .max_elapsed(Some(Duration::from_secs(2)))
        .build()
        .expect("policy");
    let service = start_service(pool, policy).await;
    let addr = service.addr;

    let health = http(addr, "GET", "/health", "").await.expect("health");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    for body in [
        "",
        "{",
        "not json",
        "{\"id\": 1, \"payload\": \"x\"}",
        "{\"payload\": \"x\"}",
        "{\"id\": \"\", \"payload\": \"x\"}",
        &format!("{{\"id\": \"{}\", \"payload\": \"x\"}}", "x".repeat(10_000)),
    ] {
        let reply = http(addr, "POST", "/webhooks", body).await.expect("answer");
        assert_eq!(reply.status, 400, "{body:?}: {reply:?}");
        serde_json::from_str::<serde_json::Value>(&reply.body).expect("a JSON error");
    }
    let valid = "{\"id\": \"evt_1\", \"payload\": \"x\"}";
    let reply = http(addr, "POST", "/webhooks", valid)
        .await
        .expect("answer");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // DbConn's rejection: 503, Retry-After, the cause named, the password not shown.
    let lookup = http(addr, "GET", "/webhooks/evt_1", "")
        .await
        .expect("lookup");
    assert_eq!(lookup.status, 503, "{lookup:?}");
    assert_eq!(lookup.header("retry-after"), Some("1"));
    let rejection: serde_json::Value = serde_json::from_str(&lookup.body).expect("JSON");
    assert_eq!(rejection["error"], "database unavailable", "{rejection}");
    // Nothing listens on port 1: connects are refused, and the cause says so.
    assert_eq!(rejection["cause"], "refused", "{rejection}");
    let ready = http(addr, "GET", "/ready", "").await.expect("ready");
    assert_eq!(ready.status, 503, "{ready:?}");
    let parsed: serde_json::Value = serde_json::from_str(&ready.body).expect("health JSON");
    assert_eq!(parsed["state"], "unreachable", "{parsed}");
    for reply in [&reply, &ready, &lookup] {
        assert!(!reply.body.contains("hunter2secret"), "{reply:?}");
    }
    let status = http(addr, "GET", "/pool/status", "").await.expect("status");
    assert_eq!(status.status, 200);
    serde_json::from_str::<serde_json::Value>(&status.body).expect("status JSON");
    assert!(!status.body.contains("hunter2secret"));
}
