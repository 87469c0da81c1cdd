//! `pool-doctor status URL`: fetches a running application's status report (the JSON of
//! `pool.status().to_json()`, served by the application at some HTTP endpoint) with a plain
//! HTTP/1.0 GET, and prints it as the library prints a report.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use pool_core::status::StatusReport;

use crate::args::StatusArgs;

/// The longest one fetch may take (connect, send, read).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a response may hold.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// `http://host[:port][/path]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (80 when not given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

fn shown(url: &str) -> String {
    pool_core::redact::redact(url)
}

/// Parses a status endpoint's URL.
///
/// # Errors
/// A sentence saying what is wrong with it.
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(
                "https is not supported: fetch the status endpoint over plain http (e.g. from \
                 inside the host or cluster)"
                    .to_owned(),
            )
        }
        _ => {
            return Err(format!(
                "{:?} is not an http:// URL; give e.g. http://127.0.0.1:8080/status",
                shown(url)
            ))
        }
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if authority.contains('@') {
        return Err("credentials in the status URL are not supported".to_owned());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{:?} has no host", shown(url)));
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            format!(
                "the port in {:?} is not a number from 1 to 65535",
                shown(url)
            )
        })?,
    };
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("the path has spaces or control characters; percent-encode them".to_owned());
    }
    Ok(HttpUrl {
        host: host.to_owned(),
        port,
        path,
    })
}

/// One GET; the body of a `200` response.
///
/// # Errors
/// What failed: resolving, connecting, reading, a status other than 200.
pub fn fetch(url: &HttpUrl) -> Result<String, String> {
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .collect();
    let mut last = format!("{} resolves to no address", url.host);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, FETCH_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let io = |e: std::io::Error| format!("reading the status from {}:{}: {e}", url.host, url.port);
    stream.set_read_timeout(Some(FETCH_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(FETCH_TIMEOUT)).map_err(io)?;
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nAccept: application/json\r\nUser-Agent: pool-doctor\r\nConnection: close\r\n\r\n",
        url.path, url.port
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .ok_or("the answer is not an HTTP response")?;
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!(
            "the endpoint answered {:?}, not 200",
            status_line.trim()
        ));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    })
}

/// Decodes a chunked body (a server may send one even to HTTP/1.0).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(after.get(..size).unwrap_or_default());
        rest = after
            .get(size..)
            .unwrap_or_default()
            .trim_start_matches("\r\n");
    }
    out
}

/// What one fetch prints: the report as the library prints it (or the JSON with `json`).
///
/// # Errors
/// The fetch's error, or a body that is not a status report.
pub fn render(body: &str, json: bool) -> Result<String, String> {
    let report: StatusReport = serde_json::from_str(body).map_err(|e| {
        let start: String = body.chars().take(200).collect();
        format!(
            "the answer is not a status report ({e}): {:?}",
            pool_core::redact::redact(&start)
        )
    })?;
    Ok(if json {
        report.to_json()
    } else {
        report.to_string()
    })
}

/// Runs `status`; returns the exit code (2 when the last fetch failed).
pub fn run(args: &StatusArgs, out: &mut dyn Write) -> i32 {
    let url = match parse_url(&args.url) {
        Ok(url) => url,
        Err(e) => {
            let _ = writeln!(out, "error: {e}");
            return 2;
        }
    };
    let mut n = 0u32;
    loop {
        n += 1;
        let code = match fetch(&url).and_then(|body| render(&body, args.json)) {
            Ok(text) => {
                let _ = writeln!(out, "{}", text.trim_end());
                0
            }
            Err(e) => {
                let _ = writeln!(out, "error: {e}");
                2
            }
        };
        let _ = out.flush();
        let Some(every) = args.watch else { return code };
        if args.count.is_some_and(|c| n >= c) {
            return code;
        }
        std::thread::sleep(every);
        let _ = writeln!(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_and_bad_ones_say_why() {
        let u = parse_url("http://127.0.0.1:8080/status?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/status?x=1")
        );
        let u = parse_url("http://[::1]:9/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(parse_url("http://h").unwrap().path, "/");
        assert!(parse_url("https://h/")
            .unwrap_err()
            .contains("https is not supported"));
        let other = parse_url("ftp://u:secret@h/").unwrap_err();
        assert!(other.contains("is not an http:// URL"), "{other}");
        assert!(
            other.contains("ftp://u:") && !other.contains("secret"),
            "the URL is shown, its password not: {other}"
        );
        assert!(parse_url("http://h/a b").unwrap_err().contains("spaces"));
        assert!(parse_url("http://h/a\tb").unwrap_err().contains("control"));
        assert!(parse_url("h:80").unwrap_err().contains("http://"));
        assert!(parse_url("http://h:99999/").unwrap_err().contains("port"));
        assert!(parse_url("http://:80/").unwrap_err().contains("no host"));
        assert!(parse_url("http://u:pw@h/").is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
        assert_eq!(dechunk("4\r\nWiki"), "Wiki", "a last chunk that just fits");
    }

    /// Serves one HTTP response (`head` then `body`) to the first client, on a free port.
    fn serve_once(head: &'static str, body: Vec<u8>) -> HttpUrl {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        });
        HttpUrl {
            host: "127.0.0.1".to_owned(),
            port,
            path: "/status".to_owned(),
        }
    }

    #[test]
    fn a_large_body_is_read_whole_and_only_a_chunked_one_is_dechunked() {
        // 2 MiB: well within the limit of 16 MiB.
        let big = vec![b'x'; 2 << 20];
        let url = serve_once(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n",
            big,
        );
        assert_eq!(fetch(&url).unwrap().len(), 2 << 20);
        let url = serve_once(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            b"4\r\nWiki\r\n0\r\n\r\n".to_vec(),
        );
        assert_eq!(
            fetch(&url).unwrap(),
            "4\r\nWiki\r\n0\r\n\r\n",
            "not chunked: as sent"
        );
        let url = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"4\r\nWiki\r\n0\r\n\r\n".to_vec(),
        );
        assert_eq!(fetch(&url).unwrap(), "Wiki");
        let url = serve_once("HTTP/1.0 503 Service Unavailable\r\n\r\n", Vec::new());
        assert!(fetch(&url).unwrap_err().contains("503"));
    }
}
