//! Reads back the TCP options in effect on this process's own database sockets.
//!
//! libpq keeps its socket private, but this process is the doctor: the only TCP streams it
//! has open are the ones its one-connection pool opened. They are found in `/proc/self/fd`
//! and asked with `getsockopt` what the kernel really applies (Linux only).

use serde::Serialize;

/// The options of one connected TCP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SocketOptions {
    /// Our side's port.
    pub local_port: u16,
    /// The peer's port.
    pub peer_port: u16,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, seconds.
    pub keepalive_idle_s: i64,
    /// `TCP_KEEPINTVL`, seconds.
    pub keepalive_interval_s: i64,
    /// `TCP_KEEPCNT`.
    pub keepalive_count: i64,
    /// `TCP_USER_TIMEOUT`, milliseconds (0: the system's default).
    pub user_timeout_ms: i64,
}

/// Every connected TCP socket of this process whose peer port is `peer_port` (any peer when
/// `None`). Empty where this cannot be read (not Linux, no `/proc`).
pub fn connected_tcp(peer_port: Option<u16>) -> Vec<SocketOptions> {
    #[cfg(target_os = "linux")]
    {
        linux::connected_tcp(peer_port)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = peer_port;
        Vec::new()
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::SocketOptions;

    fn opt(fd: i32, level: i32, name: i32) -> Option<i64> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of a c_int and its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(i64::from(value))
    }

    fn port(addr: &libc::sockaddr_storage) -> Option<u16> {
        match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let a = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                Some(u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let a = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(u16::from_be(a.sin6_port))
            }
            _ => None,
        }
    }

    fn name(fd: i32, peer: bool) -> Option<u16> {
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let ptr = (&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
        // SAFETY: `addr` and `len` are valid for writes of a sockaddr_storage and its size.
        let rc = unsafe {
            if peer {
                libc::getpeername(fd, ptr, &mut len)
            } else {
                libc::getsockname(fd, ptr, &mut len)
            }
        };
        if rc == 0 {
            port(&addr)
        } else {
            None
        }
    }

    pub(super) fn connected_tcp(peer_port: Option<u16>) -> Vec<SocketOptions> {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            if !is_socket
                || opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) != Some(i64::from(libc::SOCK_STREAM))
            {
                continue;
            }
            let (Some(peer), Some(local)) = (name(fd, true), name(fd, false)) else {
                continue; // not TCP, or not connected
            };
            if peer_port.is_some_and(|p| p != peer) {
                continue;
            }
            out.push(SocketOptions {
                local_port: local,
                peer_port: peer,
                keepalive: opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE).unwrap_or(0) != 0,
                keepalive_idle_s: opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).unwrap_or(-1),
                keepalive_interval_s: opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL).unwrap_or(-1),
                keepalive_count: opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT).unwrap_or(-1),
                user_timeout_ms: opt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT).unwrap_or(-1),
            });
        }
        out
    }
}
