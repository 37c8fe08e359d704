//! Process life of the real binary: privilege separation as seen in /proc, daemon mode,
//! start-up failures reported by the launch, pid file, SIGTERM, debug output, descriptor
//! limits.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn balance_ids() -> (u32, u32) {
    let user = nix::unistd::User::from_name("balance")
        .expect("getpwnam")
        .expect("user balance exists (.ci/run creates it)");
    (user.uid.as_raw(), user.gid.as_raw())
}

fn assert_unprivileged(pid: u32, uid: u32, gid: u32) {
    let ids = |f| status_field(pid, f).unwrap_or_default();
    assert_eq!(
        ids("Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "pid {pid}"
    );
    assert_eq!(
        ids("Gid"),
        format!("{gid}\t{gid}\t{gid}\t{gid}"),
        "pid {pid}"
    );
    assert_eq!(
        ids("Groups"),
        gid.to_string(),
        "pid {pid} supplementary groups"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(ids(cap), "0000000000000000", "pid {pid} {cap}");
    }
}

/// A port below 1024 that nothing uses right now.
fn free_privileged_port() -> u16 {
    (900..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free privileged port")
}

#[test]
fn supervisor_and_workers_run_unprivileged_on_a_privileged_port() {
    if !require_root() {
        return;
    }
    let (uid, gid) = balance_ids();
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        operands: &[backend.operand()],
        workers: 3,
        port: Some(free_privileged_port()),
        ..Start::default()
    });
    assert_unprivileged(b.pid, uid, gid);
    // Not dumpable: its /proc files belong to root although the process runs as balance.
    let meta = std::fs::metadata(format!("/proc/{}/status", b.pid)).expect("proc status");
    assert_eq!(meta.uid(), 0, "supervisor is not dumpable");
    let workers = b.workers();
    assert_eq!(workers.len(), 3);
    for w in &workers {
        assert_unprivileged(*w, uid, gid);
        assert_eq!(
            proc_state(*w).map(|s| s.1),
            Some(b.pid),
            "worker is the supervisor's child"
        );
        assert_eq!(status_field(*w, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(
            status_field(*w, "Seccomp").as_deref(),
            Some("2"),
            "seccomp filter mode"
        );
        let limits = std::fs::read_to_string(format!("/proc/{w}/limits")).expect("limits");
        let nproc = limits
            .lines()
            .find(|l| l.starts_with("Max processes"))
            .expect("nproc");
        assert_eq!(nproc.split_whitespace().nth(2), Some("0"), "{nproc}");
    }
    assert_eq!(greeting(b.addr()), "B1");
    // Run directory and table: who may do what is in the permissions.
    let dir = std::fs::metadata(&b.run_dir).expect("run dir");
    assert_eq!(
        (dir.uid(), dir.gid(), dir.permissions().mode() & 0o7777),
        (uid, gid, 0o750)
    );
    let table = std::fs::symlink_metadata(b.table_path()).expect("table");
    assert!(table.file_type().is_file());
    assert_eq!(
        (
            table.uid(),
            table.gid(),
            table.permissions().mode() & 0o7777
        ),
        (0, gid, 0o640)
    );
}

/// The table as a worker holds it: the configuration mapped read-only, only the counters
/// writable, and no descriptor of the table file left open with which to map it again. A
/// compromised worker can therefore not repoint channels, set the kill flag or take the
/// writer lock.
#[test]
fn workers_can_write_only_the_counters_of_the_table() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&[], &[backend.operand()]);
    assert_eq!(greeting(b.addr()), "B1");
    let table = std::fs::metadata(b.table_path()).expect("table");
    let split = balance::table::COUNTERS_OFFSET as u64;
    // The mapping ends at the page boundary after the file's end.
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .expect("sysconf")
        .expect("page size") as u64;
    let end = (balance::table::TABLE_SIZE as u64).div_ceil(page) * page;
    for w in b.workers() {
        let maps = std::fs::read_to_string(format!("/proc/{w}/maps")).expect("maps");
        // "start-end perms offset dev inode path": this file's mappings, by file offset.
        let mut parts: Vec<(u64, u64, String)> = maps
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 6 || f[4] != table.ino().to_string() {
                    return None;
                }
                let (start, stop) = f[0].split_once('-')?;
                let len =
                    u64::from_str_radix(stop, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
                let offset = u64::from_str_radix(f[2], 16).ok()?;
                Some((offset, offset + len, f[1].to_string()))
            })
            .collect();
        parts.sort();
        assert_eq!(
            parts,
            vec![
                (0, split, "r--s".to_string()),
                (split, end, "rw-s".to_string())
            ],
            "worker {w} maps the table as {parts:?}"
        );
        for fd in std::fs::read_dir(format!("/proc/{w}/fd"))
            .expect("fds")
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(
                target,
                b.table_path(),
                "worker {w} keeps a descriptor of the table"
            );
        }
    }
}

/// What makes the read-only part stick: pages mapped through a read-only descriptor cannot
/// be made writable, whatever the process holds.
#[test]
fn the_read_only_part_of_a_worker_table_cannot_be_made_writable() {
    let table = worker_table();
    let base = table.layout() as *const balance::table::Layout as *mut libc::c_void;
    let split = balance::table::COUNTERS_OFFSET;
    // SAFETY: mprotect only changes the rights of pages of this mapping, which the table
    // owns and which stay mapped; nothing is read or written through it here.
    let rc = unsafe { libc::mprotect(base, split, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(rc, -1, "the configuration became writable");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EACCES)
    );
    // The counters are writable.
    let counters = table.counters(0, 0).expect("counters");
    counters
        .total
        .fetch_add(5, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counters.total.load(std::sync::atomic::Ordering::Relaxed), 5);
    table.layout().cursors[0].store(3, std::sync::atomic::Ordering::Relaxed);
    assert!(
        !table.is_writable(),
        "a worker's table refuses configuration updates"
    );
    assert!(table.update(|_| ()).is_err());
}

/// Workers are started from the supervisor's own image through a descriptor, which would
/// otherwise name them after the descriptor's number: `ps`, `top` and `pgrep balance` must
/// show them as balance, as the original's per-connection children were.
#[test]
fn workers_are_named_balance() {
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&[], &[backend.operand()]);
    let workers = b.workers();
    assert!(!workers.is_empty(), "no worker found");
    for w in workers {
        let comm = std::fs::read_to_string(format!("/proc/{w}/comm")).expect("comm");
        assert_eq!(comm.trim_end(), "balance", "name of worker {w}");
    }
    assert_eq!(greeting(b.addr()), "B1");
}

/// The service user and a control group named on the command line must exist (an unknown
/// control group used to be replaced by the service user's group without a word); nothing
/// is created before the check.
#[test]
fn an_unknown_user_or_control_group_is_refused_with_exit_67() {
    if !require_root() {
        return;
    }
    for (option, name, says) in [
        (
            "--user",
            "no-such-user-here",
            "user no-such-user-here does not exist",
        ),
        (
            "--control-group",
            "no-such-group-here",
            "group no-such-group-here does not exist",
        ),
    ] {
        let dir = temp_dir("nouser");
        let out = Command::new(BIN)
            .args(["-f", option, name, "--run-dir"])
            .arg(dir.join("run"))
            .args(["-b", "127.0.0.1", &free_port().to_string(), "127.0.0.1:1"])
            .output_within(COMMAND_LIMIT)
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(67), "{option}: {err}");
        assert!(err.contains(says), "{err}");
        assert!(
            !dir.join("run").exists(),
            "{option}: nothing created before the check"
        );
    }
}

/// Instances sharing a run directory: the control group of one must not lock the other's
/// out of the directory (the last one started used to regroup it). A directory no running
/// instance uses takes the new group.
#[test]
fn a_shared_run_directory_keeps_the_group_of_the_instance_using_it() {
    if !require_root() {
        return;
    }
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .expect("getgrnam")
        .expect("group nogroup exists on Debian")
        .gid
        .as_raw();
    let (_, balance_gid) = balance_ids();
    let run = temp_dir("regroup").join("run");
    let gid = || std::fs::metadata(&run).expect("stat").gid();
    let first = Balance::start_with(Start {
        operands: &["127.0.0.1:1".to_string()],
        run_dir: Some(&run),
        ..Start::default()
    });
    assert_eq!(gid(), balance_gid);
    let second = Balance::start_with(Start {
        flags: &["--control-group", "nogroup"],
        operands: &["127.0.0.1:1".to_string()],
        run_dir: Some(&run),
        ..Start::default()
    });
    assert_eq!(gid(), balance_gid, "the first instance's group stays");
    assert!(
        second.logged("belongs to group") && second.stderr().contains("same --control-group"),
        "{}",
        second.stderr()
    );
    drop(second);
    drop(first);
    let alone = Balance::start_with(Start {
        flags: &["--control-group", "nogroup"],
        operands: &["127.0.0.1:1".to_string()],
        run_dir: Some(&run),
        ..Start::default()
    });
    assert_eq!(
        gid(),
        nogroup,
        "no other instance: the directory takes the new group"
    );
    assert!(
        !alone.stderr().contains("belongs to group"),
        "{}",
        alone.stderr()
    );
}

#[test]
fn non_root_start_runs_unprivileged_with_a_warning() {
    if !require_root() {
        return;
    }
    // The build directory may not be reachable by other users: run a copy.
    let dir = temp_dir("nonroot");
    let bin = dir.join("balance");
    copy_binary(&bin);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let port = free_port();
    let child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .args(["-f", "--workers", "1", "--run-dir"])
        .arg(dir.join("run"))
        .args(["-b", "127.0.0.1", &port.to_string(), &backend.operand()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn as nobody");
    let pid = child.id();
    let table = dir.join("run").join(format!("balance.{port}.127.0.0.1"));
    let up = wait_until(Duration::from_secs(10), || {
        table.exists() && worker_pids(pid).len() == 1
    });
    let served = up && greeting(([127, 0, 0, 1], port).into()) == "B1";
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    let uid_line = status_field(pid, "Uid");
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(served, "served traffic as nobody; stderr: {err}");
    let n = nobody.expect("nobody exists");
    assert_eq!(uid_line, Some(format!("{n}\t{n}\t{n}\t{n}")));
    assert!(err.contains("not started as root"), "{err}");
    assert_eq!(out.status.code(), Some(0));
}

/// A user who cannot enter the run directory (root's and the service user's, 0750) is told
/// why and what to do, with the original's code for a run directory it cannot use.
#[test]
fn a_run_directory_out_of_reach_is_explained() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("unreachable-run");
    let bin = dir.join("balance");
    copy_binary(&bin);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("run dir");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .args(["-f", "--run-dir"])
        .arg(&run)
        .args(["-b", "127.0.0.1", &free_port().to_string(), "127.0.0.1:9"])
        .stdin(Stdio::null())
        .output_within(Duration::from_secs(10))
        .expect("run as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("give --run-dir a directory of your own"),
        "{err}"
    );
}

/// A channel that looks like a bare IPv6 address but reads, as in the original, as
/// host:port:maxc starts as the original would have it, with a warning that says so.
#[test]
fn an_ipv6_lookalike_channel_is_pointed_out() {
    if !require_root() {
        return;
    }
    let b = Balance::start(&[], &["127::1".to_string()]);
    assert!(
        b.logged("channel 127::1 is read as host 127 port")
            && b.stderr().contains("for the IPv6 address write [127::1]"),
        "stderr:\n{}",
        b.stderr()
    );
}

/// A pid file the service user cannot remove (its directory is root's) stays after a stop,
/// and the log says so instead of nothing.
#[test]
fn a_pid_file_left_behind_is_logged() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let dir = temp_dir("pidleft");
    let pidfile = dir.join("balance.pid");
    let pidfile_arg = pidfile.display().to_string();
    let mut b = Balance::start(&["--pidfile", &pidfile_arg], &[backend.operand()]);
    assert!(pidfile.exists());
    let status = b.terminate().expect("exit status");
    assert!(status.success(), "{status:?}");
    assert!(
        b.stderr().contains(&format!(
            "cannot remove the pid file {pidfile_arg}: Permission denied"
        )),
        "{}",
        b.stderr()
    );
}

#[test]
fn daemon_detaches_and_sigterm_cleans_up() {
    if !require_root() {
        return;
    }
    let (uid, gid) = balance_ids();
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let dir = temp_dir("daemon");
    let run = dir.join("run");
    let pidfile = dir.join("balance.pid");
    let port = free_port();
    let out = Command::new(BIN)
        .args(["--workers", "2", "--run-dir"])
        .arg(&run)
        .arg("--pidfile")
        .arg(&pidfile)
        .args(["-b", "127.0.0.1", &port.to_string(), &backend.operand()])
        .stdin(Stdio::null())
        .output_within(COMMAND_LIMIT)
        .expect("launch");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let stop = Stopper(pid);
    assert_unprivileged(pid, uid, gid);
    // New session, stdio on /dev/null: nothing we print can reach a client.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..]
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "session id is the daemon's pid");
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd link");
        assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
    }
    assert_eq!(greeting(([127, 0, 0, 1], port).into()), "B1");
    let workers = worker_pids(pid);
    assert_eq!(workers.len(), 2);
    let table = run.join(format!("balance.{port}.127.0.0.1"));
    assert!(table.exists());
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(pid)),
        "daemon exits on SIGTERM"
    );
    assert!(workers.iter().all(|w| is_dead(*w)), "workers end with it");
    assert!(!table.exists(), "table file removed");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer listening"
    );
    drop(stop);
}

/// Kills a daemon by pid if a test fails before stopping it.
struct Stopper(u32);

impl Drop for Stopper {
    fn drop(&mut self) {
        if !is_dead(self.0) {
            signal(self.0, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// `--run-dir` given a directory that holds other things (`/tmp`, say) must not take it
/// over: its owner and mode would change under everything else in it.
#[test]
fn a_run_directory_in_use_by_others_is_not_taken_over() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("shared-run");
    let (service_uid, _) = balance_ids();
    // Like /etc (someone else's files), like /tmp (writable by all, empty or not), and the
    // service user's own directory opened to all, with others' files in it.
    for (name, mode, foreign, owner) in [
        ("etc", 0o755, true, 0),
        ("tmp", 0o1777, false, 0),
        ("opened", 0o1777, true, service_uid),
    ] {
        let shared = dir.join(name);
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).expect("chmod");
        nix::unistd::chown(&shared, Some(nix::unistd::Uid::from_raw(owner)), None).expect("chown");
        if foreign {
            std::fs::write(shared.join("someone-else"), "x").expect("file");
        }
        let out = Command::new(BIN)
            .arg("-f")
            .arg("--run-dir")
            .arg(&shared)
            .args(["-b", "127.0.0.1", &free_port().to_string(), "127.0.0.1:1"])
            .output_within(COMMAND_LIMIT)
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{name}: {err}");
        assert!(err.contains("not available"), "{err}");
        let meta = std::fs::metadata(&shared).expect("stat");
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o7777),
            (owner, mode),
            "{name} was changed"
        );
    }
    // An empty directory root made for it is adopted, as the packages' scripts expect.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let b = Balance::start_with(Start {
        operands: &["127.0.0.1:1".to_string()],
        run_dir: Some(&empty),
        ..Start::default()
    });
    let (uid, gid) = balance_ids();
    let meta = std::fs::metadata(&empty).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (uid, gid, 0o750)
    );
    drop(b);
}

/// The pid file is written as root, often in a directory the service user owns (the
/// packages put it in /run/balance): a link planted there must not make root write through it.
#[test]
fn a_link_at_the_pid_file_is_not_followed() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("pidlink");
    let victim = dir.join("victim");
    std::fs::write(&victim, "secret\n").expect("victim");
    let pidfile = dir.join("balance.pid");
    std::os::unix::fs::symlink(&victim, &pidfile).expect("symlink");
    let hardlinked = dir.join("hard.pid");
    std::fs::hard_link(&victim, &hardlinked).expect("hard link");
    // Detached too: the error is then told by the launching process, once (the daemon
    // used to print it as well).
    for (planted, flag) in [(&pidfile, "-f"), (&hardlinked, "-f"), (&pidfile, "-d")] {
        let out = Command::new(BIN)
            .arg(flag)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--pidfile")
            .arg(planted)
            .args(["-b", "127.0.0.1", &free_port().to_string(), "127.0.0.1:1"])
            .output_within(COMMAND_LIMIT)
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(71), "{err}");
        assert_eq!(err.matches("cannot write pid file").count(), 1, "{err}");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "secret\n",
            "written through {planted:?}"
        );
        let left = dir_entries(&dir.join("run"));
        assert!(left.is_empty(), "a failed start leaves {left:?}");
    }
}

#[test]
fn launch_reports_start_up_failures() {
    if !require_root() {
        return;
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let dir = temp_dir("fail");
    for foreground in [false, true] {
        let mut cmd = Command::new(BIN);
        if foreground {
            cmd.arg("-f");
        }
        let out = cmd
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["-b", "127.0.0.1", &port, "127.0.0.1:1"])
            .output_within(COMMAND_LIMIT)
            .expect("run");
        assert_eq!(out.status.code(), Some(71), "foreground={foreground}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "bind(): Address already in use (127.0.0.1:{port})"
            )),
            "{err}"
        );
        let out = Command::new(BIN)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(if foreground { &["-f"][..] } else { &[][..] })
            .args([
                "-b",
                "127.0.0.1",
                &free_port().to_string(),
                "nosuchhost.invalid",
            ])
            .output_within(COMMAND_LIMIT)
            .expect("run");
        assert_eq!(out.status.code(), Some(65), "foreground={foreground}");
        assert!(String::from_utf8_lossy(&out.stderr)
            .contains("unknown or invalid address [nosuchhost.invalid]"));
    }
    let out = Command::new(BIN)
        .args(["-b", "nosuchhost.invalid", "8000", "127.0.0.1:1"])
        .output_within(COMMAND_LIMIT)
        .expect("run");
    assert_eq!(out.status.code(), Some(71));
    // The resolver's own words, as the original printed them (reference §1.5).
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("error at getaddrinfo: Name or service not known\nexiting.\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn debug_lines_on_stderr() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        flags: &["-d"],
        operands: &[backend.operand(), refused_operand()],
        workers: 1,
        ..Start::default()
    });
    assert_eq!(greeting(b.addr()), "B1");
    // Each of these tries the refused channel 1 first, then fails over to channel 0.
    for _ in 0..3 {
        assert_eq!(greeting(b.addr()), "B1");
    }
    let want = [
        format!("source port {}", b.port),
        "the following channels are active:".to_string(),
        format!("  0  0 {}:0", backend.operand()),
        "connect from 127.0.0.1:".to_string(),
        "trying group 0 channel 1".to_string(),
        "connect to group 0 channel 0 successful".to_string(),
    ];
    assert!(
        wait_until(Duration::from_secs(5), || want
            .iter()
            .all(|w| b.stderr().contains(w.as_str()))),
        "stderr:\n{}",
        b.stderr()
    );
    // Every failed attempt is shown, not only the first of each second (the log's notice
    // is throttled; the original printed one line per attempt).
    assert_eq!(
        b.stderr()
            .matches("connection failed group 0 channel 1: ")
            .count(),
        3,
        "stderr:\n{}",
        b.stderr()
    );
}

#[test]
fn sigterm_in_the_foreground_removes_the_table_and_exits_zero() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    // Three times: the workers' exits race with the supervisor's last messages to them.
    for _ in 0..3 {
        stops_cleanly(&backend);
    }
}

/// SIGUSR1 was the original shell's liveness probe of its master, whose handler did
/// nothing: monitoring that still probes that way must not stop balance (it killed the
/// supervisor, and with it the service).
#[test]
fn sigusr1_is_ignored_as_the_original_did() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&[], &[backend.operand()]);
    let workers = b.workers();
    signal(b.pid, nix::sys::signal::Signal::SIGUSR1);
    for &w in &workers {
        signal(w, nix::sys::signal::Signal::SIGUSR1);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!is_dead(b.pid), "{}", b.stderr());
    assert_eq!(b.workers(), workers, "{}", b.stderr());
    assert_eq!(greeting(b.addr()), "B1");
    assert!(b.control("show").status.success());
}

fn stops_cleanly(backend: &Backend) {
    let mut b = Balance::start(&[], &[backend.operand()]);
    let workers = b.workers();
    let table = b.table_path();
    let status = b.terminate().expect("exit status");
    assert_eq!(status.code(), Some(0));
    assert!(!table.exists());
    // A clean stop logs that it stops and that it has, nothing in between (a worker that
    // exits with a message of the supervisor's unread is not misbehaving).
    let stderr = b.stderr();
    let after: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("shutting down"))
        .collect();
    assert_eq!(after, ["shutting down (SIGTERM)", "stopped"], "{stderr}");
    assert!(wait_until(Duration::from_secs(5), || workers
        .iter()
        .all(|w| is_dead(*w))));
}

#[test]
fn workers_get_the_whole_open_file_limit() {
    if !require_root() {
        return;
    }
    // Started with a soft limit of 1024 (a default systemd setting), workers must still be
    // able to hold thousands of connections.
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        operands: &[backend.operand()],
        wrapper: &["prlimit", "--nofile=1024:8192", "--"],
        ..Start::default()
    });
    for w in b.workers() {
        let limits = std::fs::read_to_string(format!("/proc/{w}/limits")).expect("limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("open files line");
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[3..5], ["8192", "8192"], "{line}");
    }
}

/// The descriptor numbers process `pid` has open.
fn open_fds(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd list")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Starts balance in front of `backends` with one worker whose descriptor limit is used up
/// by relayed connections but for `spare` (0 or 1) descriptors, and opens those connections
/// (two descriptors each), each served by one of the backends. Returns balance, the
/// connections and the limit.
fn at_descriptor_limit(
    backends: &[&Backend],
    flags: &[&str],
    spare: usize,
) -> (Balance, Vec<TcpStream>, u64) {
    let operands: Vec<String> = backends.iter().map(|b| b.operand()).collect();
    let operands = operands.as_slice();
    let start = |limit: u64| {
        let nofile = format!("--nofile={limit}:{limit}");
        Balance::start_with(Start {
            flags,
            operands,
            workers: 1,
            wrapper: &["prlimit", nofile.as_str(), "--"],
            ..Start::default()
        })
    };
    // A first run shows which descriptors an idle worker and its supervisor hold (root
    // cannot lower a running worker's limit here: it is in another user's namespace).
    let probe = start(256);
    let (worker_fds, supervisor_fds) = (open_fds(probe.workers()[0]), open_fds(probe.pid));
    drop(probe);
    // A limit that leaves the worker the right parity of free descriptors, and the
    // supervisor room to spawn.
    let free_below = |limit: u64| (0..limit).filter(|n| !worker_fds.contains(n)).count();
    let mut limit = supervisor_fds.last().copied().unwrap_or(0) + 16;
    if free_below(limit) % 2 != spare {
        limit += 1;
    }
    let connections = free_below(limit) / 2;
    let b = start(limit);
    let held: Vec<TcpStream> = (0..connections)
        .map(|_| {
            let (conn, tag) = hold(b.addr());
            assert!(
                backends.iter().any(|backend| backend.tag == tag),
                "served within the limit of {limit}, got {tag:?}"
            );
            conn
        })
        .collect();
    let worker = b.workers()[0];
    assert_eq!(
        open_fds(worker).len() as u64,
        limit - spare as u64,
        "every descriptor but {spare} in use"
    );
    (b, held, limit)
}

#[test]
fn a_worker_out_of_descriptors_serves_waiting_clients_once_it_has_room() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let (b, held, _) = at_descriptor_limit(&[&backend], &[], 0);
    let worker = b.workers()[0];
    // The next accept fails with EMFILE: the client waits in the kernel's queue.
    let mut waiting = TcpStream::connect(b.addr()).expect("the kernel queues the connection");
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut tag = [0u8; 2];
    assert!(
        waiting.read_exact(&mut tag).is_err(),
        "served although the worker had no descriptor left"
    );
    // Room again: the worker retries accepting on its own (no new connection wakes it).
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    waiting
        .read_exact(&mut tag)
        .expect("served once descriptors were free");
    assert_eq!(&tag, b"B1");
    assert_eq!(
        b.workers(),
        vec![worker],
        "the same worker, not a replacement"
    );
}

#[test]
fn a_client_accepted_with_the_last_descriptor_is_served_and_no_channel_blamed() {
    if !require_root() {
        return;
    }
    let backends = [
        Backend::start("B1", Behaviour::TagEcho),
        Backend::start("B2", Behaviour::TagEcho),
    ];
    // With -a, a channel that fails a connect is disabled.
    let (b, held, limit) = at_descriptor_limit(&[&backends[0], &backends[1]], &["-a"], 1);
    // The accept takes the last descriptor, so none is left for the backend socket but the
    // worker's reserve.
    let (last, tag) = hold(b.addr());
    assert!(tag == "B1" || tag == "B2", "the last client got {tag:?}");
    let show = b.control("show");
    let show = String::from_utf8_lossy(&show.stdout);
    assert_eq!(
        show.matches(" ENA ").count(),
        2,
        "a shortage in the worker disabled a channel:\n{show}"
    );
    assert!(
        b.logged("out of descriptors (Too many open files (os error 24))"),
        "stderr:\n{}",
        b.stderr()
    );
    assert!(!b.stderr().contains("connection failed"), "{}", b.stderr());
    // Once descriptors are free, both channels serve.
    let worker = b.workers()[0];
    drop(held);
    drop(last);
    assert!(
        wait_until(Duration::from_secs(5), || open_fds(worker).len() as u64 + 4
            <= limit),
        "the worker did not close the connections"
    );
    let tags: Vec<String> = (0..2).map(|_| greeting(b.addr())).collect();
    assert!(
        tags.contains(&"B1".to_string()) && tags.contains(&"B2".to_string()),
        "{tags:?}"
    );
}

/// Sends 1 MiB through `conn` to an echoing backend and checks that all of it comes back:
/// far past the 16 KiB read that turns a direction to splice, which takes a pipe (two
/// descriptors) when the worker can open one.
fn bulk_echo(conn: &TcpStream) {
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut writer = conn.try_clone().expect("clone");
    let sent = data.clone();
    let upload = std::thread::spawn(move || {
        writer.write_all(&sent).expect("upload");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let mut echoed = Vec::new();
    let mut reader = conn;
    let got = reader.read_to_end(&mut echoed);
    upload.join().expect("uploader");
    assert!(
        got.is_ok(),
        "relay broke off after {} bytes: {got:?}",
        echoed.len()
    );
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo differs from what was sent");
}

#[test]
fn bulk_data_flows_when_no_descriptor_is_left_for_a_pipe() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let (_b, mut held, _) = at_descriptor_limit(&[&backend], &[], 0);
    bulk_echo(&held.pop().expect("a connection"));
}

/// How many pipe descriptors process `pid` has open.
fn open_pipes(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd list")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

#[test]
fn a_worker_out_of_descriptors_gives_up_its_spare_pipes_for_new_clients() {
    if !require_root() {
        return;
    }
    // spare 0: an accept finds no descriptor; spare 1: the accept takes the last one and
    // the backend socket finds none.
    for spare in [0, 1] {
        let backend = Backend::start("B1", Behaviour::TagEcho);
        let (b, mut held, limit) = at_descriptor_limit(&[&backend], &[], spare);
        let worker = b.workers()[0];
        let pipes_before = open_pipes(worker);
        // One connection ends; a bulk echo on another takes what that frees for a pipe,
        // which the worker keeps for reuse once the transfer is done.
        drop(held.pop());
        let in_use = limit - spare as u64 - 2;
        assert!(
            wait_until(Duration::from_secs(5), || open_fds(worker).len() as u64
                == in_use),
            "spare {spare}: {in_use} descriptors in use expected"
        );
        bulk_echo(&held.pop().expect("a connection"));
        assert!(
            open_pipes(worker) > pipes_before,
            "spare {spare}: the worker kept no pipe for reuse"
        );
        // The echoing connection has ended; two new clients need its descriptors and the
        // pipe's.
        let (_first, tag) = hold(b.addr());
        assert_eq!(tag, "B1", "spare {spare}: the first new client");
        assert_eq!(
            greeting(b.addr()),
            "B1",
            "spare {spare}: the second new client"
        );
        assert_eq!(
            open_pipes(worker),
            pipes_before,
            "spare {spare}: the pipes kept for reuse were closed"
        );
    }
}

#[test]
fn a_worker_out_of_descriptors_leaves_new_clients_to_the_others() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let operands = [backend.operand()];
    let start = |limit: u64| {
        let nofile = format!("--nofile={limit}:{limit}");
        Balance::start_with(Start {
            operands: &operands,
            workers: 2,
            wrapper: &["prlimit", nofile.as_str(), "--"],
            ..Start::default()
        })
    };
    let probe = start(256);
    let limit = open_fds(probe.pid).last().copied().unwrap_or(0) + 24;
    drop(probe);
    let b = start(limit);
    let workers = b.workers();
    // One client at a time, each served before the next comes: the worker that the kernel
    // wakes first takes every one until it is out of descriptors; then the other one must.
    // The loop ends at the first client not served within 5 s (both workers full).
    let mut held = Vec::new();
    let most = 2 * limit as usize;
    while held.len() < most {
        let conn = TcpStream::connect_timeout(&b.addr(), Duration::from_secs(5)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut line = String::new();
        let _ = std::io::BufReader::new(&conn).read_line(&mut line);
        if line != "B1\n" {
            break;
        }
        held.push(conn);
    }
    assert!(
        held.len() < most,
        "{most} connections served: no limit reached"
    );
    // Each worker uses all its descriptors (but one, when one connection was served with
    // the reserve).
    for &w in &workers {
        let used = open_fds(w).len() as u64;
        assert!(
            used + 1 >= limit,
            "worker {w} holds {used} of its {limit} descriptors after {} connections; stderr:\n{}",
            held.len(),
            b.stderr()
        );
    }
    // Said once per worker, not again at each retry while nothing changes.
    assert_eq!(
        b.stderr().matches("out of descriptors").count(),
        workers.len(),
        "stderr:\n{}",
        b.stderr()
    );
}
