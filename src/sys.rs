//! Every `unsafe` block and raw system call of balance lives here.
//!
//! The rest of the crate is safe Rust. Each block below states, in a `SAFETY:` comment, the
//! contract that makes it sound, so a reviewer can audit the whole unsafe surface in one file.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// A shared (`MAP_SHARED`) mapping of a whole file, read-only or read-write.
///
/// The mapping stays valid until the value is dropped; the file may be closed meanwhile.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0. `len` must not exceed the file's size (the
    /// caller checks with `fstat`), or touching the tail raises SIGBUS.
    pub fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        let len_nz = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"))?;
        let mut prot = nix::sys::mman::ProtFlags::PROT_READ;
        if writable {
            prot |= nix::sys::mman::ProtFlags::PROT_WRITE;
        }
        // SAFETY: a fresh mapping chosen by the kernel (no address hint) cannot alias any Rust
        // object; `fd` is a valid open descriptor for the duration of the call.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len_nz,
                prot,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Maps `len` bytes of a file read-only through `read_only` (a descriptor opened
    /// O_RDONLY, so that the pages can never be made writable: `mprotect` refuses), then
    /// the part from `writable_from` (a multiple of the page size) on again, writable,
    /// through `read_write`, at the same place. One contiguous mapping; both descriptors may
    /// be closed afterwards.
    pub fn map_split(
        read_only: BorrowedFd<'_>,
        read_write: BorrowedFd<'_>,
        len: usize,
        writable_from: usize,
    ) -> io::Result<Mapping> {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?
            .and_then(|p| usize::try_from(p).ok())
            .unwrap_or(4096);
        let tail = len
            .checked_sub(writable_from)
            .and_then(std::num::NonZeroUsize::new)
            .filter(|_| writable_from.is_multiple_of(page))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad split"))?;
        let offset = nix::libc::off_t::try_from(writable_from)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad split"))?;
        let whole = Mapping::map(read_only, len, false)?;
        // SAFETY: the range lies inside `whole`, which we own and nothing borrows yet, so
        // replacing its pages (MAP_FIXED) cannot pull memory from under a Rust reference;
        // the address is page aligned (the mapping is, and `writable_from` is a multiple of
        // the page size); `read_write` is valid for the call.
        unsafe {
            nix::sys::mman::mmap(
                std::num::NonZeroUsize::new(whole.as_ptr() as usize + writable_from),
                tail,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_FIXED,
                read_write,
                offset,
            )
        }?;
        Ok(whole)
    }

    /// Start of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; references handed out by the table
        // module borrow the Mapping, so none outlive it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above, concurrent access is only through atomic types.
unsafe impl Sync for Mapping {}

/// The channel table's layout over the start of a mapping. Panics if the mapping is
/// shorter than the layout (`Table` only maps files of exactly that size).
pub fn table_layout(map: &Mapping) -> &crate::table::Layout {
    assert!(std::mem::size_of::<crate::table::Layout>() <= map.len());
    // SAFETY: `Layout` is `#[repr(C)]` and made only of atomics (every bit pattern is
    // valid, and shared mutation goes through them), its alignment is below the page size
    // that the mapping's start is aligned to, and the mapping covers it (checked above).
    // The reference lives no longer than the borrow of the mapping.
    unsafe { &*(map.as_ptr() as *const crate::table::Layout) }
}

/// Kernel ABI of `struct robust_list_head` (include/uapi/linux/futex.h).
#[repr(C)]
struct RobustListHead {
    list_next: usize,
    futex_offset: isize,
    list_op_pending: AtomicUsize,
}

thread_local! {
    static ROBUST_HEAD: &'static RobustListHead = register_robust_head();
}

fn register_robust_head() -> &'static RobustListHead {
    let head: &'static mut RobustListHead = Box::leak(Box::new(RobustListHead {
        list_next: 0,
        futex_offset: 0,
        list_op_pending: AtomicUsize::new(0),
    }));
    // An empty robust list points at itself.
    head.list_next = head as *mut RobustListHead as usize;
    let head: &'static RobustListHead = head;
    // SAFETY: the head is leaked, so it lives as long as the thread; the kernel reads it only
    // when this thread exits. We never store a pointer into shared memory: only the
    // thread-local `list_op_pending` slot points at the futex word, and the list stays empty.
    // It replaces the head glibc registered for the thread, which serves only robust
    // pthread mutexes: balance has none, so nothing relies on that list any more.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_robust_list,
            head as *const RobustListHead,
            std::mem::size_of::<RobustListHead>(),
        )
    };
    // A failure (a kernel without robust futexes) leaves the lock's timeout as the only
    // defence against a dead holder; there is nothing better to do here.
    let _ = rc;
    head
}

/// Marks `word` as the futex this thread is about to take (or holds), so the kernel sets
/// FUTEX_OWNER_DIED in it if the thread dies before [`robust_clear_pending`].
pub fn robust_set_pending(word: &AtomicU32) {
    ROBUST_HEAD.with(|h| {
        h.list_op_pending
            .store(word as *const AtomicU32 as usize, Ordering::SeqCst)
    });
}

pub fn robust_clear_pending() {
    ROBUST_HEAD.with(|h| h.list_op_pending.store(0, Ordering::SeqCst));
}

/// Thread id as the futex owner field wants it.
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// FUTEX_WAIT on a shared (not private) futex word, with a relative timeout.
/// Returns Ok(()) on wake-up or value mismatch, Err(TimedOut) on timeout.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the timespec lives on
    // the stack until the syscall returns. FUTEX_WAIT only reads the word.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
        Some(libc::ETIMEDOUT) => Err(io::Error::new(io::ErrorKind::TimedOut, "futex wait")),
        _ => Err(err),
    }
}

/// FUTEX_WAKE up to `n` waiters of a shared futex word.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: wake only uses the address as a key; the word is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// `flock(2)` without blocking. Ok(true) when taken, Ok(false) when another holder conflicts.
pub fn try_flock(fd: BorrowedFd<'_>, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: plain syscall on a valid descriptor, no memory involved.
    let rc = unsafe { libc::flock(fd.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Prepares `cmd` so the child sees `channel` as fd 3 and nothing else above stderr, and
/// dies with the parent.
pub fn worker_child_setup(cmd: &mut Command, channel: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (dup2, close_range, prctl, signal, sigemptyset, sigprocmask), touching no heap
    // or locks; the zeroed sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        cmd.pre_exec(move || {
            if channel != 3 {
                if libc::dup2(channel, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            // Everything above fd 3 is closed at exec, except the executable fd, which the
            // kernel needs until exec resolves it: mark close-on-exec rather than close.
            // Before Linux 5.11 (no CLOSE_RANGE_CLOEXEC), one descriptor at a time: otherwise
            // the worker would inherit the supervisor's descriptors, the table's writable
            // one among them. (Closing them instead would also close std's pipe that reports
            // a failed exec.)
            let marked = libc::syscall(
                libc::SYS_close_range,
                4u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if marked != 0 {
                let mut limit: libc::rlimit = std::mem::zeroed();
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur
                } else {
                    libc::rlim_t::MAX
                };
                cloexec_each(4, top);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A worker takes no stop or reload signal (the supervisor ends it with SIGKILL,
            // or by closing its channel): a signal to the whole process group or cgroup (a
            // Ctrl-C, systemd's stop, `killall -HUP balance`) is the supervisor's to handle.
            // The supervisor blocks them during start-up; a child inherits that mask.
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_IGN);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Marks descriptors `from..to` close-on-exec, one call each, async-signal-safe; a number
/// that is not open fails harmlessly. At most the first 65,536 numbers: the supervisor
/// holds a few dozen descriptors, all numbered low, and a soft limit of a million (common
/// in containers) must not cost a million calls per worker start.
fn cloexec_each(from: libc::c_int, to: libc::rlim_t) {
    let to = libc::c_int::try_from(to.min(1 << 16)).unwrap_or(1 << 16);
    for fd in from..to {
        // SAFETY: F_SETFD on a number that may or may not be open touches no memory.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Redirects fds 0, 1 and 2 to `/dev/null` (daemon mode: nothing we print may ever reach a
/// socket that happens to get a low fd number).
pub fn stdio_to_devnull() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open during the call.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets close-on-exec on a descriptor received from another process.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Puts SIGSEGV and SIGBUS back to their default action (std installs handlers for them
/// that report a stack overflow), so that a memory fault ends the process with that signal.
pub fn default_fault_handlers() -> io::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGSEGV, Signal::SIGBUS] {
        // SAFETY: SIG_DFL runs no code of ours, so no handler can observe a half-updated
        // state; replacing std's handler only loses its stack-overflow message.
        unsafe { signal(sig, SigHandler::SigDfl) }?;
    }
    Ok(())
}

/// Ignores SIGUSR1, which the original's shell sent its master as a liveness probe (its
/// handler did nothing): monitoring that still probes that way must not stop balance. The
/// workers inherit the disposition through fork and exec.
pub fn ignore_liveness_probe() -> io::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN runs no code of ours, so no handler can observe a half-updated state.
    unsafe { signal(Signal::SIGUSR1, SigHandler::SigIgn) }?;
    Ok(())
}

/// Bytes written on a TCP socket that its peer has not acknowledged yet (SIOCOUTQ).
pub fn unacknowledged(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a socket) writes one int through its argument, which
    // points at `n`, alive for the call; `fd` is a descriptor we hold.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Whether a thread with this id exists (in our pid namespace). Used to detect a lock holder
/// that died without the kernel marking the lock.
pub fn thread_exists(tid: u32) -> bool {
    let Ok(tid) = i32::try_from(tid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(tid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Takes ownership of descriptors that just arrived in an SCM_RIGHTS message.
pub fn own_received_fds(raw: &[RawFd]) -> Vec<std::os::fd::OwnedFd> {
    raw.iter()
        .map(|&fd| {
            // SAFETY: the kernel installed these descriptors in our table for this message
            // only; nothing else in the process knows their numbers, so we are the sole owner.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .collect()
}

/// Takes ownership of a descriptor this process inherited at a fixed number, after checking
/// that it is open.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and by the start-up contract of this
    // process (see `worker_child_setup`) nothing else in it refers to this number.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

/// `fork(2)`, for detaching the daemon.
///
/// Must be called while the process has a single thread (before any runtime is built).
pub fn fork_single_threaded() -> io::Result<nix::unistd::ForkResult> {
    // SAFETY: the caller guarantees no other thread exists, so the child cannot inherit a lock
    // held by a thread that does not exist in it; it continues with ordinary code.
    Ok(unsafe { nix::unistd::fork() }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloexec_each_marks_the_range_and_only_it() {
        let open = || std::fs::File::open("/dev/null").expect("open");
        let (a, b, c) = (open(), open(), open());
        let fds = [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()];
        for &fd in &fds {
            // SAFETY: clears the flag of a descriptor this test owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
        let lo = *fds.iter().min().expect("three descriptors");
        let hi = *fds.iter().max().expect("three descriptors");
        // Marks all three but the highest, which lies outside the range.
        cloexec_each(lo, hi as libc::rlim_t);
        // SAFETY: F_GETFD on descriptors this test owns.
        let flag = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC;
        for fd in fds {
            assert_eq!(flag(fd) != 0, fd < hi, "descriptor {fd}");
        }
    }
}
