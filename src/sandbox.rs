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
//! client byte.

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

/// Hardens a worker before it serves traffic: no new privileges ever (no setuid binaries,
/// no file capabilities), not dumpable, no core files, and no way to create processes.
pub fn lock_down_worker() -> io::Result<()> {
    nix::sys::prctl::set_no_new_privs()?;
    nix::sys::prctl::set_dumpable(false)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    // RLIMIT_NPROC is not enforced for root; for the unprivileged worker it stops fork/clone.
    setrlimit(Resource::RLIMIT_NPROC, 0, 0)?;
    Ok(())
}
