//! Linux specifics: CPU pinning of the client and the server, resident memory, and the
//! physical cost of the liveness probe (one zero-timeout `poll()`).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// Pins one task (a thread id or a process id) to `cpus`.
fn set_affinity(tid: i32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` is below CPU_SETSIZE for any machine this runs on (checked by the
        // caller against the online CPU count).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: passes a valid set and its size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Online CPUs.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins every thread of this process to `cpus`; threads started later inherit the mask of
/// the thread that starts them.
pub fn pin_process(cpus: &[usize]) -> io::Result<()> {
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may have exited since the listing: ignore ESRCH.
        match set_affinity(tid, cpus) {
            Ok(()) => pinned += 1,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    if pinned == 0 {
        return Err(io::Error::other(
            "no thread of this process could be pinned",
        ));
    }
    Ok(())
}

/// Pins the postmaster and every process it forked so far (backends, background workers);
/// backends forked later inherit the postmaster's mask.
pub fn pin_server(postmaster: i32, cpus: &[usize]) -> io::Result<usize> {
    set_affinity(postmaster, cpus)?;
    let mut pinned = 1;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if parent_of(pid) == Some(postmaster) && set_affinity(pid, cpus).is_ok() {
            pinned += 1;
        }
    }
    Ok(pinned)
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of this process now, in KiB.
pub fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

/// Peak resident set size of this process so far (`ru_maxrss`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    // SAFETY: an all-zero rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to an rusage we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (rc == 0).then(|| u64::try_from(usage.ru_maxrss).unwrap_or(0))
}

/// A connected loopback TCP pair, the kind of socket the liveness probe looks at.
pub struct LoopbackPair {
    client: TcpStream,
    _server: TcpStream,
}

impl LoopbackPair {
    /// Connects a fresh pair on 127.0.0.1.
    pub fn new() -> io::Result<LoopbackPair> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok(LoopbackPair {
            client,
            _server: server,
        })
    }

    /// Nanoseconds per zero-timeout `poll()` (the events the pool's probe asks for), over
    /// `n` calls.
    pub fn poll_ns(&self, n: u32) -> f64 {
        let fd = self.client.as_raw_fd();
        let start = Instant::now();
        let mut hits = 0u32;
        for _ in 0..n {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
            hits = hits.wrapping_add(u32::from(rc != 0));
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(n.max(1));
        std::hint::black_box(hits);
        ns
    }
}
