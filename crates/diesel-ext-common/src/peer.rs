//! Which sockets a libpq connection string may open: TCP ports, and Unix sockets by port.
//!
//! [`PeerFilter::from_conninfo`] reads the connection string the way libpq does
//! (`fe-connect.c`: `conninfo_uri_parse_options`, `conninfo_parse`, `conninfo_add_defaults`,
//! `pqConnectOptions2`) and keeps, for every host libpq may try, whether it is reached over
//! TCP or a Unix-domain socket, and on which port. The filter is only a narrowing for
//! [`super::ConnectWindow::finish`]: it may let through more than the connection can use,
//! never less.
//!
//! The rules implemented (PostgreSQL documentation, "libpq — Connection Strings" 34.1.1,
//! "Parameter Key Words" 34.1.2 and "Environment Variables" 34.15):
//!
//! * **Two forms.** A string starting with `postgresql://` or `postgres://` (case-sensitive,
//!   as libpq) is a URI; anything else is the `keyword = value` form (values optionally
//!   single-quoted, `\` escapes). Later occurrences of a keyword win.
//! * **URI authority.** `[user[:password]@]hostspec[,hostspec...]` where the user part ends at
//!   the first `@` before any `/`, and each `hostspec` is `host[:port]` or `[IPv6][:port]`.
//!   The hosts and ports are joined with commas *before* percent-decoding, as libpq does
//!   (`postgres://h1:5433,h2/db` gives `host=h1,h2 port=5433,`, the empty second port meaning
//!   the default); an empty host list or port list sets nothing (so the environment applies).
//!   A percent-encoded path (`%2Fvar%2Frun%2Fpostgresql`) is a Unix socket directory.
//! * **URI query.** `?key=value&...`, both sides percent-decoded; a parameter overrides the
//!   authority (`?host=`, `?port=`, `?hostaddr=`). `+` is not a space (libpq).
//! * **Environment.** Each of `host`, `hostaddr`, `port` not set by the string is taken from
//!   `PGHOST`, `PGHOSTADDR`, `PGPORT` *independently* (libpq's `conninfo_add_defaults`): a URL
//!   naming a host but no port uses `PGPORT`, and `PGHOSTADDR` applies even when the URL names
//!   a host. A value set by the string, even empty, blocks the variable.
//! * **Service files.** With `service=` or `PGSERVICE`, a service file may supply any of the
//!   three still unset; we do not read service files, so the filter then lets every stream
//!   socket through (TCP on any port, any Unix socket).
//! * **Hosts.** The number of hosts is the number of `hostaddr` items if `hostaddr` is
//!   non-empty, else of `host` items, else one. Per host: a non-empty `hostaddr` item means
//!   TCP (whatever `host` says); else a `host` item starting with `/` or `@` is a Unix socket
//!   directory (`@`: Linux abstract namespace); else a non-empty item is a TCP host name;
//!   else (empty or absent) the default, a Unix socket in libpq's compiled-in directory.
//! * **Ports.** `port` is one item for every host or one per host; an empty item or no `port`
//!   at all means 5432 (libpq's compiled-in default). Items are read like libpq's
//!   `strtol`: surrounding whitespace allowed, 1 to 65535.
//! * **Unix sockets** are matched by file name, `.s.PGSQL.<port>` (libpq connects to
//!   `<dir>/.s.PGSQL.<port>`), not by directory: the peer address the kernel reports is the
//!   path the server bound, which differs from the path libpq opened when a directory is a
//!   symlink (`/var/run` → `/run`).
//! * A string libpq would reject (bad percent-encoding, a port that is not a number, host and
//!   port lists that do not match) lets everything through: the connect fails anyway.
//!
//! Not modelled, and harmless because they only ever pick among the hosts above: the order
//! of hosts, `load_balance_hosts`, `target_session_attrs`. Not modelled and therefore a
//! possible miss: a libpq built with a default port other than 5432 (the bundled build and
//! every distribution use 5432); a connection whose socket the filter rejects is still found
//! when it is the only new stream socket (see [`super::ConnectWindow::finish`]).

use std::collections::BTreeSet;
use std::fmt;

/// libpq's compiled-in default port (`DEF_PGPORT`).
const DEFAULT_PORT: u16 = 5432;

/// Which ports one kind of socket may use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ports {
    /// These ports only (empty: this kind of socket is not used at all).
    Only(BTreeSet<u16>),
    /// Any port.
    Any,
}

impl Ports {
    fn none() -> Ports {
        Ports::Only(BTreeSet::new())
    }

    fn contains(&self, port: u16) -> bool {
        match self {
            Ports::Only(set) => set.contains(&port),
            Ports::Any => true,
        }
    }

    fn insert(&mut self, port: u16) {
        if let Ports::Only(set) = self {
            set.insert(port);
        }
    }
}

/// The sockets a connection string may open: TCP ports, and Unix sockets by port (their file
/// is `.s.PGSQL.<port>`). Built by [`PeerFilter::from_conninfo`]; see the module docs for
/// the rules.
///
/// `pub` only because the sealed `Backend` trait names it; the module is private, so it is
/// not reachable from outside the crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFilter {
    tcp: Ports,
    unix: Ports,
}

/// The peer of a connected stream socket, as `getpeername` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer<'a> {
    /// An IPv4 or IPv6 peer on this port.
    Tcp(u16),
    /// A Unix-domain peer with this address (`sun_path`, without trailing NULs; a leading NUL
    /// for the abstract namespace; empty for an unnamed socket).
    Unix(&'a [u8]),
}

impl PeerFilter {
    /// Lets TCP sockets to `tcp` and Unix sockets named for `unix` through, without parsing
    /// a connection string (an adapter that knows the port it connects to).
    pub fn ports(tcp: &[u16], unix: &[u16]) -> PeerFilter {
        PeerFilter {
            tcp: Ports::Only(tcp.iter().copied().collect()),
            unix: Ports::Only(unix.iter().copied().collect()),
        }
    }

    /// Lets every stream socket through.
    pub fn any() -> PeerFilter {
        PeerFilter {
            tcp: Ports::Any,
            unix: Ports::Any,
        }
    }

    /// Derives the filter from a libpq connection string (URI or `keyword=value`), reading
    /// `PGHOST`, `PGHOSTADDR`, `PGPORT` and `PGSERVICE` through `env` (pass
    /// `&|v| std::env::var(v).ok()`), exactly where libpq would.
    pub fn from_conninfo(conninfo: &str, env: &dyn Fn(&str) -> Option<String>) -> PeerFilter {
        let Some(mut opts) = parse(conninfo) else {
            return PeerFilter::any();
        };
        let service = opts.service.is_some() || env("PGSERVICE").is_some_and(|s| !s.is_empty());
        if service && (opts.host.is_none() || opts.hostaddr.is_none() || opts.port.is_none()) {
            return PeerFilter::any();
        }
        opts.host = opts.host.or_else(|| env("PGHOST"));
        opts.hostaddr = opts.hostaddr.or_else(|| env("PGHOSTADDR"));
        opts.port = opts.port.or_else(|| env("PGPORT"));
        targets(&opts).unwrap_or_else(PeerFilter::any)
    }

    /// Whether a socket with this peer may be the connection's.
    pub fn matches(&self, peer: &Peer<'_>) -> bool {
        match *peer {
            Peer::Tcp(port) => self.tcp.contains(port),
            Peer::Unix(path) => match &self.unix {
                Ports::Any => true,
                Ports::Only(ports) => unix_port(path).is_some_and(|p| ports.contains(&p)),
            },
        }
    }
}

impl fmt::Display for PeerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, ports: &Ports) -> fmt::Result {
            match ports {
                Ports::Any => f.write_str("any port"),
                Ports::Only(set) if set.is_empty() => f.write_str("none"),
                Ports::Only(set) => {
                    let items: Vec<String> = set.iter().map(u16::to_string).collect();
                    write!(f, "port {}", items.join(","))
                }
            }
        }
        f.write_str("TCP: ")?;
        list(f, &self.tcp)?;
        f.write_str("; Unix socket: ")?;
        list(f, &self.unix)
    }
}

/// The port in a Unix socket path ending in `/.s.PGSQL.<port>` (or being `.s.PGSQL.<port>`).
fn unix_port(path: &[u8]) -> Option<u16> {
    let name = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    };
    let digits = name.strip_prefix(b".s.PGSQL.")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The options that decide where libpq connects; `None`: not set by the string.
#[derive(Debug, Default)]
struct Options {
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<String>,
    service: Option<String>,
}

impl Options {
    fn store(&mut self, key: &str, value: String) {
        match key {
            "host" => self.host = Some(value),
            "hostaddr" => self.hostaddr = Some(value),
            "port" => self.port = Some(value),
            "service" => self.service = Some(value),
            _ => {}
        }
    }
}

/// Parses a connection string; `None` where libpq would reject it.
fn parse(conninfo: &str) -> Option<Options> {
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = conninfo.strip_prefix(scheme) {
            return parse_uri(rest);
        }
    }
    parse_keywords(conninfo)
}

/// libpq's `conninfo_uri_parse_options`, after the scheme.
fn parse_uri(rest: &str) -> Option<Options> {
    let b = rest.as_bytes();
    let mut opts = Options::default();
    // User credentials end at the first '@' before any '/'.
    let mut p = match b.iter().position(|&c| c == b'@' || c == b'/') {
        Some(i) if b[i] == b'@' => i + 1,
        _ => 0,
    };
    let mut hosts = String::new();
    let mut ports = String::new();
    let mut terminator;
    loop {
        let host;
        if b.get(p) == Some(&b'[') {
            let start = p + 1;
            let close = start + b[start..].iter().position(|&c| c == b']')?;
            if close == start {
                return None;
            }
            host = &rest[start..close];
            p = close + 1;
            if !matches!(b.get(p), None | Some(b':' | b'/' | b'?' | b',')) {
                return None;
            }
        } else {
            let start = p;
            while !matches!(b.get(p), None | Some(b':' | b'/' | b'?' | b',')) {
                p += 1;
            }
            host = &rest[start..p];
        }
        hosts.push_str(host);
        terminator = b.get(p).copied();
        if terminator == Some(b':') {
            p += 1;
            let start = p;
            while !matches!(b.get(p), None | Some(b'/' | b'?' | b',')) {
                p += 1;
            }
            ports.push_str(&rest[start..p]);
            terminator = b.get(p).copied();
        }
        if terminator != Some(b',') {
            break;
        }
        p += 1;
        hosts.push(',');
        ports.push(',');
    }
    if !hosts.is_empty() {
        opts.host = Some(uri_decode(&hosts)?);
    }
    if !ports.is_empty() {
        opts.port = Some(uri_decode(&ports)?);
    }
    if terminator.is_some() && terminator != Some(b'?') {
        // The database name, up to the query.
        p += 1;
        while !matches!(b.get(p), None | Some(b'?')) {
            p += 1;
        }
        terminator = b.get(p).copied();
    }
    if terminator.is_some() {
        for pair in rest[p + 1..].split('&') {
            if pair.is_empty() {
                // libpq stops at a trailing '&'; an empty pair in the middle is an error.
                continue;
            }
            let (key, value) = pair.split_once('=')?;
            if value.contains('=') {
                return None;
            }
            let key = uri_decode(key)?;
            let value = uri_decode(value)?;
            opts.store(&key, value);
        }
    }
    Some(opts)
}

/// libpq's `conninfo_uri_decode`: `%XX` escapes (not `%00`), surrounding spaces ignored, no
/// space inside.
fn uri_decode(s: &str) -> Option<String> {
    let s = s.trim_matches(' ');
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                let byte = u8::from_str_radix(hex, 16).ok().filter(|&c| c != 0)?;
                if hex.starts_with(['+', '-']) {
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            b' ' => return None,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// libpq's `conninfo_parse`: `key = value` pairs separated by whitespace; a value is either
/// single-quoted or runs to the next whitespace, `\` escaping the next character in both.
fn parse_keywords(s: &str) -> Option<Options> {
    let mut opts = Options::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(opts);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !c.is_ascii_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        opts.store(&key, value);
    }
}

/// libpq's `pqConnectOptions2`: one target per host, each TCP or Unix, with its port.
/// `None` where libpq would refuse the options.
fn targets(opts: &Options) -> Option<PeerFilter> {
    fn set(v: &Option<String>) -> Option<&str> {
        v.as_deref().filter(|s| !s.is_empty())
    }
    let hostaddrs: Option<Vec<&str>> = set(&opts.hostaddr).map(|v| v.split(',').collect());
    let hosts: Option<Vec<&str>> = set(&opts.host).map(|v| v.split(',').collect());
    let n = match (&hostaddrs, &hosts) {
        (Some(a), Some(h)) if a.len() != h.len() => return None,
        (Some(a), _) => a.len(),
        (None, Some(h)) => h.len(),
        (None, None) => 1,
    };
    let ports: Vec<u16> = match set(&opts.port) {
        None => vec![DEFAULT_PORT; n],
        Some(list) => {
            let items = list
                .split(',')
                .map(parse_port)
                .collect::<Option<Vec<u16>>>()?;
            match items.len() {
                1 => vec![items[0]; n],
                len if len == n => items,
                _ => return None,
            }
        }
    };
    let mut filter = PeerFilter {
        tcp: Ports::none(),
        unix: Ports::none(),
    };
    for (i, &port) in ports.iter().enumerate() {
        let hostaddr = hostaddrs.as_ref().map_or("", |a| a[i]);
        let host = hosts.as_ref().map_or("", |h| h[i]);
        let unix = hostaddr.is_empty() && (host.is_empty() || host.starts_with(['/', '@']));
        if unix {
            filter.unix.insert(port);
        } else {
            filter.tcp.insert(port);
        }
    }
    Some(filter)
}

/// A port item as libpq reads it (`strtol` with surrounding whitespace; empty: the default).
fn parse_port(item: &str) -> Option<u16> {
    let item = item.trim_matches(|c: char| c.is_ascii_whitespace());
    if item.is_empty() {
        return Some(DEFAULT_PORT);
    }
    match item.parse::<i64>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(ports: &[u16]) -> Ports {
        Ports::Only(ports.iter().copied().collect())
    }

    fn filter(url: &str) -> PeerFilter {
        filter_env(url, &[])
    }

    /// Set once a parse did not end: every later one fails at once.
    static HUNG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Parses on another thread, within 5 s: a parser that loops fails the test instead of
    /// hanging it (and every later parse fails at once, so that the run ends soon).
    fn filter_env(url: &str, vars: &[(&str, &str)]) -> PeerFilter {
        use std::sync::atomic::Ordering;
        assert!(
            !HUNG.load(Ordering::Relaxed),
            "an earlier parse never ended"
        );
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let owned = url.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(PeerFilter::from_conninfo(&owned, &move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| {
                HUNG.store(true, Ordering::Relaxed);
                panic!("parsing {url:?} did not end within 5 s ({e})")
            })
    }

    fn tcp(ports: &[u16]) -> PeerFilter {
        PeerFilter {
            tcp: only(ports),
            unix: only(&[]),
        }
    }

    fn unix(ports: &[u16]) -> PeerFilter {
        PeerFilter {
            tcp: only(&[]),
            unix: only(ports),
        }
    }

    #[test]
    fn peer_filter_authority_host_and_port() {
        assert_eq!(filter("postgres://u:pw@db.example:6543/app"), tcp(&[6543]));
        assert_eq!(filter("postgresql://db.example/app"), tcp(&[5432]));
        assert_eq!(filter("postgres://db.example"), tcp(&[5432]));
        // The user part ends at the first '@'; a password may hold ':' and '/' encoded.
        assert_eq!(
            filter("postgres://u:p%40ss@db:7000/app?sslmode=require"),
            tcp(&[7000])
        );
    }

    #[test]
    fn peer_filter_multi_host_authority() {
        assert_eq!(filter("postgres://h1:5433,h2:5434/db"), tcp(&[5433, 5434]));
        // A host without a port uses the default, like libpq's "5433," port list.
        assert_eq!(filter("postgres://h1:5433,h2/db"), tcp(&[5432, 5433]));
        assert_eq!(filter("postgres://h1,h2,h3/db"), tcp(&[5432]));
        // An empty host in the list is the default Unix socket.
        assert_eq!(
            filter("postgres://h1:6000,:6001/db"),
            PeerFilter {
                tcp: only(&[6000]),
                unix: only(&[6001]),
            }
        );
    }

    #[test]
    fn peer_filter_ipv6_authority() {
        assert_eq!(filter("postgres://[::1]:5433/db"), tcp(&[5433]));
        assert_eq!(filter("postgres://[2001:db8::7]/db"), tcp(&[5432]));
        assert_eq!(
            filter("postgres://[::1]:6000,10.0.0.2:6001/db"),
            tcp(&[6000, 6001])
        );
        // libpq rejects an unterminated address: everything goes through.
        assert_eq!(filter("postgres://[::1:5433/db"), PeerFilter::any());
    }

    #[test]
    fn peer_filter_query_host_overrides_authority() {
        assert_eq!(filter("postgres://ignored:6000/db?host=real"), tcp(&[6000]));
        assert_eq!(filter("postgres:///db?host=a,b&port=7000"), tcp(&[7000]));
        assert_eq!(
            filter("postgres://u@/db?host=/tmp,db.example&port=5433,5434"),
            PeerFilter {
                tcp: only(&[5434]),
                unix: only(&[5433]),
            }
        );
        // Linux abstract namespace.
        assert_eq!(
            filter("postgres:///db?host=@pgsock&port=6000"),
            unix(&[6000])
        );
    }

    #[test]
    fn peer_filter_query_port_lists() {
        assert_eq!(filter("postgres://h1,h2/db?port=6000"), tcp(&[6000]));
        assert_eq!(
            filter("postgres://h1,h2/db?port=6000,6001"),
            tcp(&[6000, 6001])
        );
        assert_eq!(
            filter("postgres://h1:1,h2:2/db?port=6000,6001"),
            tcp(&[6000, 6001])
        );
        // An empty item is the default port; whitespace around a number is allowed.
        assert_eq!(
            filter("postgres://h1,h2/db?port=,%206001%20"),
            tcp(&[5432, 6001])
        );
        // libpq refuses a mismatch or a non-number: the connect fails, the filter is open.
        assert_eq!(filter("postgres://h1,h2,h3/db?port=1,2"), PeerFilter::any());
        assert_eq!(filter("postgres://h/db?port=54x"), PeerFilter::any());
        assert_eq!(filter("postgres://h/db?port=0"), PeerFilter::any());
    }

    #[test]
    fn peer_filter_hostaddr() {
        assert_eq!(
            filter("postgres:///db?hostaddr=10.0.0.5&port=6000"),
            tcp(&[6000])
        );
        // hostaddr wins over a Unix directory in host: libpq connects over TCP.
        assert_eq!(
            filter("postgres:///db?host=/tmp&hostaddr=127.0.0.1"),
            tcp(&[5432])
        );
        // One host per hostaddr; an empty hostaddr item falls back to its host item.
        assert_eq!(
            filter("postgres:///db?host=/run/pg,db&hostaddr=,10.0.0.5&port=6000,6001"),
            PeerFilter {
                tcp: only(&[6001]),
                unix: only(&[6000]),
            }
        );
        assert_eq!(
            filter("postgres:///db?host=a,b&hostaddr=10.0.0.5"),
            PeerFilter::any()
        );
    }

    #[test]
    fn peer_filter_unix_socket_directory() {
        assert_eq!(
            filter("postgres://app@/app?host=/run/postgresql"),
            unix(&[5432])
        );
        assert_eq!(filter("postgres:///app?host=/tmp&port=6543"), unix(&[6543]));
        let f = unix(&[6543]);
        assert!(f.matches(&Peer::Unix(b"/tmp/.s.PGSQL.6543")));
        assert!(f.matches(&Peer::Unix(b"\0pgsock/.s.PGSQL.6543")));
        assert!(!f.matches(&Peer::Unix(b"/tmp/.s.PGSQL.5432")));
        assert!(!f.matches(&Peer::Unix(b"/run/systemd/journal/stdout")));
        assert!(!f.matches(&Peer::Unix(b"")));
        assert!(!f.matches(&Peer::Tcp(6543)));
    }

    #[test]
    fn peer_filter_percent_encoded_directory_in_authority() {
        assert_eq!(
            filter("postgresql://%2Fvar%2Flib%2Fpostgresql/dbname"),
            unix(&[5432])
        );
        assert_eq!(filter("postgresql://%2ftmp:6000/dbname"), unix(&[6000]));
        // Malformed escapes are refused by libpq.
        assert_eq!(filter("postgresql://%2Gtmp/db"), PeerFilter::any());
    }

    #[test]
    fn peer_filter_host_less_is_the_default_unix_socket() {
        assert_eq!(filter("postgres:///app"), unix(&[5432]));
        assert_eq!(filter("postgres://app@/app"), unix(&[5432]));
        assert_eq!(filter("postgres://:6000/app"), unix(&[6000]));
        assert_eq!(filter("postgres://"), unix(&[5432]));
        assert_eq!(filter(""), unix(&[5432]));
    }

    #[test]
    fn peer_filter_keyword_value_form() {
        assert_eq!(filter("host=db port=6000 dbname=app"), tcp(&[6000]));
        assert_eq!(filter("host = '/tmp' port = '60\\01'"), unix(&[6001]));
        assert_eq!(filter("dbname=app"), unix(&[5432]));
        assert_eq!(filter("host='unterminated"), PeerFilter::any());
    }

    #[test]
    fn peer_filter_environment_fills_what_the_url_leaves_unset() {
        let env = [("PGHOST", "db.internal"), ("PGPORT", "6432")];
        assert_eq!(filter_env("postgres:///app", &env), tcp(&[6432]));
        // Each variable applies on its own, as in libpq: a host in the URL, PGPORT's port.
        assert_eq!(
            filter_env("postgres://other/app", &[("PGPORT", "6432")]),
            tcp(&[6432])
        );
        assert_eq!(
            filter_env("postgres:///app", &[("PGHOST", "/var/run/postgresql")]),
            unix(&[5432])
        );
        assert_eq!(
            filter_env("postgres:///app?host=/tmp", &[("PGHOSTADDR", "10.1.1.1")]),
            tcp(&[5432])
        );
        assert_eq!(
            filter_env("host=a,b", &[("PGPORT", "7001,7002")]),
            tcp(&[7001, 7002])
        );
    }

    #[test]
    fn peer_filter_url_wins_over_environment() {
        let env = [("PGHOST", "/tmp"), ("PGPORT", "7000"), ("PGHOSTADDR", "")];
        assert_eq!(filter_env("postgres://db:6000/app", &env), tcp(&[6000]));
        assert_eq!(
            filter_env("postgres:///app?host=db&port=6001", &env),
            tcp(&[6001])
        );
        // Set but empty in the string still blocks the variable (libpq: the value is not NULL).
        assert_eq!(
            filter_env("postgres:///app?host=&port=6002", &env),
            unix(&[6002])
        );
    }

    #[test]
    fn peer_filter_service_files_open_the_filter() {
        assert_eq!(filter("postgres:///app?service=prod"), PeerFilter::any());
        assert_eq!(
            filter_env("postgres://db/app", &[("PGSERVICE", "prod")]),
            PeerFilter::any()
        );
        // Everything set in the URL: the service file cannot change it.
        assert_eq!(
            filter_env(
                "postgres://db:6000/app?hostaddr=10.0.0.1",
                &[("PGSERVICE", "prod")]
            ),
            tcp(&[6000])
        );
    }

    #[test]
    fn peer_filter_a_service_may_still_set_what_the_url_leaves_unset() {
        // A service file may set any of host, hostaddr and port the string leaves unset:
        // hostaddr turns a Unix socket into TCP, a port moves either.
        let service = [("PGSERVICE", "prod")];
        for url in [
            "postgres://db:6000/app",
            "postgres:///app?host=/tmp&port=6000",
            "postgres://db/app?hostaddr=10.0.0.1",
            "postgres:///app?hostaddr=10.0.0.1&port=6000",
        ] {
            assert_eq!(filter_env(url, &service), PeerFilter::any(), "{url}");
        }
    }

    #[test]
    fn peer_filter_a_query_right_after_the_authority_is_read() {
        assert_eq!(filter("postgres://db.example?port=6001"), tcp(&[6001]));
        assert_eq!(filter("postgres://db.example:6000?port=6001"), tcp(&[6001]));
        assert_eq!(filter("postgres://?host=/tmp&port=6002"), unix(&[6002]));
    }

    #[test]
    fn peer_filter_an_empty_bracketed_host_is_refused_as_libpq_does() {
        assert_eq!(filter("postgres://[]:6000/app"), PeerFilter::any());
        assert_eq!(filter("postgres://[::1]:6000/app"), tcp(&[6000]));
    }

    #[test]
    fn a_unix_socket_port_is_digits_only() {
        assert_eq!(unix_port(b"/tmp/.s.PGSQL.6000"), Some(6000));
        assert_eq!(unix_port(b".s.PGSQL.6000"), Some(6000));
        for path in [
            &b"/tmp/.s.PGSQL.+6000"[..],
            b"/tmp/.s.PGSQL.",
            b"/tmp/.s.PGSQL.60x",
            b"/tmp/.s.PGSQL. 6000",
            b"/tmp/.s.PGSQL.99999",
            b"/tmp/s.PGSQL.6000",
        ] {
            assert_eq!(unix_port(path), None, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn peer_filter_display_names_the_ports() {
        assert_eq!(
            filter("postgres://db.example:6543/app").to_string(),
            "TCP: port 6543; Unix socket: none"
        );
        let f = filter("postgres://u@/db?host=/tmp,db.example&port=5433,5434");
        assert_eq!(f.to_string(), "TCP: port 5434; Unix socket: port 5433");
        assert_eq!(
            PeerFilter::any().to_string(),
            "TCP: any port; Unix socket: any port"
        );
    }
}
