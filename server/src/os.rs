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

/// Lowers the CPU priority of this process's threads whose name starts with
/// `prefix` to `nice`, and returns how many were changed.
///
/// Used for fjall's workers: their memtable flushes and compactions are
/// background work that can wait, while the shard and connection threads
/// answer users. A lower priority only matters when the CPU is contended;
/// an idle core still runs them at full speed.
///
/// # Errors
/// Reading `/proc/self/task` or setting a priority failed.
pub fn lower_thread_priority(prefix: &str, nice: i32) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut changed = 0;
        for entry in std::fs::read_dir("/proc/self/task")? {
            let entry = entry?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            // A thread may exit between listing and reading: skip it.
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue;
            };
            if comm.trim_end().starts_with(prefix) {
                rustix::process::setpriority_process(Some(tid), nice)?;
                changed += 1;
            }
        }
        Ok(changed)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (prefix, nice);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_thread_gets_the_lower_priority_and_others_keep_theirs() {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(0);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(0);
        let worker = std::thread::Builder::new()
            .name("os-test:worker".into())
            .spawn(move || {
                let tid = rustix::thread::gettid();
                ready_tx.send(tid).ok();
                done_rx.recv().ok();
            })
            .unwrap();
        let tid = ready_rx.recv().unwrap();
        let own = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();

        assert_eq!(lower_thread_priority("os-test:", 19).unwrap(), 1);
        assert_eq!(rustix::process::getpriority_process(Some(tid)).unwrap(), 19);
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap(),
            own
        );
        assert_eq!(lower_thread_priority("no-such-thread:", 19).unwrap(), 0);
        std::thread::spawn(|| {
            lower_own_priority(7).unwrap();
            let me = rustix::thread::gettid();
            assert_eq!(rustix::process::getpriority_process(Some(me)).unwrap(), 7);
        })
        .join()
        .unwrap();

        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn transparent_huge_pages_can_be_turned_off() {
        disable_transparent_huge_pages().unwrap();
        #[cfg(target_os = "linux")]
        assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
    }
}
