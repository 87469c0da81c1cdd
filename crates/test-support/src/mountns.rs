//! A machine directory seen with other contents by one thread, in a private mount namespace.
//!
//! Mount namespaces belong to threads on Linux, as network namespaces do ([`NetNs`]): a
//! thread that calls `unshare(CLONE_NEWNS)` gets a copy of the mount table. Its mounts are
//! first made private (so that nothing it mounts propagates back), then an empty `tmpfs` is
//! mounted over a machine directory and the test's files are written there. The thread, and
//! only it, sees them; when it ends, its namespace and the mount are gone. The machine's
//! directory is never written.
//!
//! Used to give a test a distribution CA bundle that trusts a test server's private CA (and
//! nothing else), without touching the machine's trust store. Needs `CAP_SYS_ADMIN`.
//!
//! [`NetNs`]: crate::NetNs

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::TestSupportError;

fn c_path(path: &Path) -> Result<CString, TestSupportError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| {
        TestSupportError::io(
            format!("{} as a C string", path.display()),
            std::io::Error::other(e),
        )
    })
}

/// Runs `f` on a new thread in a private mount namespace where the existing directory `dir`
/// holds only `files` (name, contents): an empty `tmpfs` is mounted over it and the files are
/// written there, seen by that thread alone. Returns what `f` returned (a panic in `f` is
/// resumed here).
///
/// # Errors
/// `dir` is not a directory, or the namespace, the mount or a file cannot be made (no
/// `CAP_SYS_ADMIN`).
pub fn with_dir_replaced<T: Send + 'static>(
    dir: &Path,
    files: &[(&str, &[u8])],
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestSupportError> {
    if !dir.is_dir() {
        return Err(TestSupportError::io(
            format!("replacing {}", dir.display()),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such directory to mount over",
            ),
        ));
    }
    let target = c_path(dir)?;
    let root = c_path(Path::new("/"))?;
    let tmpfs = c_path(Path::new("tmpfs"))?;
    let dir = dir.to_owned();
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(name, contents)| ((*name).to_owned(), contents.to_vec()))
        .collect();
    let thread = std::thread::Builder::new()
        .name("test-support-mountns".into())
        .spawn(move || -> Result<T, TestSupportError> {
            let failed = |what: &str| TestSupportError::io(what, std::io::Error::last_os_error());
            // SAFETY: plain system calls on this thread, with valid NUL-terminated strings.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(failed("unshare(CLONE_NEWNS) (needs CAP_SYS_ADMIN)"));
                }
                // Private first: nothing mounted below may propagate to the machine's table.
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(failed("making the namespace's mounts private"));
                }
                if libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NODEV | libc::MS_NOSUID,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(failed(&format!("mounting a tmpfs over {}", dir.display())));
                }
            }
            for (name, contents) in &files {
                let path = dir.join(name);
                let mut file = std::fs::File::create(&path)
                    .map_err(|e| TestSupportError::io(format!("creating {}", path.display()), e))?;
                file.write_all(contents)
                    .map_err(|e| TestSupportError::io(format!("writing {}", path.display()), e))?;
            }
            Ok(f())
        })
        .map_err(|e| TestSupportError::io("starting the namespace's thread", e))?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
