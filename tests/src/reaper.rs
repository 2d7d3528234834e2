//! Keeps the harness from leaving processes or folders behind.
//!
//! A control plane shared by all tests of a binary lives in a `static`, and statics are never dropped, so
//! `Drop` alone cannot clean up. Three layers cover the ways a test binary ends:
//! - every child gets its own process group and `PR_SET_PDEATHSIG(SIGKILL)`, so the kernel kills it when
//!   the thread that started it exits (even when the test binary is killed);
//! - process groups and temp folders are registered here and an `atexit` hook kills and removes whatever
//!   is still registered when the binary exits normally (grandchildren included, which the death signal
//!   does not reach);
//! - owners (`ControlPlane`, `NodeAgent`) stop their processes in order in `Drop` and unregister them.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Registry {
    next_id: u64,
    groups: BTreeMap<u64, i32>,
    dirs: BTreeMap<u64, PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 0,
    groups: BTreeMap::new(),
    dirs: BTreeMap::new(),
});
static HOOK: Once = Once::new();

extern "C" fn reap_at_exit() {
    // try_lock: a thread may have died holding the lock; leaking beats hanging at exit.
    let Ok(registry) = REGISTRY.try_lock() else {
        return;
    };
    for &group in registry.groups.values() {
        signal_group(group, libc::SIGKILL);
    }
    for dir in registry.dirs.values() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn register(add: impl FnOnce(&mut Registry, u64)) -> Registration {
    HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function with no captured state.
        unsafe {
            libc::atexit(reap_at_exit);
        }
    });
    let mut registry = REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.next_id += 1;
    let id = registry.next_id;
    add(&mut registry, id);
    Registration(id)
}

/// Removes its process group or folder from the exit-time clean-up when dropped.
#[derive(Debug)]
pub(crate) struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = REGISTRY
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registry.groups.remove(&self.0);
        registry.dirs.remove(&self.0);
    }
}

/// Kills process group `group` at exit unless the returned registration is dropped first.
pub(crate) fn track_group(group: i32) -> Registration {
    register(|registry, id| {
        registry.groups.insert(id, group);
    })
}

/// Removes `dir` at exit unless the returned registration is dropped first.
pub(crate) fn track_dir(dir: PathBuf) -> Registration {
    register(|registry, id| {
        registry.dirs.insert(id, dir);
    })
}

/// Sends `signal` to every process of group `group`; a group that is already gone is not an error.
pub(crate) fn signal_group(group: i32, signal: i32) {
    if group > 0 {
        // SAFETY: kill(2) with a negative pid addresses a process group; no memory is involved.
        unsafe {
            libc::kill(-group, signal);
        }
    }
}

/// True while any process of group `group` exists (zombies included until reaped).
pub(crate) fn group_alive(group: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    group > 0 && unsafe { libc::kill(-group, 0) } == 0
}

/// Runs in the child between fork and exec: own process group, and death with the starting thread.
fn child_setup() -> io::Result<()> {
    // SAFETY: prctl and getppid are async-signal-safe and touch no Rust state.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect; then nobody would ever kill us.
        if libc::getppid() == 1 {
            return Err(io::Error::other("parent exited before the child started"));
        }
    }
    Ok(())
}

/// Prepares `cmd` to run in its own process group and to die with the thread that spawns it.
pub(crate) fn isolate_std(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: child_setup only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(child_setup);
    }
}

/// [`isolate_std`] for tokio's `Command`.
pub(crate) fn isolate_tokio(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    // SAFETY: child_setup only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(child_setup);
    }
}

/// Stops a child started with [`isolate_std`]: SIGTERM to its group, SIGKILL after `grace`, then reaps it.
pub(crate) fn stop_std_child(child: &mut std::process::Child, grace: Duration) {
    let group = child.id() as i32;
    if matches!(child.try_wait(), Ok(None)) {
        signal_group(group, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Whatever the leader did, nothing of its group may outlive it.
    signal_group(group, libc::SIGKILL);
    let _ = child.wait();
}
