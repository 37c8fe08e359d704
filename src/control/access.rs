//! Opening a table file by path, where the file's permissions are the authentication.
//!
//! Who can open the file read-write (root, by default) may change the configuration; who can
//! open it only read-only (the control group) may look; everyone else is told the file is not
//! theirs. The file must be one the daemon made: a regular file owned by root (or by us, for a
//! daemon run without root in tests) that nobody else can write. Anything else is refused
//! rather than mapped, so a file planted by another user is never adopted.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::sys;
use crate::table::{Table, TableError};

/// A mapped table and the file it came from (whose `flock` tells whether a master serves it).
pub struct Attached {
    pub file: File,
    pub table: Table,
}

#[derive(Debug)]
pub enum AccessError {
    /// No file, or no process holds its lock; then the pid the table names, if it can
    /// be read (the supervisor died without removing it).
    NoMaster(Option<u32>),
    /// Neither a read-write nor a read-only open is allowed.
    Denied,
    /// The file is not one the daemon created; the reason says why.
    Unsafe(&'static str),
    Io(io::Error),
    Table(TableError),
}

/// Opens, checks and maps the table at `path`, read-write if permitted, else read-only.
pub fn attach(path: &Path) -> Result<Attached, AccessError> {
    let (file, writable) = open_table_file(path)?;
    check_origin(&file)?;
    if !master_alive(&file).map_err(AccessError::Io)? {
        let pid = Table::open(&file, false)
            .ok()
            .map(|t| t.header().supervisor_pid.load(Ordering::Relaxed))
            .filter(|&pid| pid != 0);
        return Err(AccessError::NoMaster(pid));
    }
    let table = Table::open(&file, writable).map_err(AccessError::Table)?;
    Ok(Attached { file, table })
}

/// Whether a master still serves the table open as `file`: the supervisor holds an exclusive
/// `flock` for its whole life. When the shared lock is granted instead, nothing serves the
/// table; the lock is then held by us until `file` is closed, which callers do right away
/// (they exit).
pub fn master_alive(file: &File) -> io::Result<bool> {
    sys::try_flock(file.as_fd(), false).map(|granted| !granted)
}

fn open_table_file(path: &Path) -> Result<(File, bool), AccessError> {
    // O_NOFOLLOW: a symlink is refused (ELOOP), never followed. O_NONBLOCK: a FIFO planted
    // under the table's name must not hang the open; it is then refused as not a regular file.
    let open = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
    };
    match open(true) {
        Ok(f) => Ok((f, true)),
        Err(e) if is_denied(&e) => match open(false) {
            Ok(f) => Ok((f, false)),
            Err(e) => Err(classify(e)),
        },
        Err(e) => Err(classify(e)),
    }
}

fn is_denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

fn classify(e: io::Error) -> AccessError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => AccessError::NoMaster(None),
        Some(libc::EACCES | libc::EPERM) => AccessError::Denied,
        Some(libc::ELOOP) => AccessError::Unsafe("it is a symbolic link"),
        _ => AccessError::Io(e),
    }
}

/// Refuses a file the daemon cannot have made.
fn check_origin(file: &File) -> Result<(), AccessError> {
    let meta = file.metadata().map_err(AccessError::Io)?;
    if !meta.file_type().is_file() {
        return Err(AccessError::Unsafe("it is not a regular file"));
    }
    let euid = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(AccessError::Unsafe(
            "it is owned by another user (expected root or the caller)",
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(AccessError::Unsafe("its group or other users may write it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("balance-access-test-{tag}-{}", std::process::id()))
    }

    #[test]
    fn missing_file_means_no_master() {
        let path = temp_path("missing");
        assert!(matches!(attach(&path), Err(AccessError::NoMaster(None))));
    }

    #[test]
    fn writable_by_others_or_symlink_is_refused() {
        let path = temp_path("mode");
        let file = File::create(&path).expect("create");
        file.set_permissions(std::fs::Permissions::from_mode(0o662))
            .expect("chmod");
        assert!(matches!(attach(&path), Err(AccessError::Unsafe(_))));
        let link = temp_path("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(matches!(
            attach(&link),
            Err(AccessError::Unsafe("it is a symbolic link"))
        ));
        std::fs::remove_file(&link).expect("cleanup");
        std::fs::remove_file(&path).expect("cleanup");
    }

    #[test]
    fn unlocked_file_means_no_master() {
        let path = temp_path("unlocked");
        let file = File::create(&path).expect("create");
        file.set_permissions(std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        assert!(matches!(attach(&path), Err(AccessError::NoMaster(None))));
        std::fs::remove_file(&path).expect("cleanup");
    }
}
