//! The audit trail and daemon log, received on a Unix datagram socket the test creates
//! (`--syslog-socket`), as a syslog daemon would receive them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A syslog receiver: collects every datagram on `path` until dropped.
struct Receiver {
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    /// While set, nothing is read: the socket's queue fills as a busy syslog daemon's does.
    held: Arc<AtomicBool>,
    /// Set by the reading thread once it has seen `held` and stopped reading.
    idle: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn bind(path: &Path) -> Receiver {
        Self::bind_into(path, Arc::new(Mutex::new(Vec::new())))
    }

    fn bind_into(path: &Path, lines: Arc<Mutex<Vec<String>>>) -> Receiver {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).expect("bind syslog socket");
        // The supervisor and workers run as user balance: the socket must be writable to all.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let (l, s, h) = (Arc::clone(&lines), Arc::clone(&stop), Arc::clone(&held));
        let i = Arc::clone(&idle);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let hold = h.load(Ordering::Acquire);
                i.store(hold, Ordering::Release);
                if hold {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    l.lock().expect("lines").push(text);
                }
            }
        });
        Receiver {
            path: path.to_path_buf(),
            lines,
            stop,
            held,
            idle,
            thread: Some(thread),
        }
    }

    /// Stops reading (`true`) or reads again (`false`). Holding returns once the reading
    /// thread has stopped (a read under way ends within 100 ms).
    fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Release);
        if held {
            let stopped = wait_until(Duration::from_secs(10), || {
                self.idle.load(Ordering::Acquire)
            });
            assert!(stopped, "the receiver did not stop reading");
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// How many lines so far contain `text`.
    fn count(&self, text: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(text)).count()
    }

    /// Waits for a line with priority `<pri>` containing every one of `parts`.
    fn expect(&self, pri: u8, parts: &[&str]) -> String {
        let prefix = format!("<{pri}>");
        let mut found = None;
        let ok = wait_until(Duration::from_secs(10), || {
            found = self
                .lines()
                .into_iter()
                .find(|l| l.starts_with(&prefix) && parts.iter().all(|p| l.contains(p)));
            found.is_some()
        });
        assert!(
            ok,
            "no <{pri}> line with {parts:?}; got:\n{}",
            self.lines().join("\n")
        );
        found.unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

// Priorities: facility * 8 + severity. daemon = 3, authpriv = 10.
const DAEMON_CRIT: u8 = 26;
const DAEMON_ERR: u8 = 27;
const DAEMON_WARNING: u8 = 28;
const DAEMON_NOTICE: u8 = 29;
const DAEMON_INFO: u8 = 30;
const AUTH_WARNING: u8 = 84;
const AUTH_NOTICE: u8 = 85;

fn syslog_flags(path: &Path) -> Vec<String> {
    vec![
        "--syslog-socket".to_string(),
        path.to_string_lossy().to_string(),
    ]
}

/// balance with one worker in front of `operands`, logging to `rx`.
fn one_worker_logging_to(rx: &Receiver, operands: &[String]) -> Balance {
    let flags = syslog_flags(&rx.path);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Balance::start_with(Start {
        flags: &flag_refs,
        operands,
        workers: 1,
        ..Start::default()
    })
}

/// balance with `workers` workers in front of `operands`, logging to `rx` with a line per
/// connection.
fn logging_connections_to(rx: &Receiver, operands: &[String], workers: usize) -> Balance {
    let mut flags = syslog_flags(&rx.path);
    flags.push("--log-connections".to_string());
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Balance::start_with(Start {
        flags: &flag_refs,
        operands,
        workers,
        ..Start::default()
    })
}

#[test]
fn daemon_events_reach_syslog() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let dead = refused_operand();
    let flags = syslog_flags(&rx.path);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    flag_refs.push("-a");
    let mut b = Balance::start(&flag_refs, &[format!("{}:1", b1.operand()), dead.clone()]);
    let pid = b.pid.to_string();
    let ident = format!("Balance[{pid}]:");
    let start = rx.expect(DAEMON_NOTICE, &[&ident, "started: listening on 127.0.0.1:"]);
    assert!(start.contains(&b.port.to_string()), "{start}");
    let user = nix::unistd::User::from_name("balance")
        .ok()
        .flatten()
        .expect("user");
    rx.expect(
        DAEMON_NOTICE,
        &[&format!(
            "privileges dropped to user balance (uid {}, gid {})",
            user.uid, user.gid
        )],
    );
    rx.expect(DAEMON_INFO, &["worker 0 started (pid"]);
    rx.expect(DAEMON_INFO, &["worker 1 started (pid"]);

    // B1 (maxc 1) held, the next one goes to the dead channel: failure, autodisable,
    // nothing left for the client; then maxc turns the next one away.
    let (held, tag) = hold(b.addr());
    assert_eq!(tag, "B1");
    assert_eq!(greeting(b.addr()), "");
    rx.expect(
        DAEMON_NOTICE,
        &[
            &format!("{ident} connection failed group 0 channel 1 ({dead})"),
            "(worker ",
            "Connection refused",
            "failing over to group 0 channel 0",
        ],
    );
    // The original's line, which log watchers look for, starts the message.
    rx.expect(
        DAEMON_NOTICE,
        &[
            &format!(
                "{ident} {dead} needs to be enabled manually using balance -i after the problem is solved"
            ),
            "channel 1 of group 0",
        ],
    );
    // The supervisor also records the change it observes in the table.
    rx.expect(
        AUTH_NOTICE,
        &[
            "table change observed: group 0 channel 1: enabled",
            "-> disabled",
        ],
    );
    rx.expect(
        DAEMON_WARNING,
        &["no channel could take the connection from 127.0.0.1:"],
    );
    assert_eq!(greeting(b.addr()), "");
    rx.expect(DAEMON_NOTICE, &["group 0 channel 0 reached maxc 1"]);
    drop(held);

    // A worker dies: its exit and its restart are on record.
    let victim = b.workers()[0];
    signal(victim, Signal::SIGKILL);
    rx.expect(DAEMON_ERR, &["killed by signal 9"]);
    rx.expect(DAEMON_NOTICE, &["restarting worker"]);
    // Its replacement serves (a reload leaves a worker that is still starting alone: the
    // list below would name one that is not retired).
    assert!(
        wait_until(Duration::from_secs(10), || rx.count(" started (pid ") >= 3),
        "{}",
        rx.lines().join("\n")
    );

    // A reload: the workers it retires are on record as they go, like their starts.
    let retiring = b.workers();
    signal(b.pid, Signal::SIGHUP);
    rx.expect(DAEMON_NOTICE, &["all workers replaced"]);
    for pid in retiring {
        rx.expect(
            DAEMON_INFO,
            &[&format!("(pid {pid}) retired: exited with status 0")],
        );
    }

    b.terminate();
    rx.expect(DAEMON_NOTICE, &[&ident, "shutting down (SIGTERM)"]);
    rx.expect(DAEMON_NOTICE, &[&ident, "stopped"]);
}

#[test]
fn crash_budget_exhaustion_is_critical() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-crit");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let flags = syslog_flags(&rx.path);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    flag_refs.extend(["--user", "nobody"]);
    let b = Balance::start_with(Start {
        flags: &flag_refs,
        operands: &[b1.operand()],
        wrapper: &["prlimit", "--nproc=4:4", "--"],
        ..Start::default()
    });
    let _fillers = Fillers::exhaust("nobody", "nogroup", 3);
    for w in b.workers() {
        signal(w, Signal::SIGKILL);
    }
    rx.expect(DAEMON_CRIT, &["not restarting it"]);
    rx.expect(DAEMON_CRIT, &["stopped: no worker could run"]);
}

#[test]
fn control_changes_and_refusals_are_audited() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-audit");
    let rx = Receiver::bind(&dir.join("log"));
    let bs: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let flags = syslog_flags(&rx.path);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let b = Balance::start(&flag_refs, &[bs[0].operand(), bs[1].operand()]);
    let control = |user: Option<&[&str]>, cmd: &str| {
        let bin = dir.join("balance");
        if !bin.exists() {
            copy_binary(&bin);
        }
        let mut c = match user {
            Some(setpriv) => {
                let mut c = Command::new("setpriv");
                c.args(setpriv).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        c.arg("--run-dir")
            .arg(&b.run_dir)
            .args(["-b", "127.0.0.1", "--syslog-socket"])
            .arg(&rx.path)
            .args(["-c", cmd, &b.port.to_string()])
            .output_within(COMMAND_LIMIT)
            .expect("control")
    };
    let out = control(None, "disable 1");
    assert_eq!(out.status.code(), Some(0));
    rx.expect(
        AUTH_NOTICE,
        &[
            "uid 0 (root) pid ",
            ": disable group 0 channel 1: enabled -> disabled",
        ],
    );
    rx.expect(
        AUTH_NOTICE,
        &[
            &format!("Balance[{}]:", b.pid),
            "table change observed: group 0 channel 1: enabled",
        ],
    );
    let out = control(None, "maxc 0 7");
    assert_eq!(out.status.code(), Some(0));
    rx.expect(AUTH_NOTICE, &["maxc group 0 channel 0: 0 -> 7"]);

    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("nobody");
    let reader = ["--reuid=nobody", "--regid=nogroup", "--groups=balance"];
    let out = control(Some(&reader), "enable 1");
    assert_eq!(out.status.code(), Some(77), "read-only refusal");
    rx.expect(
        AUTH_WARNING,
        &[
            &format!("uid {} (nobody)", nobody.uid),
            "refused enable",
            "read-only access",
        ],
    );
    let stranger = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    let out = control(Some(&stranger), "show");
    assert_eq!(out.status.code(), Some(71), "no access");
    rx.expect(
        AUTH_WARNING,
        &[
            &format!("uid {} (nobody)", nobody.uid),
            "refused access to",
            "for 'show'",
            "permission denied",
        ],
    );
}

/// A change is on record even when the shell that made it cannot reach syslog: the shell
/// leaves the record in the table and the supervisor, which owns the daemon's syslog
/// connection, logs it; `kill` is on record before the daemon stops.
#[test]
fn changes_by_a_shell_without_syslog_are_logged_by_the_supervisor() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-ring");
    let rx = Receiver::bind(&dir.join("log"));
    let bs: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let mut b = one_worker_logging_to(&rx, &[bs[0].operand(), bs[1].operand()]);
    let control = |cmd: &str| {
        Command::new(BIN)
            .arg("--run-dir")
            .arg(&b.run_dir)
            .args(["-b", "127.0.0.1", "--syslog-socket"])
            .arg(dir.join("no-syslog-here"))
            .args(["-c", cmd, &b.port.to_string()])
            .output_within(COMMAND_LIMIT)
            .expect("control")
    };
    let tag = format!("Balance[{}]: uid 0 (root) pid ", b.pid);
    for (cmd, record) in [
        (
            "disable 0",
            ": disable group 0 channel 0: enabled -> disabled",
        ),
        (
            "enable 0",
            ": enable group 0 channel 0: disabled -> enabled",
        ),
        ("reset 0", ": reset group 0 channel 0: "),
        ("maxc 1 3", ": maxc group 0 channel 1: 0 -> 3"),
    ] {
        let out = control(cmd);
        assert_eq!(out.status.code(), Some(0), "{cmd}: {out:?}");
        rx.expect(AUTH_NOTICE, &[&tag, record]);
    }
    let out = control("kill");
    assert_eq!(out.status.code(), Some(0), "kill: {out:?}");
    let killed = rx.expect(AUTH_NOTICE, &[&tag, ": kill: running -> shutting down"]);
    let stopping = rx.expect(DAEMON_NOTICE, &["shutting down (kill command)"]);
    let lines = rx.lines();
    let at = |line: &str| lines.iter().position(|l| l == line);
    assert!(at(&killed) < at(&stopping), "{lines:#?}");
    let _ = b.terminate();
}

#[test]
fn connection_lines_only_when_asked() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-conn");
    let rx = Receiver::bind(&dir.join("log"));
    let backend = Backend::start("B6", Behaviour::ReadAllThenReply);
    let flags = syslog_flags(&rx.path);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let quiet = Balance::start(&flag_refs, &[backend.operand()]);
    send_and_half_close(quiet.addr(), b"12345");
    rx.expect(DAEMON_NOTICE, &["started"]);
    drop(quiet);
    assert!(
        !rx.lines().iter().any(|l| l.contains("bytes up")),
        "no connection lines by default"
    );
    flag_refs.push("--log-connections");
    let b = Balance::start(&flag_refs, &[backend.operand()]);
    let reply = send_and_half_close(b.addr(), b"12345");
    let line = rx.expect(
        DAEMON_INFO,
        &[
            "connection from 127.0.0.1:",
            &format!("via group 0 channel 0 ({})", backend.operand()),
            "5 bytes up",
            &format!("{} bytes down", reply.len()),
            "closed",
        ],
    );
    assert!(
        line.contains("s, closed"),
        "duration before the ending: {line}"
    );
}

fn send_and_half_close(addr: std::net::SocketAddr, data: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(data).expect("write");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reply");
    reply
}

#[test]
fn logging_survives_a_syslog_restart() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-restart");
    let path = dir.join("log");
    let rx = Receiver::bind(&path);
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let flags = syslog_flags(&path);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    flag_refs.push("--log-connections");
    let b = Balance::start(&flag_refs, &[backend.operand()]);
    assert_eq!(greeting(b.addr()), "B1");
    rx.expect(DAEMON_INFO, &["via group 0 channel 0"]);
    // syslogd restarts: its socket disappears and a new one is bound at the same path.
    drop(rx);
    // Lines logged meanwhile are lost; the gap is said once syslog is back.
    for _ in 0..3 {
        assert_eq!(greeting(b.addr()), "B1");
    }
    let rx = Receiver::bind(&path);
    assert!(
        wait_until(Duration::from_secs(10), || {
            assert_eq!(greeting(b.addr()), "B1");
            rx.lines()
                .iter()
                .any(|l| l.contains("via group 0 channel 0"))
        }),
        "messages arrive after the restart"
    );
    rx.expect(
        DAEMON_WARNING,
        &["log line(s) could not be delivered to syslog before this one"],
    );
}

/// A syslog daemon that stops reading (its socket's queue full) does not stop balance:
/// lines are dropped, and a reload and a stop still work.
#[test]
fn a_syslog_that_stops_reading_does_not_wedge_the_supervisor() {
    if !require_root() {
        return;
    }
    for stream in [false, true] {
        a_stuck_syslog_does_not_wedge_the_supervisor(stream);
    }
}

fn a_stuck_syslog_does_not_wedge_the_supervisor(stream: bool) {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = temp_dir("syslog-stuck");
    let path = dir.join("log");
    // A datagram socket bound and never read: after a few lines (net.unix.max_dgram_qlen)
    // sends would block. A stream socket (syslog-ng's unix-stream) that stopped
    // accepting, its one-place backlog taken: a connect would block.
    let stuck: Box<dyn std::any::Any> = if stream {
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).expect("path")).expect("bind");
        socket::listen(&listener, Backlog::new(0).expect("backlog")).expect("listen");
        let filler = std::os::unix::net::UnixStream::connect(&path).expect("filler");
        Box::new((listener, filler))
    } else {
        Box::new(UnixDatagram::bind(&path).expect("bind"))
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let flags = syslog_flags(&path);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    flag_refs.push("--log-connections");
    let mut b = Balance::start(&flag_refs, &[backend.operand()]);
    for _ in 0..100 {
        assert_eq!(greeting(b.addr()), "B1");
    }
    let before = b.workers();
    signal(b.pid, Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = b.workers();
            !now.is_empty() && now.iter().all(|w| !before.contains(w))
        }),
        "the reload did not replace the workers"
    );
    let started = Instant::now();
    let status = b.terminate().expect("exit status");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stream {stream}: took {:?}",
        started.elapsed()
    );
    drop(stuck);
}

#[test]
fn without_syslog_balance_runs_and_says_so_once() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-none");
    let missing = dir.join("no-such-socket");
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let flags = syslog_flags(&missing);
    let mut flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    flag_refs.extend(["--log-connections", "-a"]);
    let b = Balance::start(&flag_refs, &[backend.operand(), refused_operand()]);
    for _ in 0..4 {
        assert_eq!(greeting(b.addr()), "B1");
    }
    std::thread::sleep(Duration::from_millis(300));
    let err = b.stderr();
    assert_eq!(err.matches("cannot reach syslog").count(), 1, "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[test]
fn a_refusing_channel_is_logged_once_a_second_not_once_a_connection() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-throttle");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    // Round robin over [dead, B1]: every connection tries the dead channel first.
    let b = one_worker_logging_to(&rx, &[refused_operand(), b1.operand()]);
    let failed = "connection failed group 0 channel 0";
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(greeting(b.addr()), "B1", "fails over to channel 1");
    }
    let elapsed = started.elapsed();
    rx.expect(DAEMON_NOTICE, &[failed]);
    std::thread::sleep(Duration::from_millis(300));
    let count = rx.count(failed);
    assert!(
        count <= 2 + elapsed.as_secs() as usize,
        "{count} failure lines for 20 connections in {elapsed:?}"
    );
    // A second later the next failure is logged again, with what was held back.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(greeting(b.addr()), "B1");
    rx.expect(
        DAEMON_NOTICE,
        &[failed, "more like this since the last notice"],
    );
}

/// Every worker throttles its notices, and the supervisor again across them: a refusing
/// channel met by four workers at once is still one line a second. (Each worker logged its
/// own line a second: as many lines as workers.)
#[test]
fn a_refusing_channel_is_one_line_a_second_whichever_workers_meet_it() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-throttle-pool");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = logging_connections_to(&rx, &[refused_operand(), b1.operand()], 4);
    let failed = "connection failed group 0 channel 0";
    let addr = b.addr();
    let started = Instant::now();
    // Clients at once, so that several workers wake for them.
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..10 {
                    assert_eq!(greeting(addr), "B1", "fails over to channel 1");
                }
            });
        }
    });
    let elapsed = started.elapsed();
    rx.expect(DAEMON_NOTICE, &[failed]);
    // Every relayed connection has its line, naming its worker.
    let all = wait_until(Duration::from_secs(10), || rx.count("bytes up") >= 80);
    assert!(all, "80 connection lines; got:\n{}", rx.lines().join("\n"));
    let mut workers: Vec<String> = rx
        .lines()
        .iter()
        .filter(|l| l.contains("bytes up"))
        .filter_map(|l| l.rsplit_once("(worker ").map(|(_, w)| w.to_string()))
        .collect();
    workers.sort();
    workers.dedup();
    assert!(
        workers.len() >= 2,
        "the clients all went to one worker: {workers:?}"
    );
    // Lines pass one a second at most, and what was held back comes a second after the
    // first: count against the time since the first connection.
    let count = rx.count(failed);
    let since = started.elapsed();
    assert!(
        count <= 1 + since.as_secs() as usize,
        "{count} failure lines from {} workers in {since:?} (the clients took {elapsed:?}):\n{}",
        workers.len(),
        rx.lines().join("\n")
    );
    // The failures held back are logged once their second is over, counted.
    rx.expect(
        DAEMON_NOTICE,
        &[failed, "more like this since the last notice"],
    );
}

/// A burst of lines bigger than the syslog socket's queue (net.unix.max_dgram_qlen, 10 by
/// default) is not lost while the syslog daemon is busy: the lines wait in the supervisor
/// and arrive once it reads again (in order: `log::tests`). (They were dropped and counted.)
#[test]
fn a_burst_of_lines_waits_for_a_busy_syslog() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-burst");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = logging_connections_to(&rx, &[b1.operand()], 1);
    rx.expect(DAEMON_NOTICE, &["started: listening on"]);
    rx.hold(true);
    // Each connection's line is sent when it closes: wait for the last one's close
    // before syslog reads again, so that the whole burst met a full queue.
    let clients = 60;
    let mut sent: Vec<u16> = (0..clients)
        .map(|_| {
            let conn =
                TcpStream::connect_timeout(&b.addr(), Duration::from_secs(10)).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let port = conn.local_addr().expect("local address").port();
            let mut line = String::new();
            let _ = BufReader::new(conn).read_line(&mut line);
            assert_eq!(line.trim_end(), "B1");
            port
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.count("bytes up"), 0, "the receiver read while held");
    rx.hold(false);
    let all = wait_until(Duration::from_secs(10), || rx.count("bytes up") >= clients);
    let lines = rx.lines();
    assert!(
        all,
        "{} of {clients} connection lines; got:\n{}",
        rx.count("bytes up"),
        lines.join("\n")
    );
    assert_eq!(
        rx.count("could not be delivered"),
        0,
        "{}",
        lines.join("\n")
    );
    // One line for each client, none twice.
    let mut ports: Vec<u16> = lines
        .iter()
        .filter(|l| l.contains("bytes up"))
        .filter_map(|l| {
            let from = l.split("connection from 127.0.0.1:").nth(1)?;
            from.split(' ').next()?.parse().ok()
        })
        .collect();
    ports.sort_unstable();
    sent.sort_unstable();
    assert_eq!(ports, sent, "{}", lines.join("\n"));
}

/// The control shell logs its own refusals: one that finds syslog's queue full waits
/// for room (a second at most) instead of losing the line. (It was dropped.)
#[test]
fn a_shell_refusal_waits_for_room_in_a_full_syslog_queue() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-shell-full");
    let rx = Receiver::bind(&dir.join("log"));
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = one_worker_logging_to(&rx, &[b1.operand()]);
    rx.expect(DAEMON_NOTICE, &["started: listening on"]);
    let bin = dir.join("balance");
    copy_binary(&bin);
    rx.hold(true);
    // Fill the queue as a burst of other programs' lines would.
    let filler = UnixDatagram::unbound().expect("socket");
    filler.connect(&rx.path).expect("connect");
    filler.set_nonblocking(true).expect("non-blocking");
    let mut filled = 0;
    while filled < 100_000 && filler.send(b"<13>filler").is_ok() {
        filled += 1;
    }
    assert!(filled < 100_000, "the queue never filled");
    let mut shell = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--run-dir")
        .arg(&b.run_dir)
        .args(["-b", "127.0.0.1", "--syslog-socket"])
        .arg(&rx.path)
        .args(["-c", "show", &b.port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the shell");
    // The shell (setpriv execs it, same pid) meets the full queue and waits for room in
    // poll(2); then syslog reads again, within the shell's second.
    let wchan = format!("/proc/{}/wchan", shell.id());
    let in_poll = || std::fs::read_to_string(&wchan).is_ok_and(|w| w.contains("poll"));
    wait_until(Duration::from_secs(10), || {
        in_poll() || shell.try_wait().ok().flatten().is_some()
    });
    let waiting = in_poll();
    rx.hold(false);
    let status = wait_for_exit(&mut shell, COMMAND_LIMIT);
    assert!(waiting, "the shell did not wait for room ({status:?})");
    assert_eq!(status.and_then(|s| s.code()), Some(71), "no access");
    rx.expect(AUTH_WARNING, &["refused access to", "for 'show'"]);
    assert_eq!(rx.count("filler"), filled, "the test's own lines");
}

/// With every channel unusable, each client is turned away: that is one warning a second,
/// not one per connection (clients could otherwise flood syslog at will).
#[test]
fn no_usable_channel_is_logged_once_a_second_not_once_a_connection() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("syslog-nochannel");
    let rx = Receiver::bind(&dir.join("log"));
    let b = one_worker_logging_to(&rx, &[refused_operand()]);
    let turned_away = "no channel could take the connection from 127.0.0.1:";
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(greeting(b.addr()), "", "nothing to connect to");
    }
    let elapsed = started.elapsed();
    rx.expect(DAEMON_WARNING, &[turned_away]);
    std::thread::sleep(Duration::from_millis(300));
    let count = rx.count(turned_away);
    assert!(
        count <= 2 + elapsed.as_secs() as usize,
        "{count} lines for 50 connections in {elapsed:?}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(greeting(b.addr()), "");
    rx.expect(
        DAEMON_WARNING,
        &[turned_away, "more like this since the last notice"],
    );
}
