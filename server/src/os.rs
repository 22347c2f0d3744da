//! Process-level settings that keep the kernel's background work from
//! stalling the message path (measured in docs/BENCHMARKS.md).

use std::io;

/// Turns transparent huge pages off for this process.
///
/// mimalloc asks for huge pages on its arena. Collapsing them is done by
/// `khugepaged`, which takes the process's memory map for tens of
/// milliseconds while connection tasks and shards fault and wait. At
/// 11,000 msgs/s with 10,000 users that doubled p99 and cost no less CPU
/// than it saved. Redis turns them off for the same reason.
///
/// # Errors
/// The `prctl` error, on kernels without `PR_SET_THP_DISABLE` (before 3.15).
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

/// Lowers the CPU priority of the calling thread to `nice`. Raising it
/// again needs privileges, so this is for threads that stay background.
///
/// # Errors
/// Setting the priority failed.
pub fn lower_own_priority(nice: i32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)?;
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// File descriptors kept for everything but open client connections: the
/// database's files and log segments, the listeners, and sockets waiting
/// in the gateway's accept queue before admission.
pub const RESERVED_FILES: usize = 1024;

/// The connection cap the process's open-file limit allows: `wanted`, or
/// fewer when the soft `RLIMIT_NOFILE` would run out first (past it,
/// accepts fail instead of being refused clearly).
#[must_use]
pub fn connection_cap(wanted: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    // `None` means unlimited.
    match limit.and_then(|n| usize::try_from(n).ok()) {
        Some(n) => wanted.min(n.saturating_sub(RESERVED_FILES).max(1)),
        None => wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_its_own_priority_and_its_children_inherit_it() {
        fn get(tid: rustix::process::Pid) -> i32 {
            rustix::process::getpriority_process(Some(tid)).unwrap()
        }
        let own = get(rustix::thread::gettid());
        let (lowered, child) = std::thread::spawn(move || {
            lower_own_priority(7).unwrap();
            let child = std::thread::spawn(|| get(rustix::thread::gettid()))
                .join()
                .unwrap();
            (get(rustix::thread::gettid()), child)
        })
        .join()
        .unwrap();
        assert_eq!((lowered, child), (7, 7));
        assert_eq!(
            get(rustix::thread::gettid()),
            own,
            "the caller keeps its own"
        );
    }

    #[test]
    fn transparent_huge_pages_can_be_turned_off() {
        disable_transparent_huge_pages().unwrap();
        #[cfg(target_os = "linux")]
        assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
    }

    #[test]
    fn the_connection_cap_fits_the_open_file_limit() {
        let cap = connection_cap(usize::MAX);
        if let Some(n) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            assert!(cap as u64 <= n, "{cap} > {n}");
        }
        assert!(connection_cap(1) == 1);
    }
}
