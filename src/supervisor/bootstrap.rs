//! The root part of start-up: everything that needs privilege or may fail visibly.
//!
//! Order matters: names are resolved and the port is bound before anything is created on
//! disk, so a second instance on a busy port fails without touching the first one's table.
//! The run directory is opened without following symlinks and must belong to root or the
//! service user (a directory squatted by another user is refused, never adopted); the table
//! is written under a temporary name with `O_EXCL|O_NOFOLLOW`, owned and moded through its
//! fd, initialised, locked, and only then renamed into place.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{open, openat, renameat, OFlag};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

use crate::cli::{table_file_name, ChannelSpec, ProxyArgs};
use crate::exitcode::{EX_DATAERR, EX_NOUSER, EX_OSERR, EX_SOFTWARE, EX_UNAVAILABLE};
use crate::sandbox::{self, Account};
use crate::table::{InitialGroup, Table};

/// A start-up failure: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

impl Fatal {
    pub fn new(code: u8, message: impl Into<String>) -> Fatal {
        Fatal {
            code,
            message: message.into(),
        }
    }

    /// An error the launching process has told the user already: only its exit code is
    /// left to give (the message is empty).
    pub fn told(code: u8) -> Fatal {
        Fatal::new(code, "")
    }

    /// Whether the message is still to be told (see [`Fatal::told`]).
    pub fn untold(&self) -> bool {
        !self.message.is_empty()
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

/// What the bootstrap hands to the supervisor.
pub struct Boot {
    /// The account to drop to; None when not started as root.
    pub account: Option<Account>,
    pub listeners: Vec<std::net::TcpListener>,
    pub listen_description: String,
    pub source: Option<IpAddr>,
    pub table: Table,
    pub table_file: File,
    /// The same file opened read-only: workers map the configuration through it, so that
    /// they can never write it (see `Table::open_for_worker`).
    pub table_file_read_only: File,
    run_dir: OwnedFd,
    table_name: String,
    /// Our own executable, opened before the privilege drop, for re-exec of workers.
    pub exe: OwnedFd,
    /// Warnings for the log, which does not exist yet when they are found.
    pub warnings: Vec<String>,
}

impl Boot {
    /// Removes the table file and `pidfile` (shutdown, or a start that failed). The table
    /// goes after the privilege drop too, because the run directory belongs to the service
    /// user and we hold a descriptor on it; the pid file only where that user may remove it.
    ///
    /// Returns what could not be removed (a file already gone is not that), for the log.
    pub fn remove_files(&self, pidfile: Option<&Path>) -> Vec<String> {
        let mut left = Vec::new();
        let table = nix::unistd::unlinkat(
            &self.run_dir,
            self.table_name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        if let Err(e) = table.map_err(std::io::Error::from) {
            if e.kind() != std::io::ErrorKind::NotFound {
                left.push(format!("the table file {}: {e}", self.table_name));
            }
        }
        if let Some(path) = pidfile {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    left.push(format!("the pid file {}: {e}", path.display()));
                }
            }
        }
        left
    }
}

/// Does every privileged and fallible start-up step.
pub fn prepare(args: &ProxyArgs) -> Result<Boot, Fatal> {
    raise_open_file_limit();
    let root = Uid::effective().is_root();
    let account = if root {
        Some(service_account(&args.user)?)
    } else {
        None
    };
    let table_gid = match &account {
        Some(a) => control_group(&args.control_group, a)?,
        None => Gid::effective(),
    };
    let groups = resolve_groups(args)?;
    let source = match &args.source {
        Some(host) => source_address(host)?,
        None => None,
    };
    let listen = &args.common.listen;
    let listener = bind_listener(listen.port, listen.bind.as_deref(), args.ipv6)?;
    let listen_description = listener
        .local_addr()
        .map_or_else(|_| format!("port {}", listen.port), |a| a.to_string());
    let table_name = table_file_name(listen.port, listen.bind.as_deref());
    let mut warnings = ipv6_lookalikes(args);
    let run_dir = prepare_run_dir(
        &args.common.run_dir,
        account.as_ref(),
        table_gid,
        &mut warnings,
    )?;
    let (table_file, table) = publish_table(&run_dir, &table_name, table_gid, &groups)?;
    // Reopened through our own descriptor: the same file, whatever the directory holds now.
    let table_file_read_only = open(
        format!("/proc/self/fd/{}", table_file.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(|e| Fatal::new(EX_OSERR, format!("cannot reopen table file read-only: {e}")))?;
    if args.common.debug {
        print_startup(args, &table_name, &groups);
    }
    let exe = open(
        "/proc/self/exe",
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Fatal::new(EX_OSERR, format!("cannot open /proc/self/exe: {e}")))?;
    Ok(Boot {
        warnings,
        account,
        listeners: vec![listener],
        listen_description,
        source,
        table,
        table_file,
        table_file_read_only,
        run_dir,
        table_name,
        exe,
    })
}

/// Every connection costs a worker two descriptors: take the whole hard limit (the soft one
/// is often 1024). Workers inherit it.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn service_account(name: &str) -> Result<Account, Fatal> {
    match sandbox::lookup_user(name) {
        Ok(Some(a)) if a.uid.is_root() => Err(Fatal::new(
            EX_NOUSER,
            format!("balance: refusing to run as user {name}: it is root"),
        )),
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(Fatal::new(
            EX_NOUSER,
            format!(
                "balance: user {name} does not exist: create it (adduser --system --group --no-create-home --home /nonexistent {name}) or choose another with --user"
            ),
        )),
        Err(e) => Err(Fatal::new(
            EX_NOUSER,
            format!("balance: cannot look up user {name}: {e}"),
        )),
    }
}

/// The group that may read the table. The default one need not exist (the service user's
/// own group is used then); one named with `--control-group` must.
fn control_group(name: &str, account: &Account) -> Result<Gid, Fatal> {
    match sandbox::lookup_group(name) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) if name == crate::cli::DEFAULT_CONTROL_GROUP => Ok(account.gid),
        Ok(None) => Err(Fatal::new(
            EX_NOUSER,
            format!(
                "balance: group {name} does not exist: create it (addgroup --system {name}) or choose another with --control-group"
            ),
        )),
        Err(e) => Err(Fatal::new(
            EX_NOUSER,
            format!("balance: cannot look up group {name}: {e}"),
        )),
    }
}

/// Channels written like a bare IPv6 address but read, as by the original, as
/// host:port:maxc (`2001::1` is host 2001, that is 0.0.7.209, with maxc 1): said, since a
/// numeric host resolves and nothing else would show it.
fn ipv6_lookalikes(args: &ProxyArgs) -> Vec<String> {
    args.groups
        .iter()
        .flat_map(|g| &g.channels)
        .filter(|c| c.reads_like_ipv6())
        .map(|c| {
            format!(
                "channel {} is read as host {} port {} maxc {}, as the original read it; \
                 for the IPv6 address write [{}]",
                c.text, c.host, c.port, c.maxc, c.text
            )
        })
        .collect()
}

fn resolve_groups(args: &ProxyArgs) -> Result<Vec<InitialGroup>, Fatal> {
    args.groups
        .iter()
        .map(|g| {
            let channels = g
                .channels
                .iter()
                .map(|c| Ok((resolve_channel(c)?, c.maxc)))
                .collect::<Result<Vec<_>, Fatal>>()?;
            Ok(InitialGroup {
                kind: g.kind,
                channels,
            })
        })
        .collect()
}

fn resolve_channel(spec: &ChannelSpec) -> Result<SocketAddr, Fatal> {
    resolve_host(&spec.host, spec.port).map_err(|mut e| {
        // `fe80::1` reads as host `fe80` with maxc 1, as in the original.
        if spec.reads_like_ipv6() {
            e.message += &format!(" (for the IPv6 address, write [{}])", spec.text);
        }
        e
    })
}

/// Resolves a host name or literal (IPv4, IPv6, or the classic inet_aton forms) to an
/// address, if it is one a channel can have. A name with addresses of both families is its
/// first IPv4 one, as the original (an IPv4-only resolver) took it, whatever the resolver
/// puts first (stock Debian's `localhost` is ::1 too, and a backend listening on IPv4 only
/// must keep working); a name with IPv6 addresses only is the first of those. An
/// IPv4-mapped address (::ffff:a.b.c.d) is the IPv4 address it maps, so that it counts as
/// IPv4 and passes the same check (::ffff:0.0.0.0 is no channel either). Used only where
/// resolving is allowed: the bootstrap and the control shell.
pub fn lookup_host(host: &str, port: u16) -> Option<SocketAddr> {
    let addr = resolve_canonical(host, port)?;
    crate::table::is_channel_address(addr.ip()).then_some(addr)
}

/// [`lookup_host`] without the channel check: the literal, or the name's first IPv4
/// address, else its first one, made canonical.
fn resolve_canonical(host: &str, port: u16) -> Option<SocketAddr> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    match host.parse::<IpAddr>() {
        Ok(ip) => Some(canonical(SocketAddr::new(ip, port))),
        Err(_) => {
            let addrs: Vec<SocketAddr> = (host, port)
                .to_socket_addrs()
                .ok()?
                .map(canonical)
                .collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
        }
    }
}

fn resolve_host(host: &str, port: u16) -> Result<SocketAddr, Fatal> {
    lookup_host(host, port)
        .ok_or_else(|| Fatal::new(EX_DATAERR, format!("unknown or invalid address [{host}]")))
}

/// The `-B` address, canonical (::ffff:a.b.c.d is the IPv4 address a.b.c.d: workers rely
/// on it). An unspecified one (0.0.0.0, ::) is the system's choice, as without `-B`: the
/// original bound to it, which chooses nothing.
fn source_address(host: &str) -> Result<Option<IpAddr>, Fatal> {
    // Resolved as a channel is (the short forms `0` and `127.1` included); only the
    // unspecified address is taken besides.
    match resolve_canonical(host, 0).map(|a| a.ip()) {
        Some(ip) if ip.is_unspecified() => Ok(None),
        Some(ip) if crate::table::is_channel_address(ip) => Ok(Some(ip)),
        _ => Err(Fatal::new(
            EX_DATAERR,
            format!("unknown or invalid address [{host}]"),
        )),
    }
}

/// The resolver's message (`gai_strerror`) without the standard library's preamble.
fn resolver_words(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.strip_prefix("failed to lookup address information: ") {
        Some(words) => words.to_string(),
        None => text,
    }
}

/// Binds the listening socket: `-b` address if given, else `[::]` dual stack with `-6`, else
/// `0.0.0.0` (the original's default was IPv4 only too).
fn bind_listener(
    port: u16,
    bind: Option<&str>,
    ipv6: bool,
) -> Result<std::net::TcpListener, Fatal> {
    let gai = |msg: String| Fatal::new(EX_OSERR, format!("error at getaddrinfo: {msg}\nexiting."));
    let addr = match (bind, ipv6) {
        (None, false) => SocketAddr::from(([0, 0, 0, 0], port)),
        (None, true) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        (Some(host), _) => {
            let mut addrs = (host, port)
                .to_socket_addrs()
                .map_err(|e| gai(resolver_words(&e)))?;
            let found = if ipv6 {
                addrs.find(SocketAddr::is_ipv6)
            } else {
                addrs.next()
            };
            found.ok_or_else(|| gai("Address family for hostname not supported".into()))?
        }
    };
    let os = |what: &str, e: nix::Error| Fatal::new(EX_OSERR, format!("{what}(): {}", e.desc()));
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| os("socket", e))?;
    socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)
        .map_err(|e| os("setsockopt(SO_REUSEADDR=1)", e))?;
    if addr.is_ipv6() {
        // Dual stack where the address allows it; a specific v6 address stays v6 only anyway.
        let _ = socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &false);
    }
    // Accepted sockets inherit these: workers need not set them per connection.
    socket::setsockopt(&fd, socket::sockopt::TcpNoDelay, &true)
        .map_err(|e| os("setsockopt(TCP_NODELAY=1)", e))?;
    socket::setsockopt(&fd, socket::sockopt::KeepAlive, &true)
        .map_err(|e| os("setsockopt(SO_KEEPALIVE=1)", e))?;
    // The original's words, then the address: an init script starting several instances
    // (and the log it leaves at boot) must say which one failed.
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| Fatal::new(EX_OSERR, format!("bind(): {} ({addr})", e.desc())))?;
    socket::listen(&fd, Backlog::MAXCONN).map_err(|e| os("listen", e))?;
    Ok(std::net::TcpListener::from(fd))
}

/// Creates (0750) or checks the run directory and gives it to the service user (who must
/// be able to remove the table at shutdown) and the control group (whose members must be
/// able to reach the table to read it). The group of a directory another running instance
/// uses is left alone (its control group would lose access); `warnings` then says that
/// ours cannot reach our table.
fn prepare_run_dir(
    path: &Path,
    account: Option<&Account>,
    group: Gid,
    warnings: &mut Vec<String>,
) -> Result<OwnedFd, Fatal> {
    let unavailable = |why: String| {
        Fatal::new(
            EX_UNAVAILABLE,
            format!(
                "balance: run directory {} not available: {why}",
                path.display()
            ),
        )
    };
    let created = match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o750)) {
        Ok(()) => true,
        Err(nix::Error::EEXIST) => false,
        Err(e) => return Err(unavailable(e.desc().to_string())),
    };
    let dir = open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        unavailable(match e {
            nix::Error::ELOOP => format!("{} (a symlink is not accepted)", e.desc()),
            nix::Error::EACCES => format!(
                "{} (it is for root and the service user: run as root, or give --run-dir a directory of your own)",
                e.desc()
            ),
            e => e.desc().to_string(),
        })
    })?;
    let st = fstat(&dir).map_err(|e| unavailable(e.desc().to_string()))?;
    let me = Uid::effective();
    let allowed_owner =
        |uid: u32| uid == me.as_raw() || uid == 0 || account.is_some_and(|a| a.uid.as_raw() == uid);
    if !allowed_owner(st.st_uid) {
        return Err(unavailable(format!(
            "owned by uid {}, refusing to adopt it",
            st.st_uid
        )));
    }
    // A directory found here that is not already the service user's, or that anyone may
    // write to, is taken over (mode and owner changed) only when nothing but balance's own
    // files live in it and it is not writable by all: `--run-dir /tmp` or `/etc` must not
    // change /tmp or /etc, and files others left in a directory open to all stay theirs.
    let service_uid = account.map_or(me, |a| a.uid);
    let world_writable = st.st_mode & 0o002 != 0;
    if !created && (st.st_uid != service_uid.as_raw() || world_writable) {
        let only_ours = std::fs::read_dir(path)
            .map(|entries| entries.flatten().all(|e| is_balance_file(&e.file_name())))
            .unwrap_or(false);
        if world_writable || !only_ours {
            return Err(unavailable(
                "it holds files that are not balance's, or is writable by all; give balance \
                 a directory of its own"
                    .to_string(),
            ));
        }
    }
    // Mode first, owner second, each only when needed: so a second instance finding the
    // directory already prepared needs no capability over files it does not own.
    if st.st_mode & 0o7777 != 0o750 {
        fchmod(&dir, Mode::from_bits_truncate(0o750))
            .map_err(|e| unavailable(e.desc().to_string()))?;
    }
    if let Some(a) = account {
        let mut gid = group;
        if st.st_gid != group.as_raw() && serves_another_instance(path) {
            gid = Gid::from_raw(st.st_gid);
            warnings.push(format!(
                "run directory {} belongs to group {gid} of another running instance: \
                 members of the control group (gid {group}) cannot reach this table; \
                 give instances that share a run directory the same --control-group, \
                 or each its own --run-dir",
                path.display(),
            ));
        }
        if (st.st_uid, st.st_gid) != (a.uid.as_raw(), gid.as_raw()) {
            fchown(&dir, Some(a.uid), Some(gid)).map_err(|e| unavailable(e.desc().to_string()))?;
        }
    }
    Ok(dir)
}

/// Whether a running balance serves a table in `dir` (its supervisor holds the table's
/// `flock`). Before ours is published, every table there is another instance's.
fn serves_another_instance(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        if !name
            .to_string_lossy()
            .starts_with(crate::cli::TABLE_FILE_PREFIX)
        {
            return false;
        }
        // O_NOFOLLOW, O_NONBLOCK: nothing planted there makes this follow a link or hang.
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(e.path())
            .is_ok_and(|f| crate::sys::try_flock(f.as_fd(), false).is_ok_and(|granted| !granted))
    })
}

/// Whether a run directory entry is one balance makes there: a table, a table under its
/// temporary name (see [`publish_table`]), or a pid file.
fn is_balance_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    let table = name.strip_prefix('.').unwrap_or(&name);
    table.starts_with(crate::cli::TABLE_FILE_PREFIX) || name.ends_with(".pid")
}

/// Writes a fresh table under a temporary name and renames it into place, locked.
fn publish_table(
    dir: &OwnedFd,
    name: &str,
    gid: Gid,
    groups: &[InitialGroup],
) -> Result<(File, Table), Fatal> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Fatal::new(
            EX_OSERR,
            format!("cannot create table file {name}: {what}: {e}"),
        )
    };
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| fail("create", &e))?;
    let file = File::from(fd);
    let st = fstat(&file).map_err(|e| fail("fstat", &e))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(fail("type", &"not a regular file"));
    }
    fchown(&file, Some(Uid::effective()), Some(gid)).map_err(|e| fail("chown", &e))?;
    fchmod(&file, Mode::from_bits_truncate(0o640)).map_err(|e| fail("chmod", &e))?;
    let table = Table::initialise(&file, groups).map_err(|e| fail("initialise", &e))?;
    match crate::sys::try_flock(file.as_fd(), true) {
        Ok(true) => {}
        Ok(false) => return Err(fail("lock", &"held by another process")),
        Err(e) => return Err(fail("lock", &e)),
    }
    renameat(dir, tmp.as_str(), dir, name).map_err(|e| fail("rename", &e))?;
    Ok((file, table))
}

/// `-d` start-up lines on stderr, in the original's shape.
fn print_startup(args: &ProxyArgs, table_name: &str, groups: &[InitialGroup]) {
    crate::say!("source port {}", args.common.listen.port);
    crate::say!(
        "file {} created",
        args.common.run_dir.join(table_name).display()
    );
    crate::say!("using {}", if args.ipv6 { "AF_INET6" } else { "AF_UNSPEC" });
    crate::say!("the following channels are active:");
    for (g, group) in groups.iter().enumerate() {
        for (c, (addr, maxc)) in group.channels.iter().enumerate() {
            crate::say!("{g:3} {c:2} {addr}:{maxc}");
        }
    }
}

/// Detaches from the terminal. The calling process waits until the daemon reports (through
/// a pipe) that it serves or why it failed, then exits with the matching status; only the
/// daemon returns from this function, holding the pipe's write end.
pub fn detach() -> Result<OwnedFd, Fatal> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Fatal::new(EX_OSERR, format!("cannot create a pipe: {e}")))?;
    match crate::sys::fork_single_threaded() {
        Err(e) => Err(Fatal::new(EX_OSERR, format!("cannot fork: {e}"))),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(write);
            // The launcher only waits for the verdict: Ctrl-C may end it as usual.
            super::stop_signals(nix::sys::signal::SigmaskHow::SIG_UNBLOCK);
            std::process::exit(wait_for_daemon(read))
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read);
            let _ = nix::unistd::setsid();
            let _ = nix::unistd::chdir("/");
            Ok(write)
        }
    }
}

/// In the launching process: the daemon's verdict, as an exit code.
fn wait_for_daemon(read: OwnedFd) -> i32 {
    // The daemon reports with one small write, which a pipe delivers whole; the write end
    // stays open in the daemon, so read once instead of waiting for EOF.
    let mut buf = [0u8; 4096];
    let n = File::from(read).read(&mut buf).unwrap_or(0);
    match buf[..n].split_first() {
        Some((0, _)) => 0,
        Some((&code, text)) => {
            crate::say!("{}", String::from_utf8_lossy(text));
            i32::from(code)
        }
        None => {
            crate::say!("balance: the daemon died during start-up");
            i32::from(EX_SOFTWARE)
        }
    }
}

/// In the daemon: tells the launching process how start-up ended.
pub fn report(pipe: &OwnedFd, result: Result<(), &Fatal>) {
    let mut msg = Vec::new();
    match result {
        Ok(()) => msg.push(0),
        Err(e) => {
            msg.push(e.code.max(1));
            msg.extend_from_slice(e.message.as_bytes());
        }
    }
    if let Ok(fd) = pipe.try_clone() {
        let _ = File::from(fd).write_all(&msg);
    }
}
