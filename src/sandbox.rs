//! Privilege dropping and process hardening.
//!
//! The bootstrap runs as root only for what needs root (binding the port, creating the run
//! directory and the table, opening the log). [`drop_privileges`] then turns the process into
//! the unprivileged supervisor, in the only order that works: the capability bounding set
//! first (needs CAP_SETPCAP), then `setgroups` → `setresgid` → `setresuid` (after setuid the
//! groups can no longer be changed), then every remaining capability set is cleared, and the
//! result is verified: `setuid(0)` must fail. The process is also made non-dumpable, so other
//! processes of the same uid (the workers) cannot ptrace it or read its memory.
//!
//! Workers call [`lock_down_worker`] after receiving their descriptors and before touching a
//! client byte, in this order:
//! 1. **no_new_privs**: nothing the worker could exec would gain privileges (and seccomp needs
//!    it);
//! 2. **rlimits**: no core files, no new processes (RLIMIT_NPROC is per user but checked at
//!    the caller's fork, so the supervisor, same user, is unaffected), no file writes where
//!    stdout and stderr are not regular files (RLIMIT_FSIZE raises SIGXFSZ on a write to a
//!    regular file, which a foreground `balance -d 2>>log` would hit);
//! 3. **landlock**: no filesystem access at all; TCP connect only to the channels' ports and
//!    TCP bind only to port 0 (the `-B` source address), where the kernel has network rules
//!    (ABI 4); no signals to, or abstract sockets of, processes outside the sandbox (ABI 6).
//!    An older kernel degrades with one warning, never a failure;
//! 4. **seccomp** last (so the landlock and rlimit calls need not be allowed): the allowlist
//!    in `policy/<arch>/worker.json`, embedded at build time and compiled before anything is
//!    locked, default action kill-process.

use std::io;

use caps::{CapSet, Capability};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid, User};

/// The account the supervisor and workers run as.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Looks up a user by name; Ok(None) when it does not exist.
pub fn lookup_user(name: &str) -> io::Result<Option<Account>> {
    let user = User::from_name(name).map_err(io::Error::from)?;
    Ok(user.map(|u| Account {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
    }))
}

/// Looks up a group id by name; Ok(None) when it does not exist.
pub fn lookup_group(name: &str) -> io::Result<Option<Gid>> {
    let group = nix::unistd::Group::from_name(name).map_err(io::Error::from)?;
    Ok(group.map(|g| g.gid))
}

fn caps_err(e: caps::errors::CapsError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Becomes `account` for good, with no capability left in any set.
pub fn drop_privileges(account: &Account) -> io::Result<()> {
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap).map_err(caps_err)?;
    }
    nix::unistd::setgroups(&[account.gid])?;
    nix::unistd::setresgid(account.gid, account.gid, account.gid)?;
    nix::unistd::setresuid(account.uid, account.uid, account.uid)?;
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(caps_err)?;
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(io::Error::other(
            "privilege drop failed: setuid(0) succeeded",
        ));
    }
    if caps::has_cap(None, CapSet::Permitted, Capability::CAP_SETUID).map_err(caps_err)? {
        return Err(io::Error::other(
            "privilege drop failed: capabilities remain",
        ));
    }
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}

/// What the landlock step achieved, for the worker to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landlock {
    Full,
    /// Enforced in part (an older ABI): the string says what is missing.
    Partial(String),
    Unavailable,
}

/// The worker's seccomp allowlist for this architecture, with the `bind` rule merged in when
/// the `-B` source address needs it; compiled before any restriction is in place.
pub fn worker_filter(source_bind: bool) -> io::Result<seccompiler::BpfProgram> {
    let policy: serde_json::Value = serde_json::from_str(POLICY)
        .map_err(|e| io::Error::other(format!("seccomp policy: {e}")))?;
    let mut worker = policy["worker"].clone();
    if source_bind {
        let extra = policy["source_bind"]["filter"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(rules) = worker["filter"].as_array_mut() {
            rules.extend(extra);
        }
    }
    let one = serde_json::json!({ "worker": worker }).to_string();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let mut programs = seccompiler::compile_from_json(one.as_bytes(), arch)
        .map_err(|e| io::Error::other(format!("seccomp policy: {e}")))?;
    programs
        .remove("worker")
        .ok_or_else(|| io::Error::other("seccomp policy has no worker filter"))
}

#[cfg(target_arch = "x86_64")]
const POLICY: &str = include_str!("../policy/x86_64/worker.json");
#[cfg(target_arch = "aarch64")]
const POLICY: &str = include_str!("../policy/aarch64/worker.json");

/// Locks a worker down (see the module documentation for the order and the reasons).
/// `connect_ports` are the channels' ports; `filter` comes from [`worker_filter`].
pub fn lock_down_worker(
    connect_ports: &[u16],
    filter: &seccompiler::BpfProgram,
) -> io::Result<Landlock> {
    nix::sys::prctl::set_no_new_privs()?;
    nix::sys::prctl::set_dumpable(false)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    // Not enforced for root; for the unprivileged worker it stops fork and clone.
    setrlimit(Resource::RLIMIT_NPROC, 0, 0)?;
    if !stdio_is_regular_file() {
        setrlimit(Resource::RLIMIT_FSIZE, 0, 0)?;
    }
    // std's handler for these would call sigaction, which the filter forbids: every memory
    // fault would then be reported as SIGSYS, a seccomp violation.
    crate::sys::default_fault_handlers()?;
    let landlock = restrict_with_landlock(connect_ports)?;
    seccompiler::apply_filter(filter).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    Ok(landlock)
}

fn stdio_is_regular_file() -> bool {
    use std::os::fd::AsFd;
    let (out, err) = (io::stdout(), io::stderr());
    let regular = |fd: std::os::fd::BorrowedFd<'_>| {
        nix::sys::stat::fstat(fd).is_ok_and(|st| {
            nix::sys::stat::SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT)
                == nix::sys::stat::SFlag::S_IFREG
        })
    };
    regular(out.as_fd()) || regular(err.as_fd())
}

fn restrict_with_landlock(connect_ports: &[u16]) -> io::Result<Landlock> {
    use landlock::{
        Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let err = |e: &dyn std::fmt::Display| io::Error::other(format!("landlock: {e}"));
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::from_all(abi))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    for port in connect_ports {
        created = created
            .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
            .map_err(|e| err(&e))?;
    }
    let status = created
        .add_rule(NetPort::new(0, AccessNet::BindTcp))
        .map_err(|e| err(&e))?
        .restrict_self()
        .map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlock::Full,
        RulesetStatus::PartiallyEnforced => Landlock::Partial(format!("{:?}", status.landlock)),
        RulesetStatus::NotEnforced => Landlock::Unavailable,
    })
}
