//! The control shell through the real binary, as an operator uses it: `balance -c` and
//! `balance -i` against a running daemon, as root, as a read-only user and as a stranger,
//! with a writer that dies or stops while holding the table's lock.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `balance -c CMD` and checks its exit code; returns stdout.
fn control_ok(b: &Balance, cmd: &str) -> String {
    let o = b.control(cmd);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{cmd}: {} {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Connects through balance, sends `payload`, reads the greeting and the echo; returns the
/// backend's tag.
fn exchange(b: &Balance, payload: &[u8]) -> String {
    let mut conn = TcpStream::connect_timeout(&b.addr(), Duration::from_secs(10)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(payload).expect("send");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut tag = String::new();
    reader.read_line(&mut tag).expect("greeting");
    let mut echo = vec![0u8; payload.len()];
    reader.read_exact(&mut echo).expect("echo");
    assert_eq!(echo, payload);
    tag.trim_end().to_string()
}

fn backends(n: usize) -> Vec<Backend> {
    (1..=n)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect()
}

fn operands(bs: &[Backend]) -> Vec<String> {
    bs.iter().map(Backend::operand).collect()
}

#[test]
fn show_and_mrtg_after_traffic() {
    if !require_root() {
        return;
    }
    let bs = backends(3);
    let b = Balance::start(&[], &operands(&bs));
    let tags: Vec<String> = (0..4).map(|_| exchange(&b, b"abcdef\n")).collect();
    assert_eq!(tags, ["B1", "B2", "B3", "B1"]);
    let path = b.table_path();
    assert!(
        wait_until(Duration::from_secs(5), || {
            counters(&path, 0, 0) == (0, 2, 14, 20) && counters(&path, 0, 2) == (0, 1, 7, 10)
        }),
        "counters: {:?}",
        counters(&path, 0, 0)
    );
    let row = |c: usize, port: u16, total: u64, sent: u64, rcvd: u64| {
        format!(
            "  0   RR {c:2} ENA        127.0.0.1 {port:5}    0 {total:11}    0 {sent:11} {rcvd:11}"
        )
    };
    let expected = [
        "GRP Type  #   S       ip-address  port    c      totalc maxc        sent        rcvd"
            .to_string(),
        row(0, bs[0].port(), 2, 14, 20),
        row(1, bs[1].port(), 1, 7, 10),
        row(2, bs[2].port(), 1, 7, 10),
    ]
    .join("\n")
        + "\n";
    assert_eq!(control_ok(&b, "show"), expected);
    assert_eq!(control_ok(&b, "s"), expected, "prefix");
    assert_eq!(
        control_ok(&b, "mrtg-bytes 0 0"),
        "20\n14\nUNKNOWN\ngroup 0 channel 0\n"
    );
    assert_eq!(
        control_ok(&b, "mrtg-conns 0 1"),
        "1\nUNKNOWN\nUNKNOWN\ngroup 0 channel 1\n"
    );
    for (cmd, text) in [
        ("mrtg-bytes 32 0", "unknown group\n"),
        ("mrtg-bytes 0 3", "unknown channel\n"),
        ("mrtg-bytes 0", "syntax error\n"),
        ("bogus", "syntax error\n"),
    ] {
        let o = b.control(cmd);
        assert_eq!(
            (o.status.code(), stdout(&o).as_str()),
            (Some(65), text),
            "{cmd}"
        );
    }
    let json = control_ok(&b, "show json");
    assert!(
        json.starts_with(&format!("{{\"supervisor_pid\":{},", b.pid)),
        "{json}"
    );
    assert!(
        json.contains("\"channel\":0,\"enabled\":true,\"address\":\"127.0.0.1\""),
        "{json}"
    );
    // --json on the command line makes show print JSON too.
    let o = Command::new(BIN)
        .arg("--run-dir")
        .arg(&b.run_dir)
        .args([
            "-b",
            "127.0.0.1",
            "--json",
            "-c",
            "show",
            &b.port.to_string(),
        ])
        .output_within(COMMAND_LIMIT)
        .expect("run");
    assert_eq!(stdout(&o), json);
    assert_eq!(
        control_ok(&b, "stats"),
        format!(
            "supervisor pid {}\ngroups 1, channels 3 (3 enabled)\n\
             connections: 0 open, 4 in total\nbytes: 28 sent, 40 received\n",
            b.pid
        )
    );
    assert_eq!(
        control_ok(&b, "stats json"),
        format!(
            "{{\"supervisor_pid\":{},\"groups\":1,\"channels\":3,\"enabled\":3,\
             \"current\":0,\"total\":4,\"sent\":28,\"received\":40}}\n",
            b.pid
        )
    );
    let version = control_ok(&b, "version");
    assert!(
        version.contains("\n  MAXGROUPS=32\n  MAXCHANNELS=64\n"),
        "{version}"
    );
    assert_eq!(control_ok(&b, ""), "");
}

#[test]
fn disabled_channel_gets_no_traffic_and_maxc_limits() {
    if !require_root() {
        return;
    }
    let bs = backends(3);
    let b = Balance::start(&[], &operands(&bs));
    assert_eq!(control_ok(&b, "disable 1"), "channel 1 disabled\n");
    assert_eq!(control_ok(&b, "disable 1"), "channel 1 already disabled\n");
    let o = b.control("disable 3");
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(65), "no such channel 3\n".into())
    );
    let tags: Vec<String> = (0..6).map(|_| greeting(b.addr())).collect();
    assert!(!tags.iter().any(|t| t == "B2"), "{tags:?}");
    assert_eq!(bs[1].accepted(), 0);
    assert!(control_ok(&b, "show").contains(&format!(" 1 dis        127.0.0.1 {:5}", bs[1].port())));

    assert_eq!(
        control_ok(&b, "maxc 0 1"),
        "maxc of channel 0 changed to 1\n"
    );
    let mut held = Vec::new();
    while !held.iter().any(|(_, t): &(TcpStream, String)| t == "B1") {
        assert!(held.len() < 4, "B1 never chosen: {held:?}");
        held.push(hold(b.addr()));
    }
    let more: Vec<String> = (0..3).map(|_| greeting(b.addr())).collect();
    assert!(more.iter().all(|t| t == "B3"), "B1 is full: {more:?}");
    assert_eq!(control_ok(&b, "enable 1"), "channel 1 enabled\n");
}

#[test]
fn create_enable_assign_reset() {
    if !require_root() {
        return;
    }
    let bs = backends(3);
    let b = Balance::start(&[], &[bs[0].operand()]);
    assert_eq!(
        control_ok(&b, &format!("create {}", bs[1].operand())),
        "channel created\n"
    );
    assert!(control_ok(&b, "show").contains(&format!(" 1 dis        127.0.0.1 {:5}", bs[1].port())));
    assert!(
        (0..4).all(|_| greeting(b.addr()) == "B1"),
        "a new channel starts disabled"
    );
    control_ok(&b, "enable 1");
    // A new port: the workers are replaced so that their sandbox admits it.
    assert!(
        wait_until(Duration::from_secs(10), || greeting(b.addr()) == "B2"),
        "the new channel gets traffic"
    );

    let o = b.control(&format!("assign 0 127.0.0.1 {}", bs[2].port()));
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (
            Some(65),
            "channel must be disabled to assign new address\n".into()
        )
    );
    control_ok(&b, "disable 0");
    let o = b.control("assign 0 nosuchhost.invalid 80");
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(65), "invalid address\n".into())
    );
    assert_eq!(
        control_ok(&b, &format!("assign 0 127.0.0.1 {}", bs[2].port())),
        "channel reassigned\n"
    );
    control_ok(&b, "enable 0");
    assert!(
        wait_until(Duration::from_secs(10), || greeting(b.addr()) == "B3"),
        "the reassigned channel gets traffic"
    );
    let tags: Vec<String> = (0..4).map(|_| greeting(b.addr())).collect();
    assert!(!tags.iter().any(|t| t == "B1"), "{tags:?}");

    let path = b.table_path();
    assert!(wait_until(Duration::from_secs(5), || counters(&path, 0, 0)
        .1
        >= 2));
    assert_eq!(control_ok(&b, "r 0"), "channel 0 counters reset\n");
    let (_, total, sent, rcvd) = counters(&path, 0, 0);
    assert_eq!((total, sent, rcvd), (0, 0, 0));
}

/// `create` and `assign` to a port the daemon's workers do not admit yet return only once
/// they do: the channel works as soon as it is enabled (it used to refuse clients for the
/// 200 ms or so the daemon took to notice the port and replace its workers).
#[test]
fn a_channel_on_a_new_port_works_as_soon_as_the_command_returns() {
    if !require_root() {
        return;
    }
    let bs = backends(3);
    let b = Balance::start(&["-d"], &[bs[0].operand()]);
    let steps = [
        (
            format!("create {}", bs[1].operand()),
            "channel created\n",
            ["enable 1", "disable 0"],
            "B2",
        ),
        (
            format!("assign 0 127.0.0.1 {}", bs[2].port()),
            "channel reassigned\n",
            ["enable 0", "disable 1"],
            "B3",
        ),
    ];
    for (command, reply, switch, tag) in steps {
        let o = b.control(&command);
        assert_eq!(
            (o.status.code(), stdout(&o), stderr(&o)),
            (Some(0), reply.into(), String::new())
        );
        for cmd in switch {
            control_ok(&b, cmd);
        }
        assert_eq!(greeting(b.addr()), tag, "{}", b.stderr());
    }
    assert!(
        !b.stderr().contains("not admitted"),
        "no worker met a port its sandbox refuses: {}",
        b.stderr()
    );
}

#[test]
fn interactive_session_through_a_pipe() {
    if !require_root() {
        return;
    }
    let bs = backends(2);
    let b = Balance::start(&[], &operands(&bs));
    let mut child = Command::new(BIN)
        .arg("--run-dir")
        .arg(&b.run_dir)
        .args(["-b", &b.bind, "-i", &b.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn -i");
    let script = format!(
        "group 1\ncreate 127.0.0.1 {}\nha\nrr\ngroup 32\nSHOW\ngroup 0\ndisable 1\n",
        bs[0].port()
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write");
    let o = wait_output(child, Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    // The original's line, which scripts may look for.
    assert!(
        out.contains(&format!("\nPID of master process is {}\n", b.pid)),
        "{out}"
    );
    assert!(
        out.ends_with(
            "balance[0] balance[1] channel created\nbalance[1] group 1 set to hash\n\
             balance[1] group 1 set to round robin\nbalance[1] value out of range\n\
             balance[1] syntax error\nbalance[1] balance[0] channel 1 disabled\nbalance[0] \n"
        ),
        "{out}"
    );
}

#[test]
fn kill_stops_the_daemon_and_removes_the_table() {
    if !require_root() {
        return;
    }
    let bs = backends(1);
    let mut b = Balance::start(&[], &operands(&bs));
    let start = Instant::now();
    let o = b.control("kill");
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(0), "shutdown complete, exiting.\n".into()),
        "{}",
        stderr(&o)
    );
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(wait_until(Duration::from_secs(5), || is_dead(b.pid)));
    assert!(!b.table_path().exists());
    let o = b.control("show");
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(69), "no master process, exiting.\n".into())
    );
    b.terminate();
}

/// A kill that does not finish (the supervisor is stopped) says so and is withdrawn: the
/// supervisor does not shut down later, when it runs again.
#[test]
fn a_kill_that_fails_is_withdrawn() {
    if !require_root() {
        return;
    }
    let bs = backends(1);
    let b = Balance::start(&[], &operands(&bs));
    signal(b.pid, nix::sys::signal::Signal::SIGSTOP);
    let o = b.control("kill");
    signal(b.pid, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(69), "shutdown failed.\n".into()),
        "{}",
        stderr(&o)
    );
    // Several of the supervisor's 200 ms looks at the flag.
    std::thread::sleep(Duration::from_secs(1));
    assert!(!is_dead(b.pid), "shut down after all: {}", b.stderr());
    assert_eq!(greeting(b.addr()), bs[0].tag, "not serving: {}", b.stderr());
}

/// The binary, copied where user `nobody` can execute it (the build dir may be private).
fn public_binary() -> PathBuf {
    let dir = temp_dir("bin");
    let bin = dir.join("balance");
    copy_binary(&bin);
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// Runs `balance -c CMD` against `b` as user nobody, with `groups` as supplementary groups.
fn control_as_nobody(bin: &Path, b: &Balance, groups: Option<&str>, cmd: &str) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg(bin)
        .arg("--run-dir")
        .arg(&b.run_dir)
        .args(["-b", &b.bind, "-c", cmd, &b.port.to_string()])
        .stdin(Stdio::null())
        .output_within(COMMAND_LIMIT)
        .expect("run setpriv")
}

#[test]
fn control_group_reads_and_strangers_are_refused() {
    if !require_root() {
        return;
    }
    let bs = backends(2);
    let b = Balance::start(&[], &operands(&bs));
    let bin = public_binary();
    let path = b.table_path();

    let o = control_as_nobody(&bin, &b, Some("balance"), "show");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("GRP Type"), "{}", stdout(&o));
    let o = control_as_nobody(&bin, &b, Some("balance"), "mrtg-conns 0 1");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for cmd in ["disable 0", "kill", "create 127.0.0.1 1"] {
        let o = control_as_nobody(&bin, &b, Some("balance"), cmd);
        assert_eq!(o.status.code(), Some(77), "{cmd}");
        assert!(
            stderr(&o).contains(&format!("read-only access to {}", path.display())),
            "{}",
            stderr(&o)
        );
    }
    assert!(
        control_ok(&b, "show").contains(" 0 ENA "),
        "nothing changed"
    );
    assert!(!is_dead(b.pid));

    let o = control_as_nobody(&bin, &b, None, "show");
    assert_eq!(o.status.code(), Some(71), "{}", stdout(&o));
    assert!(
        stderr(&o).contains(&format!(
            "cannot open {}: Permission denied",
            path.display()
        )),
        "{}",
        stderr(&o)
    );
}

/// Not a test on its own: started by the lock tests as a child process (this test binary,
/// with BALANCE_TEST_HOLD_LOCK set), it takes the table's writer lock and keeps it.
#[test]
#[ignore = "helper process, started by the lock tests"]
fn lock_holder_helper() {
    let path = std::env::var("BALANCE_TEST_HOLD_LOCK").expect("BALANCE_TEST_HOLD_LOCK");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open table");
    let table = balance::table::Table::open(&file, true).expect("map table");
    let _ = table.update(|_| {
        println!("holding the lock");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// A [`lock_holder_helper`] process, SIGKILLed and reaped when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        signal(self.0.id(), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Starts [`lock_holder_helper`] on `table` and waits until it holds the lock.
fn start_lock_holder(table: &Path) -> Holder {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "--ignored",
            "lock_holder_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BALANCE_TEST_HOLD_LOCK", table)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lock holder");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("holding the lock") {
        line.clear();
        if reader.read_line(&mut line).expect("read") == 0 {
            panic!("lock holder exited early");
        }
    }
    Holder(child)
}

#[test]
fn stopped_lock_holder_times_out_and_dead_one_is_recovered() {
    if !require_root() {
        return;
    }
    let bs = backends(2);
    let b = Balance::start(&[], &operands(&bs));
    let holder = start_lock_holder(&b.table_path());
    signal(holder.0.id(), Signal::SIGSTOP);

    let start = Instant::now();
    let o = b.control("disable 0");
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(75), "{} {}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("locked by another writer"),
        "{}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // Reading never needs the lock, except to repair: the holder is mid-update, so `show`
    // reports the same lock instead of hanging.
    let o = b.control("show");
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    // The workers never take the lock: traffic flows while a writer is stuck.
    for _ in 0..4 {
        let tag = greeting(b.addr());
        assert!(tag == "B1" || tag == "B2", "{tag:?}");
    }

    drop(holder);
    let start = Instant::now();
    assert_eq!(control_ok(&b, "disable 0"), "channel 0 disabled\n");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "no wait for a dead holder"
    );
    assert!(control_ok(&b, "show").contains(" 0 dis "));
    assert!((0..3).all(|_| greeting(b.addr()) == "B2"));
}

/// Waits for a child's output with a deadline, killing it when the deadline passes.
fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let o = child.wait_with_output().expect("output");
    panic!(
        "child did not finish: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn a_stale_table_is_reported_and_never_signals_anyone() {
    if !require_root() {
        return;
    }
    let bs = backends(1);
    let mut b = Balance::start(&[], &operands(&bs));
    let workers = b.workers();
    // The supervisor dies without cleaning up: its table file stays behind.
    signal(b.pid, Signal::SIGKILL);
    let status = b.child.take().map(|mut c| c.wait());
    assert!(status.is_some());
    assert!(wait_until(Duration::from_secs(5), || workers
        .iter()
        .all(|w| is_dead(*w))));
    assert!(b.table_path().exists());
    let o = b.control("show");
    assert_eq!(o.status.code(), Some(69));
    // The original's message for a table whose master is gone names its pid.
    assert_eq!(
        stdout(&o),
        format!("no master process with pid {}, exiting.\n", b.pid)
    );
    let o = b.control("kill");
    assert_eq!(o.status.code(), Some(69));
}

#[test]
fn squatted_files_are_refused_never_adopted() {
    if !require_root() {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("nobody");
    let bs = backends(1);
    // A run directory created by another user is refused.
    let dir = temp_dir("squat");
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("mkdir");
    nix::unistd::chown(&run, Some(nobody.uid), Some(nobody.gid)).expect("chown");
    let port = free_port();
    let o = Command::new(BIN)
        .args(["-f", "--run-dir"])
        .arg(&run)
        .args(["-b", "127.0.0.1", &port.to_string(), &bs[0].operand()])
        .output_within(COMMAND_LIMIT)
        .expect("run");
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("refusing to adopt it"),
        "{}",
        stderr(&o)
    );

    // A table file planted by another user is replaced, not adopted.
    let run = temp_dir("squat2").join("run");
    std::fs::create_dir(&run).expect("mkdir");
    let port = free_port();
    let planted = run.join(format!("balance.{port}.127.0.0.1"));
    std::fs::write(&planted, b"planted").expect("plant");
    nix::unistd::chown(&planted, Some(nobody.uid), Some(nobody.gid)).expect("chown");
    let b = Balance::start_with(Start {
        operands: &operands(&bs),
        port: Some(port),
        run_dir: Some(&run),
        ..Start::default()
    });
    assert_eq!(b.table_path(), planted);
    let meta = std::fs::metadata(b.table_path()).expect("table");
    assert_eq!(meta.uid(), 0, "the daemon's own table, owned by root");
    assert!(control_ok(&b, "show").contains("ENA"));
    // And a client refuses a table that is not root's.
    nix::unistd::chown(&b.table_path(), Some(nobody.uid), None).expect("chown");
    let o = b.control("show");
    assert_eq!(o.status.code(), Some(71), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to use"), "{}", stderr(&o));
}

#[test]
fn control_group_option_chooses_who_may_read() {
    if !require_root() {
        return;
    }
    let bs = backends(1);
    let b = Balance::start(&["--control-group", "nogroup"], &operands(&bs));
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .expect("nogroup");
    assert_eq!(
        std::fs::metadata(b.table_path()).expect("table").gid(),
        nogroup.gid.as_raw()
    );
    let bin = public_binary();
    // The run directory belongs to the service user: readers traverse it through "other".
    let as_nobody_in = |group: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                &format!("--regid={group}"),
                "--clear-groups",
            ])
            .arg(&bin)
            .arg("--run-dir")
            .arg(&b.run_dir)
            .args(["-b", "127.0.0.1", "-c", "show", &b.port.to_string()])
            .output_within(COMMAND_LIMIT)
            .expect("setpriv")
    };
    let o = as_nobody_in("nogroup");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("GRP Type"));
    let o = as_nobody_in("balance");
    assert_eq!(o.status.code(), Some(71), "group balance no longer reads");
    // The refusal names the daemon's control group, not this shell's default.
    assert!(
        stderr(&o).contains("reading needs membership in group nogroup"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn hash_and_rr_switch_the_distribution_at_once() {
    if !require_root() {
        return;
    }
    let bs = backends(3);
    let b = Balance::start(&[], &operands(&bs));
    let round: Vec<String> = (0..3).map(|_| greeting(b.addr())).collect();
    let mut sorted = round.clone();
    sorted.sort();
    assert_eq!(sorted, ["B1", "B2", "B3"], "round robin first");
    assert_eq!(control_ok(&b, "hash"), "group 0 set to hash\n");
    // 127.0.0.1 hashes to channel 2 of 3.
    assert!((0..4).all(|_| greeting(b.addr()) == "B3"));
    assert_eq!(control_ok(&b, "rr"), "group 0 set to round robin\n");
    let tags: Vec<String> = (0..3).map(|_| greeting(b.addr())).collect();
    let mut sorted = tags.clone();
    sorted.sort();
    assert_eq!(sorted, ["B1", "B2", "B3"], "{tags:?}");
}

#[test]
fn interactive_shell_on_a_terminal() {
    if !require_root() {
        return;
    }
    let bs = backends(1);
    let b = Balance::start(&[], &operands(&bs));
    // script(1) runs the shell on a pseudo-terminal and passes our input to it.
    let shell = format!(
        "{BIN} --run-dir {} -b 127.0.0.1 -i {}",
        b.run_dir.display(),
        b.port
    );
    let mut child = Command::new("script")
        .args(["-qefc", &shell, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    {
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(b"show\nversion\nquit\n").expect("type");
    }
    let o = wait_output(child, Duration::from_secs(10));
    let out = stdout(&o);
    assert!(out.contains("balance[0] "), "{out}");
    assert!(out.contains("GRP Type"), "{out}");
    assert!(out.contains("MAXGROUPS=32"), "{out}");
    assert_eq!(o.status.code(), Some(0), "{out}");
}

/// A stop marks the table stopping under its lock before the supervisor reads the audit
/// ring a last time, so that a shell attached to it can make no change that would go
/// unlogged (such changes were confirmed with exit 0 and lost).
#[test]
fn a_stop_closes_the_table_to_changes() {
    if !require_root() {
        return;
    }
    let backends = backends(1);
    let mut b = Balance::start(&[], &operands(&backends));
    let (_file, table) = writable_table(&b);
    assert_eq!(
        table
            .header()
            .shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(b.terminate().and_then(|s| s.code()), Some(0));
    assert_ne!(
        table
            .header()
            .shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "{}",
        b.stderr()
    );
}

/// A writer that died mid-update leaves the configuration's count odd: the supervisor
/// repairs it within a tick and puts it on record, so that read-only monitoring gets a
/// consistent copy again without waiting for a root shell.
#[test]
fn the_supervisor_repairs_a_dead_writers_table() {
    if !require_root() {
        return;
    }
    let backends = backends(1);
    let b = Balance::start(&["-d"], &operands(&backends));
    let (_file, writable) = writable_table(&b);
    writable
        .header()
        .seq
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (_f, read_only) = table(&b.table_path());
    assert!(read_only.snapshot().is_none());
    assert!(
        wait_until(Duration::from_secs(2), || read_only.snapshot().is_some()),
        "{}",
        b.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(2), || b.logged("previous writer died")),
        "{}",
        b.stderr()
    );
}

/// A shell makes no change while the audit ring holds nothing but records the supervisor
/// has not logged (the change's record would overwrite one). With the supervisor stopped,
/// it refuses after its wait (exit 75) and the channel stays as it was; once the
/// supervisor runs again, it logs the ring, marks it read, and the change goes through.
#[test]
fn a_change_waits_for_the_supervisor_to_log_the_audit_ring() {
    if !require_root() {
        return;
    }
    let backends = backends(2);
    let b = Balance::start(&["-d"], &operands(&backends));
    let (_file, table) = writable_table(&b);
    signal(b.pid, nix::sys::signal::Signal::SIGSTOP);
    table
        .update(|w| {
            for i in 0..balance::table::AUDIT_SLOTS {
                w.append_audit(&format!("filler record {i}"));
            }
        })
        .expect("fill the ring");
    let start = Instant::now();
    let refused = b.control("disable 1");
    let waited = start.elapsed();
    signal(b.pid, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(refused.status.code(), Some(75), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("change not made"),
        "{}",
        stderr(&refused)
    );
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    assert!(control_ok(&b, "show").contains(" 1 ENA "), "still enabled");
    assert!(b.logged("filler record 255"), "{}", b.stderr());
    assert!(!b.stderr().contains("overwritten"), "{}", b.stderr());
    let start = Instant::now();
    control_ok(&b, "disable 1");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        b.logged("disable group 0 channel 1: enabled -> disabled"),
        "{}",
        b.stderr()
    );
}

/// The instance's table, mapped writable (as root, like a writing shell).
fn writable_table(b: &Balance) -> (std::fs::File, balance::table::Table) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.table_path())
        .expect("open the table");
    let table = balance::table::Table::open(&file, true).expect("map the table");
    (file, table)
}
