//! FaultProxy, SilentServer and log capture against a real private cluster.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use test_support::{
    capture_logs, captured_logs, free_port, pg_or_skip, FaultProxy, PgServer, SilentServer,
};

fn connect(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap_or_else(|e| panic!("connect failed: {e}"))
}

fn one(conn: &mut PgConnection) -> QueryResult<i64> {
    diesel::select(diesel::dsl::sql::<BigInt>("1::bigint")).get_result(conn)
}

fn proxy_for(pg: &PgServer) -> FaultProxy {
    FaultProxy::start(pg.addr()).unwrap()
}

/// The password role through the proxy.
fn via(proxy: &FaultProxy, params: &str) -> String {
    format!(
        "postgres://app:{}@127.0.0.1:{}/app?{params}",
        PgServer::PASSWORD,
        proxy.port()
    )
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn proxy_forwards_tls_and_plain_connections() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    assert_ne!(proxy.port(), pg.port());
    let ca = pg.ca_cert_path().display().to_string();
    let mut tls = connect(&via(
        &proxy,
        &format!("sslmode=verify-full&sslrootcert={ca}&application_name=viaproxy"),
    ));
    let mut plain = connect(&pg.url_via(proxy.port(), "sslmode=disable&application_name=viaproxy"));
    assert_eq!(one(&mut tls).unwrap(), 1);
    assert_eq!(one(&mut plain).unwrap(), 1);
    assert_eq!(proxy.connections(), 2);
    assert_eq!(pg.count_backends("viaproxy").unwrap(), 2);
    drop(tls);
    drop(plain);
    wait_for("connections to close", Duration::from_secs(5), || {
        proxy.connections() == 0
    });
}

#[test]
fn sever_all_resets_live_connections_and_new_ones_work() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    let mut a = connect(&via(&proxy, "sslmode=require&application_name=severed"));
    let mut b = connect(&via(&proxy, "sslmode=disable&application_name=severed"));
    one(&mut a).unwrap();
    one(&mut b).unwrap();
    proxy.sever_all();
    assert_eq!(proxy.connections(), 0);
    let err = one(&mut a).unwrap_err();
    eprintln!("client error after sever (tls): {err}");
    let err = one(&mut b).unwrap_err();
    eprintln!("client error after sever (plain): {err}");
    // The server side was reset too.
    pg.wait_backends_gone("severed", Duration::from_secs(5))
        .unwrap();
    let mut c = connect(&via(&proxy, "sslmode=require"));
    one(&mut c).unwrap();
}

#[test]
fn sever_silenced_resets_only_the_silenced_flows_and_their_backends_end() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    let mut old = connect(&via(
        &proxy,
        "sslmode=disable&application_name=silenced_old",
    ));
    one(&mut old).unwrap();
    assert_eq!(proxy.silence_existing(), 1);
    let mut new = connect(&via(
        &proxy,
        "sslmode=disable&application_name=silenced_new",
    ));
    one(&mut new).unwrap();
    // Silent: the server still holds the old flow's backend, and the proxy names it by the
    // port the server sees it from.
    assert_eq!(pg.count_backends("silenced_old").unwrap(), 1);
    let mut admin = connect(&format!("{}?sslmode=disable", pg.superuser_url()));
    let ports: Vec<i32> = diesel::sql_query(
        "SELECT client_port AS n FROM pg_stat_activity WHERE application_name = 'silenced_old'",
    )
    .load::<PortRow>(&mut admin)
    .unwrap()
    .into_iter()
    .map(|r| r.n)
    .collect();
    let silenced: Vec<i32> = proxy
        .silenced_upstream_ports()
        .into_iter()
        .map(i32::from)
        .collect();
    assert_eq!(silenced, ports, "the silenced flow's server-facing port");
    assert_eq!(proxy.sever_silenced(), 1);
    assert_eq!(proxy.connections(), 1, "only the silenced flow is reset");
    pg.wait_backends_gone("silenced_old", Duration::from_secs(5))
        .expect("the silenced flow's backend ends once the flow is reset");
    assert!(one(&mut old).is_err(), "the silenced client sees the reset");
    assert_eq!(
        one(&mut new).unwrap(),
        1,
        "the flow accepted later still passes"
    );
    assert_eq!(proxy.sever_silenced(), 0);
    assert!(proxy.silenced_upstream_ports().is_empty());
}

#[derive(QueryableByName)]
struct PortRow {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    n: i32,
}

#[test]
fn sever_all_sends_a_reset_not_a_fin() {
    let silent = SilentServer::start().unwrap();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], silent.port()))).unwrap();
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    wait_for("the proxy to register it", Duration::from_secs(2), || {
        proxy.connections() == 1
    });
    proxy.sever_all();
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    let err = std::io::Read::read(&mut raw, &mut buf).expect_err("got data or EOF, not RST");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn stall_blocks_both_directions_until_lifted() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    let mut conn = connect(&via(&proxy, "sslmode=require"));
    one(&mut conn).unwrap();
    proxy.stall(true);
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        tx.send(one(&mut conn).is_ok()).unwrap();
        conn
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(400)).is_err(),
        "a query went through a stalled proxy"
    );
    assert_eq!(proxy.connections(), 1, "stall must keep connections open");
    // A new connection is accepted but cannot complete its startup.
    let (tx2, rx2) = mpsc::channel();
    let url = via(&proxy, "sslmode=disable");
    let connecting = std::thread::spawn(move || {
        tx2.send(PgConnection::establish(&url).is_ok()).unwrap();
    });
    assert!(rx2.recv_timeout(Duration::from_millis(200)).is_err());
    proxy.stall(false);
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    assert!(rx2.recv_timeout(Duration::from_secs(5)).unwrap());
    let mut conn = worker.join().unwrap();
    connecting.join().unwrap();
    one(&mut conn).unwrap();
}

#[test]
fn latency_delays_every_chunk() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    let mut conn = connect(&via(&proxy, "sslmode=disable"));
    proxy.set_latency(Duration::from_millis(150));
    let t = Instant::now();
    one(&mut conn).unwrap();
    let slow = t.elapsed();
    assert!(slow >= Duration::from_millis(280), "{slow:?}");
    proxy.set_latency(Duration::ZERO);
    // Off again: this query is not delayed by a chunk's 150 ms, in each direction (a generous
    // bound — the query itself is sub-millisecond — so that a loaded machine cannot fail it).
    let t = Instant::now();
    one(&mut conn).unwrap();
    assert!(
        t.elapsed() < slow,
        "{:?} vs {slow:?} with the latency on",
        t.elapsed()
    );
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[test]
fn sever_after_forwarding_commit_loses_the_reply_but_not_the_commit() {
    let Some(pg) = pg_or_skip() else { return };
    pg.execute("CREATE TABLE ledger (id int PRIMARY KEY); GRANT ALL ON ledger TO app")
        .unwrap();
    let proxy = proxy_for(&pg);
    // The trigger reads the plaintext protocol: no TLS through it.
    let mut conn = connect(&via(&proxy, "sslmode=disable&application_name=committer"));
    let mut bystander = connect(&via(&proxy, "sslmode=disable"));
    conn.batch_execute("INSERT INTO ledger VALUES (1)").unwrap();

    proxy.sever_after_forwarding(b"COMMIT", Duration::from_millis(200));
    assert!(proxy.trigger_armed());
    let t = Instant::now();
    let result = conn.transaction(|c| {
        c.batch_execute("INSERT INTO ledger VALUES (2)")?;
        QueryResult::Ok(())
    });
    let took = t.elapsed();
    let err = result.expect_err("the COMMIT's reply must not arrive");
    eprintln!("client error after severed COMMIT ({took:?}): {err}");
    assert!(took >= Duration::from_millis(180), "{took:?}");
    assert!(!proxy.trigger_armed(), "the trigger is one-shot");

    // The server did commit.
    let mut su = connect(&format!("postgres://postgres@127.0.0.1:{}/app", pg.port()));
    let rows: Count = diesel::sql_query("SELECT count(*) AS n FROM ledger")
        .get_result(&mut su)
        .unwrap();
    assert_eq!(rows.n, 2);
    // Only that connection was cut.
    one(&mut bystander).unwrap();
    bystander.transaction(one).unwrap();
}

#[test]
fn proxy_to_a_dead_target_resets_clients() {
    let target = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = FaultProxy::start(target).unwrap();
    let url = format!(
        "postgres://app:x@127.0.0.1:{}/app?connect_timeout=5",
        proxy.port()
    );
    let t = Instant::now();
    assert!(PgConnection::establish(&url).is_err());
    assert!(t.elapsed() < Duration::from_secs(4));
    wait_for(
        "the connection to be dropped",
        Duration::from_secs(2),
        || proxy.connections() == 0,
    );
}

#[test]
fn dropping_the_proxy_closes_its_connections() {
    let Some(pg) = pg_or_skip() else { return };
    let proxy = proxy_for(&pg);
    let mut conn = connect(&via(&proxy, "sslmode=disable&application_name=orphan"));
    one(&mut conn).unwrap();
    drop(proxy);
    assert!(one(&mut conn).is_err());
    pg.wait_backends_gone("orphan", Duration::from_secs(5))
        .unwrap();
}

#[test]
fn silent_server_hangs_the_handshake() {
    let silent = SilentServer::start().unwrap();
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", silent.port())).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1];
    let read = std::io::Read::read(&mut raw, &mut buf);
    assert!(read.is_err(), "the silent server answered: {read:?}");

    let url = format!(
        "postgres://app:x@127.0.0.1:{}/app?connect_timeout=2",
        silent.port()
    );
    let t = Instant::now();
    assert!(PgConnection::establish(&url).is_err());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let port = silent.port();
    drop(silent);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn capture_logs_keeps_every_record() {
    capture_logs();
    capture_logs(); // idempotent
    log::trace!(target: "deep::module", "trace {}", 1);
    log::warn!("the sentinel is {}", "not here");
    let lines = captured_logs();
    assert!(
        lines.contains(&"TRACE deep::module: trace 1".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"WARN faults: the sentinel is not here".to_string()),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(PgServer::PASSWORD)));
}

#[test]
fn free_ports_are_not_handed_out_twice() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ports.len());
    for port in ports.iter().take(5) {
        std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PgServer>();
    check::<FaultProxy>();
    check::<SilentServer>();
    check::<test_support::BackendPause>();
    check::<test_support::TestSupportError>();
}
