//! `pool-doctor status URL [--watch]` against a tiny in-test HTTP server serving a real
//! pool's `status().to_json()`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{doctor, run};
use diesel_r2d2_ext::SqlitePool;

/// Serves `GET /status` with the pool's live report, anything else with a 404, on a
/// thread that lives as long as the test process. Returns the port and a request counter.
fn serve(pool: SqlitePool) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Read the headers up to the blank line.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let response = if path == "/status" {
                counter.fetch_add(1, Ordering::SeqCst);
                // A checkout held while the report is made, so it shows one in use.
                let _conn = pool.get().unwrap();
                let body = pool.status().to_json();
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_owned()
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, served)
}

fn pool(dir: &tempfile::TempDir) -> SqlitePool {
    let path = dir.path().join("app.db");
    SqlitePool::builder(path.to_str().unwrap())
        .name("orders")
        .pool_size(2)
        .max_overflow(1)
        .build()
        .unwrap()
}

#[test]
fn status_prints_a_running_pools_report_and_watch_repeats_it() {
    let dir = tempfile::tempdir().unwrap();
    let (port, served) = serve(pool(&dir));
    let url = format!("http://127.0.0.1:{port}/status");

    let out = run(doctor(&["status", &url], &[]));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.starts_with("DATABASE CONNECTION STATUS"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Pool \"orders\": 2 + 1 overflow"),
        "{}",
        out.stdout
    );
    println!("{}", out.stdout);

    let out = run(doctor(&["status", &url, "--json"], &[]));
    assert_eq!(out.code, 0);
    let json = out.json();
    assert_eq!(json["pools"][0]["name"], "orders");
    assert_eq!(json["pools"][0]["in_use"], 1);

    let before = served.load(Ordering::SeqCst);
    let out = run(doctor(
        &["status", &url, "--watch", "100ms", "--count", "3"],
        &[],
    ));
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.matches("DATABASE CONNECTION STATUS").count(), 3);
    assert_eq!(served.load(Ordering::SeqCst) - before, 3);
}

#[test]
fn status_failures_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = serve(pool(&dir));
    let out = run(doctor(
        &["status", &format!("http://127.0.0.1:{port}/nope")],
        &[],
    ));
    assert_eq!(out.code, 2);
    assert!(
        out.stdout.contains("answered \"HTTP/1.0 404 Not Found\""),
        "{}",
        out.stdout
    );

    let closed = test_support::free_port();
    let out = run(doctor(
        &["status", &format!("http://127.0.0.1:{closed}/status")],
        &[],
    ));
    assert_eq!(out.code, 2);
    assert!(out.stdout.contains("cannot connect"), "{}", out.stdout);

    for bad in [
        "https://h/status",
        "127.0.0.1:80",
        "http://h:0/",
        "http://u:S3nt1@h/",
    ] {
        let out = run(doctor(&["status", bad], &[]));
        assert_eq!(out.code, 2, "{bad}");
        assert!(out.stdout.starts_with("error: "), "{bad}: {}", out.stdout);
        assert!(!out.stdout.contains("S3nt1"), "{}", out.stdout);
    }

    // Something that is not a status report.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n<html>hello</html>");
        }
    });
    let out = run(doctor(
        &["status", &format!("http://127.0.0.1:{port}/")],
        &[],
    ));
    assert_eq!(out.code, 2);
    assert!(out.stdout.contains("not a status report"), "{}", out.stdout);
}
