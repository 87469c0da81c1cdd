//! Tests of socket identification. They run in one process with other tests that open
//! sockets at any moment, so each filters on a port of its own; the one test that relies on
//! there being a single new socket retries.

use super::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn inode<T: AsRawFd>(sock: &T) -> u64 {
    sys::socket_inode(sock.as_raw_fd()).expect("a socket")
}

fn tcp_filter(port: u16) -> PeerFilter {
    PeerFilter::ports(&[port], &[])
}

/// Echoes every byte back on each of the next `n` connections, one thread per connection.
fn echo_server(listener: TcpListener, n: usize) {
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1];
                while let Ok(1) = conn.read(&mut buf) {
                    if conn.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// One round trip: a byte out, its echo back.
fn echo_once(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    stream.write_all(b"?").is_ok() && stream.read_exact(&mut buf).is_ok()
}

/// Listeners on the same port of several loopback addresses (Linux routes all of 127/8 to
/// `lo`), so that the port cannot tell their connections apart.
fn listeners_on_one_port(addrs: &[Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    for _ in 0..50 {
        let first = TcpListener::bind((addrs[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let rest: Result<Vec<_>, _> = addrs[1..]
            .iter()
            .map(|a| TcpListener::bind((*a, port)))
            .collect();
        if let Ok(rest) = rest {
            let mut all = vec![first];
            all.extend(rest);
            return (port, all);
        }
    }
    panic!("no port free on all of {addrs:?}");
}

fn found(claim: SocketClaim) -> ConnSocket {
    match claim {
        SocketClaim::Found(sock) => sock,
        other => panic!("expected Found, got {other:?}"),
    }
}

#[test]
fn identifies_the_new_socket_and_probes_it_alive_then_dead() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || {
        panic!("one candidate: no tiebreak")
    }));
    assert_eq!(sock.inode(), inode(&client));
    let (mut server, _) = listener.accept().unwrap();
    assert_eq!(sock.probe(), Probe::Alive);
    server.write_all(b"E").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(sock.probe(), Probe::Unknown);
    drop(server);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(sock.probe(), Probe::Dead);
    drop(client);
}

#[test]
fn shutdown_wakes_a_blocked_reader() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || false));
    let _server = listener.accept().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1];
        let _ = tx.send(client.read(&mut buf).map_err(|e| e.to_string()));
    });
    std::thread::sleep(Duration::from_millis(50));
    sock.shutdown();
    // A reader shutdown did not wake stays blocked: the test fails at its deadline.
    let read = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the reader was still blocked 5 s after the shutdown");
    assert_eq!(read, Ok(0), "reader sees end-of-file");
}

/// `confirm_closed`, as a pool's close uses it once libpq closed its own descriptor: our
/// end-of-file reaches the peer; the wait ends when the peer closes (after bytes still to
/// read away), and runs out when it never does.
#[test]
fn confirm_closed_waits_for_the_peers_end_of_file_and_no_longer_than_its_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || false));
    let (mut server, _) = listener.accept().unwrap();
    drop(client); // the driver's descriptor; ours keeps the socket open
                  // The peer, like a backend: reads the client's end-of-file, writes its last bytes,
                  // closes 150 ms later.
    let peer = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let eof = server.read(&mut buf).map(|n| n == 0);
        server.write_all(&[7u8; 10_000]).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        drop(server);
        eof
    });
    let started = Instant::now();
    assert!(
        sock.confirm_closed(Duration::from_secs(5)),
        "the peer closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(140),
        "returned after {took:?}, before the peer closed"
    );
    assert!(
        took < Duration::from_secs(4),
        "waited {took:?} for a closed peer"
    );
    assert_eq!(
        peer.join().unwrap().ok(),
        Some(true),
        "the peer saw our end-of-file"
    );

    // A peer that never closes: the wait runs out at its bound.
    let window = begin_connect();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || false));
    let (_silent, _) = listener.accept().unwrap();
    drop(client);
    let started = Instant::now();
    assert!(
        !sock.confirm_closed(Duration::from_millis(200)),
        "nobody closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(3),
        "a 200 ms bound ran out after {took:?}"
    );
    // A socket already shut down (the watchdog's doing) answers at once.
    sock.shutdown();
    assert!(sock.confirm_closed(Duration::from_secs(5)));

    // A peer that resets the connection (a server killed, a proxy's reset) answers at once,
    // even with its bytes unread.
    let window = begin_connect();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || false));
    let (mut server, _) = listener.accept().unwrap();
    drop(client);
    server.write_all(b"goodbye").unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid `linger` for the call's duration, on a socket `server` owns.
    let rc = unsafe {
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(20));
    drop(server); // closing with a zero linger sends a reset
    let started = Instant::now();
    assert!(
        sock.confirm_closed(Duration::from_secs(5)),
        "the peer reset"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a reset peer took {:?}",
        started.elapsed()
    );
}

/// Twenty connects at the same moment to one port (on three addresses), each between its
/// own `begin_connect` and `finish`: every one must claim exactly its own socket. Without
/// the tiebreak every window sees twenty candidates; without the registry two could claim
/// the same one.
#[test]
fn concurrent_connects_each_claim_their_own_socket() {
    const THREADS: usize = 20;
    let addrs = [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
    ];
    let mut tiebreaks = Vec::new();
    for _ in 0..5 {
        let (port, listeners) = listeners_on_one_port(&addrs);
        for (i, listener) in listeners.into_iter().enumerate() {
            echo_server(
                listener,
                (0..THREADS).filter(|t| t % addrs.len() == i).count(),
            );
        }
        let filter = Arc::new(tcp_filter(port));
        let barrier = Arc::new(Barrier::new(THREADS));
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..THREADS {
            let (filter, barrier, tx) = (filter.clone(), barrier.clone(), tx.clone());
            let addr = addrs[t % addrs.len()];
            std::thread::spawn(move || {
                let window = begin_connect();
                barrier.wait();
                let mut stream = TcpStream::connect((addr, port)).unwrap();
                let own = inode(&stream);
                barrier.wait(); // every window now sees all twenty sockets
                let mut rounds = 0;
                let claim = window.finish(&filter, &mut || {
                    rounds += 1;
                    echo_once(&mut stream)
                });
                let _ = tx.send((t, (claim, own, stream, rounds)));
            });
        }
        drop(tx);
        // A thread that panics leaves the others at the barrier: wait with a deadline.
        let mut results = Vec::new();
        while results.len() < THREADS {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(result) => results.push(result),
                Err(e) => panic!(
                    "{} of {THREADS} connects finished; the others did not within 10 s ({e})",
                    results.len()
                ),
            }
        }
        results.sort_by_key(|(t, _)| *t);
        let results: Vec<_> = results.into_iter().map(|(_, r)| r).collect();
        let mut claimed = std::collections::BTreeSet::new();
        for (t, (claim, own, _stream, rounds)) in results.iter().enumerate() {
            match claim {
                SocketClaim::Found(sock) => {
                    assert_eq!(sock.inode(), *own, "thread {t} claimed another's socket");
                    assert!(claimed.insert(sock.inode()), "socket claimed twice");
                }
                other => panic!("thread {t}: {other:?} after {rounds} tiebreak round trips"),
            }
            tiebreaks.push(*rounds);
        }
        assert_eq!(claimed.len(), THREADS);
    }
    tiebreaks.sort_unstable();
    println!(
        "tiebreak round trips per connect over {} connects: min {} median {} max {}",
        tiebreaks.len(),
        tiebreaks[0],
        tiebreaks[tiebreaks.len() / 2],
        tiebreaks[tiebreaks.len() - 1]
    );
}

#[test]
fn ambiguous_socket_is_resolved_once_the_others_are_claimed_or_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    echo_server(listener, 3);
    let filter = tcp_filter(port);
    let (window_a, window_b, window_x) = (begin_connect(), begin_connect(), begin_connect());
    let a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();

    // A tiebreak that reports success without a round trip: nothing advanced, so none of
    // the three can be the connection's.
    let mut calls = 0;
    assert!(matches!(
        window_x.finish(&filter, &mut || {
            calls += 1;
            assert!(
                calls <= TIEBREAK_ROUNDS,
                "the tiebreak asked for more than its {TIEBREAK_ROUNDS} round trips"
            );
            true
        }),
        SocketClaim::Unavailable
    ));

    // Round trips on all three every round: still three after every round. The tiebreak
    // must stop asking after its rounds whatever the answers (checked in the round trip
    // itself, so a tiebreak that never stops fails here instead of hanging).
    let (mut a, mut c) = (a, c);
    let mut calls = 0;
    let SocketClaim::Ambiguous(mut candidates) = window_a.finish(&filter, &mut || {
        calls += 1;
        assert!(
            calls <= TIEBREAK_ROUNDS,
            "the tiebreak asked for more than its {TIEBREAK_ROUNDS} round trips"
        );
        echo_once(&mut a) && echo_once(&mut b) && echo_once(&mut c)
    }) else {
        panic!("three sockets that all answer: ambiguous");
    };
    assert_eq!(calls, TIEBREAK_ROUNDS);
    assert_eq!(candidates.len(), 3);
    assert!(candidates.resolve().is_none());

    // b's round trip tells b apart, and b's claim eliminates it from a's candidates.
    let sock_b = found(window_b.finish(&filter, &mut || echo_once(&mut b)));
    assert_eq!(sock_b.inode(), inode(&b));
    assert!(candidates.resolve().is_none(), "a and c are left");
    assert_eq!(candidates.len(), 2);

    // c closes: a is the last one.
    drop(c);
    let sock_a = candidates.resolve().expect("only a is left");
    assert_eq!(sock_a.inode(), inode(&a));
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("sock-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn unix_socket_is_found_alone_and_eliminated_when_several() {
    let dir = temp_dir("unix");
    // Port 2: no test server listens there, so no other test's socket matches.
    let path = dir.join(".s.PGSQL.2");
    let listener = UnixListener::bind(&path).unwrap();
    let filter = PeerFilter::ports(&[], &[2]);

    let window = begin_connect();
    let client = UnixStream::connect(&path).unwrap();
    let sock = found(window.finish(&filter, &mut || panic!("one candidate: no tiebreak")));
    assert_eq!(sock.inode(), inode(&client));
    let (server, _) = listener.accept().unwrap();
    assert_eq!(sock.probe(), Probe::Alive);
    drop(server);
    assert_eq!(sock.probe(), Probe::Dead);

    // Two at once: no counters to compare, so no tiebreak; elimination when one closes.
    let window = begin_connect();
    let first = UnixStream::connect(&path).unwrap();
    let second = UnixStream::connect(&path).unwrap();
    let SocketClaim::Ambiguous(mut candidates) =
        window.finish(&filter, &mut || panic!("Unix sockets have no counters"))
    else {
        panic!("two Unix candidates: ambiguous");
    };
    assert!(candidates.resolve().is_none());
    drop(first);
    let sock = candidates.resolve().expect("one left");
    assert_eq!(sock.inode(), inode(&second));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dropping_a_conn_socket_releases_its_claim() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let filter = tcp_filter(port);
    let (first, second, third) = (begin_connect(), begin_connect(), begin_connect());
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(first.finish(&filter, &mut || false));
    let clone = sock.clone();
    // Claimed: nobody else may take it. (With no socket left, `second` may take another
    // test's socket by the single-new-socket rule, never this one.)
    if let SocketClaim::Found(other) = second.finish(&filter, &mut || false) {
        assert_ne!(other.inode(), inode(&client), "claimed twice");
    }
    drop(sock);
    assert_eq!(
        clone.probe(),
        Probe::Alive,
        "a clone keeps the duplicate open"
    );
    drop(clone);
    let again = found(third.finish(&filter, &mut || false));
    assert_eq!(again.inode(), inode(&client));
}

#[test]
fn a_filter_rejecting_the_only_new_socket_does_not_cost_the_probe() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let wrong = tcp_filter(if port == 1 { 2 } else { 1 });
    // Other tests open sockets at any moment: a window that saw one of theirs gives
    // Unavailable, never a wrong socket. One clean window out of ten is plenty.
    let mut hits = 0;
    for _ in 0..10 {
        let window = begin_connect();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        match window.finish(&wrong, &mut || panic!("no candidate passed the filter")) {
            SocketClaim::Found(sock) => {
                assert_eq!(sock.inode(), inode(&client));
                hits += 1;
            }
            SocketClaim::Unavailable => {}
            other => panic!("{other:?}"),
        }
        drop(listener.accept().unwrap());
    }
    assert!(hits > 0, "never found the only new socket");

    // Two new sockets that the filter rejects: no guess.
    let window = begin_connect();
    let _a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(matches!(
        window.finish(&wrong, &mut || true),
        SocketClaim::Unavailable
    ));
}

/// Prints what `begin_connect` + `finish` cost with the process's few descriptors and with
/// about a thousand (run with `--nocapture`; nothing is asserted about times).
#[test]
fn identification_cost_with_many_fds() {
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }
    fn measure(port: u16) -> (Duration, Duration) {
        let filter = tcp_filter(port);
        let mut begin = Vec::new();
        let mut finish = Vec::new();
        for _ in 0..50 {
            let t0 = Instant::now();
            let window = begin_connect();
            begin.push(t0.elapsed());
            let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let t1 = Instant::now();
            let claim = window.finish(&filter, &mut || echo_once(&mut client));
            finish.push(t1.elapsed());
            drop(claim);
            drop(client);
        }
        begin.sort_unstable();
        finish.sort_unstable();
        (begin[begin.len() / 2], finish[finish.len() / 2])
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    echo_server(listener.try_clone().unwrap(), 100);
    let few = open_fds();
    let (b, f) = measure(port);
    println!(
        "identification with {few} open fds: begin_connect {b:?}, finish {f:?} (medians of 50)"
    );
    let files: Vec<_> = (few..1000)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let many = open_fds();
    let (b, f) = measure(port);
    println!(
        "identification with {many} open fds: begin_connect {b:?}, finish {f:?} (medians of 50)"
    );
    drop(files);
}

#[test]
fn a_failed_tiebreak_never_claims_another_connections_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    echo_server(listener, 2);
    let filter = tcp_filter(port);
    let (window_a, window_b) = (begin_connect(), begin_connect());
    let mut a = Some(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let ino_b = inode(&b);
    // A's round trip fails because its connection was lost, and libpq closes a lost
    // connection's socket: A's own socket is no longer among its candidates.
    let claim = window_a.finish(&filter, &mut || {
        drop(a.take());
        false
    });
    let taken = match claim {
        SocketClaim::Found(sock) => Some(sock),
        SocketClaim::Ambiguous(mut candidates) => candidates.resolve(),
        SocketClaim::Unavailable => None,
    };
    assert_ne!(
        taken.as_ref().map(ConnSocket::inode),
        Some(ino_b),
        "a connection whose tiebreak failed took another connection's socket"
    );
    // B finds its own socket.
    let sock_b = found(window_b.finish(&filter, &mut || echo_once(&mut b)));
    assert_eq!(sock_b.inode(), ino_b);
}

/// A connection already open to the same server before the window is not a candidate: only
/// sockets new since `begin_connect` are, so a lone new one needs no tiebreak.
#[test]
fn a_socket_open_before_the_window_is_never_a_candidate() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let older = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _older_server = listener.accept().unwrap();
    let window = begin_connect();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || {
        panic!("the older connection was taken for a candidate")
    }));
    assert_eq!(sock.inode(), inode(&client));
    assert_ne!(sock.inode(), inode(&older));
}

/// Only sockets have a socket inode, not a regular file.
#[test]
fn a_regular_file_is_no_socket() {
    let dir = temp_dir("files");
    let file = std::fs::File::create(dir.join("plain")).unwrap();
    assert_eq!(sys::socket_inode(file.as_raw_fd()), None, "a regular file");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(
        sys::socket_inode(listener.as_raw_fd()).is_some(),
        "a socket"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A connected datagram socket aimed at the server's port is not a connection: only
/// stream sockets are candidates.
#[test]
fn a_connected_datagram_socket_is_never_a_candidate() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(("127.0.0.1", port)).unwrap();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || {
        panic!("the datagram socket was taken for a candidate")
    }));
    assert_eq!(sock.inode(), inode(&client));
    drop(udp);
}

/// A connection over IPv6 is identified as one over IPv4 is (skipped where the host has no
/// IPv6 loopback).
#[test]
fn a_connection_over_ipv6_is_identified() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let client = TcpStream::connect(("::1", port)).unwrap();
    let sock = found(window.finish(&tcp_filter(port), &mut || {
        panic!("one candidate: no tiebreak")
    }));
    assert_eq!(sock.inode(), inode(&client));
}

/// The tiebreak keeps only the candidates that both sent and received during its round
/// trip: a connection that only sent (a client writing to a server that does not answer
/// yet) or only received (a server pushing a notification) at that moment is not ours.
#[test]
fn a_candidate_that_only_sent_or_only_received_during_the_round_trip_is_not_ours() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let window = begin_connect();
    let mut talker = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_talker_server, _) = listener.accept().unwrap();
    let hearer = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut hearer_server, _) = listener.accept().unwrap();
    let mut ours = TcpStream::connect(("127.0.0.1", port)).unwrap();
    echo_server(listener, 1);
    let mut rounds = 0;
    let claim = window.finish(&tcp_filter(port), &mut || {
        rounds += 1;
        talker.write_all(b"t").unwrap();
        hearer_server.write_all(b"h").unwrap();
        // Let both land before our own round trip completes.
        std::thread::sleep(Duration::from_millis(20));
        echo_once(&mut ours)
    });
    match claim {
        SocketClaim::Found(sock) => assert_eq!(sock.inode(), inode(&ours)),
        other => panic!("after {rounds} tiebreak round trips: {other:?}"),
    }
    drop(hearer);
}

/// The pause between tiebreak rounds is random, between nothing and two round trips, and
/// never over 20 ms.
#[test]
fn the_pause_between_tiebreak_rounds_is_random_and_bounded() {
    for (rtt, max) in [
        (Duration::from_millis(3), Duration::from_millis(6)),
        (Duration::from_millis(50), Duration::from_millis(20)),
    ] {
        let pauses: Vec<Duration> = (0..500).map(|_| sys::jitter(rtt)).collect();
        assert!(pauses.iter().all(|p| *p <= max), "{rtt:?}: {pauses:?}");
        let distinct: std::collections::BTreeSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 100, "{rtt:?}: {} distinct", distinct.len());
        // Spread over the range, not bunched at one end.
        let low = pauses.iter().filter(|p| **p < max / 4).count();
        let high = pauses.iter().filter(|p| **p > max * 3 / 4).count();
        assert!(low > 50 && high > 50, "{rtt:?}: {low} low, {high} high");
    }
}

/// A candidate whose descriptor no longer holds its socket (closed, and the number reused
/// by another socket) is not claimed, and its claim is given back.
#[test]
fn a_descriptor_reused_by_another_socket_is_not_claimed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let gone = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let reused = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let stale = Candidate {
        fd: reused.as_raw_fd(),
        ino: inode(&gone),
        tcp: true,
    };
    assert!(
        sys::claim(&stale).is_none(),
        "claimed the socket now at that number"
    );
    let claimed = sys::claim(&Candidate {
        fd: gone.as_raw_fd(),
        ino: inode(&gone),
        tcp: true,
    })
    .expect("the stale attempt left the socket's claim behind");
    assert_eq!(claimed.inode(), inode(&gone));
}

/// The counters are read from as much of `tcp_info` as the kernel wrote: none without the
/// bytes received, the bytes acknowledged for the bytes sent on kernels that do not count
/// those.
#[test]
fn counters_are_read_from_as_much_of_tcp_info_as_the_kernel_wrote() {
    use std::mem::{offset_of, size_of};
    let mut info = sys::TcpInfoHead::default();
    info.tcpi_bytes_acked = 10;
    info.tcpi_bytes_received = 20;
    info.tcpi_bytes_sent = 30;
    let received_end = offset_of!(sys::TcpInfoHead, tcpi_bytes_received) + 8;
    let counted = |len| sys::read_counters(&info, len).map(|c| (c.sent, c.received));
    assert_eq!(counted(size_of::<sys::TcpInfoHead>()), Some((30, 20)));
    assert_eq!(counted(size_of::<sys::TcpInfoHead>() + 24), Some((30, 20)));
    let before_sent = offset_of!(sys::TcpInfoHead, tcpi_bytes_sent);
    assert_eq!(counted(before_sent), Some((10, 20)), "before Linux 4.19");
    assert_eq!(counted(received_end), Some((10, 20)));
    assert_eq!(counted(received_end - 1), None, "before Linux 4.1");
    assert_eq!(counted(104), None);
    assert_eq!(counted(0), None);
}

/// A round in which several candidates advanced (another connect of ours ran its round trip
/// at the same moment) is followed by a random pause, before the next round trip, so that two
/// connects in lock-step fall out of it.
#[test]
fn a_round_in_which_several_sockets_advanced_is_followed_by_a_pause() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    echo_server(listener, 2);
    let filter = tcp_filter(port);
    let window = begin_connect();
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut e = window.eliminate(&filter);
    assert!(
        matches!(e.step(), Next::RoundTrip),
        "two candidates: a round trip"
    );
    assert!(echo_once(&mut a) && echo_once(&mut b), "both advance");
    e.round_trip_done(true, Duration::from_millis(1));
    match e.step() {
        Next::Pause(pause) => assert!(pause <= sys::MAX_JITTER, "{pause:?}"),
        other => panic!("{other:?}: no pause after a round in which both sockets advanced"),
    }
    assert!(
        matches!(e.step(), Next::RoundTrip),
        "still two after the pause: another round trip"
    );
}
