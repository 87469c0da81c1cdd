//! Small OS helpers: who to run the server as, running commands, `/proc` inspection, signals.

use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{PgServer, TestSupportError};

/// Replaces the password sentinel so it never ends up in an error or a log line of ours.
pub(crate) fn redact(text: &str) -> String {
    text.replace(PgServer::PASSWORD, "<redacted>")
}

/// The unprivileged account the server processes run as (`None`: as ourselves).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunAs {
    pub(crate) ids: Option<(u32, u32)>,
}

impl RunAs {
    /// Root runs the server as the `postgres` system user; anyone else runs it as themselves.
    pub(crate) fn get() -> Result<RunAs, TestSupportError> {
        static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
        let found = *RUN_AS.get_or_init(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Some(RunAs { ids: None });
            }
            lookup_user("postgres").map(|ids| RunAs { ids: Some(ids) })
        });
        found.ok_or(TestSupportError::NoUnprivilegedUser)
    }

    /// Gives `path` to the server's user (no-op when not running as root).
    pub(crate) fn chown(&self, path: &Path) -> Result<(), TestSupportError> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| {
                TestSupportError::io(format!("giving {} to uid {uid}", path.display()), e)
            })?;
        }
        Ok(())
    }
}

/// `getpwnam_r`: the uid and primary gid of a user.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid and gets overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and buf's length is passed.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

/// A command for a PostgreSQL binary: runs as the server's user, in `cwd`, with no `PG*`
/// variables of ours leaking in and with untranslated (C locale) messages.
pub(crate) fn pg_command(bin: &Path, run_as: RunAs, cwd: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("LC_MESSAGES", "C")
        .current_dir(cwd)
        .stdin(Stdio::null());
    if let Some((uid, gid)) = run_as.ids {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", cwd)
            .env("USER", "postgres")
            .env("LOGNAME", "postgres");
    }
    cmd
}

/// `program arg arg ...`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(out, " {}", shell_word(arg));
    }
    redact(&out)
}

fn shell_word(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs a command to completion (optionally feeding `stdin`); Ok(combined output) on success.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String, TestSupportError> {
    let command = describe(cmd);
    let binary = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let fail = |status: String, output: String| TestSupportError::Command {
        binary: binary.clone(),
        command: command.clone(),
        status,
        output: redact(&output),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}"), String::new()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes the pipe; its exit status tells the story then.
        let _ = pipe.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("could not be waited for: {e}"), String::new()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(fail(out.status.to_string(), text))
    }
}

/// `/proc/PID/stat` fields after the command name: (state, ppid).
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether the process exists and is not a zombie (a zombie has exited already; it only
/// waits for a parent that may never reap it).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match stat(pid) {
        Some((state, _)) => !matches!(state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

/// Whether the process is stopped by a signal (or does not exist any more).
pub(crate) fn stopped_or_gone(pid: i32) -> bool {
    match stat(pid) {
        Some((state, _)) => matches!(state, 'T' | 't' | 'Z' | 'X' | 'x'),
        None => true,
    }
}

/// The command line of a process, arguments joined by spaces ("" if it is gone).
pub(crate) fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Live children of a process.
pub(crate) fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(stat(pid), Some((s, ppid)) if ppid == parent && s != 'Z'))
        .collect()
}

/// `kill(pid, sig)`.
pub(crate) fn signal(
    pid: i32,
    sig: libc::c_int,
    name: &'static str,
) -> Result<(), TestSupportError> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(TestSupportError::Signal {
            signal: name,
            pid,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Polls until the process is gone; true if it went within `timeout`.
pub(crate) fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !process_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        let text = format!("url postgres://app:{}@h/app", PgServer::PASSWORD);
        assert_eq!(redact(&text), "url postgres://app:<redacted>@h/app");
    }

    #[test]
    fn describes_commands_shell_style() {
        let mut cmd = Command::new("/bin/pg_ctl");
        cmd.args(["start", "-D", "/tmp/a b", "-o", "it's"]);
        assert_eq!(
            describe(&cmd),
            "/bin/pg_ctl start -D '/tmp/a b' -o 'it'\\''s'"
        );
    }

    #[test]
    fn our_own_process_is_alive_and_not_stopped() {
        let me = std::process::id() as i32;
        assert!(process_alive(me));
        assert!(!stopped_or_gone(me));
        assert!(!process_alive(0));
        assert!(!process_alive(i32::MAX));
    }
}
