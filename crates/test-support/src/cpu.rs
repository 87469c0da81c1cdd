//! CPU time of threads, read from Linux's `/proc`: what a test needs to tell a thread that
//! waits from one that spins, whatever else the machine is doing.
use std::time::Duration;

/// User plus system time of the thread whose `/proc` stat file is `stat` (clock ticks of
/// 10 ms).
fn cpu_of(stat: &str) -> Option<Duration> {
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time used so far by the calling thread.
pub fn this_thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    cpu_of(&stat).expect("a /proc stat line")
}

/// This process's threads whose name starts with `prefix` now (Linux keeps a thread's first
/// 15 bytes: the pools' maintenance threads, named `resilient-diesel-<pool>`, are all
/// `resilient-dies…`), by thread id.
pub fn threads_named(prefix: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let Ok(task) = task else { continue };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let (true, Ok(id)) = (
            comm.starts_with(prefix),
            task.file_name().to_string_lossy().parse(),
        ) {
            ids.push(id);
        }
    }
    ids
}

/// CPU time used so far by the threads `ids` of this process (a thread that ended counts
/// nothing).
pub fn cpu_of_threads(ids: &[u32]) -> Duration {
    ids.iter()
        .filter_map(|id| std::fs::read_to_string(format!("/proc/self/task/{id}/stat")).ok())
        .filter_map(|s| cpu_of(&s))
        .sum()
}

/// CPU time used so far by this process's threads whose name starts with `prefix` (see
/// [`threads_named`]).
pub fn threads_cpu(prefix: &str) -> Duration {
    cpu_of_threads(&threads_named(prefix))
}

/// The prefix [`threads_cpu`] matches for the pools' maintenance threads.
pub const MAINTENANCE_THREADS: &str = "resilient-dies";
