//! Channel selection through the real binary: round robin, maxc across workers, hash groups,
//! failover, connect timeout, autodisable, source address, IPv6 backends.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tags(b: &Balance, n: usize) -> Vec<String> {
    (0..n).map(|_| greeting(b.addr())).collect()
}

/// Whether channel `c` of group 0 is enabled in `b`'s table (None: no consistent copy).
fn enabled(b: &Balance, c: usize) -> Option<bool> {
    let (_f, t) = table(&b.table_path());
    t.snapshot().map(|s| s.groups[0].channels[c].enabled)
}

#[test]
fn round_robin_in_order() {
    if !require_root() {
        return;
    }
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let ops: Vec<String> = backends.iter().map(Backend::operand).collect();
    let b = Balance::start(&[], &ops);
    assert_eq!(tags(&b, 7), ["B1", "B2", "B3", "B1", "B2", "B3", "B1"]);
}

/// A negative maxc on the command line, as the original accepted it: a standby channel,
/// never chosen until the shell's `maxc` gives it a limit it can meet.
#[test]
fn a_negative_maxc_makes_a_standby_channel() {
    if !require_root() {
        return;
    }
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b = Balance::start(&[], &[format!("{}:-1", b1.operand()), b2.operand()]);
    assert_eq!(tags(&b, 3), ["B2", "B2", "B2"]);
    let out = b.control("maxc 0 0");
    assert!(out.status.success(), "{out:?}");
    let mut seen = tags(&b, 2);
    seen.sort();
    assert_eq!(seen, ["B1", "B2"]);
}

#[test]
fn round_robin_skips_disabled_and_failed_channels() {
    if !require_root() {
        return;
    }
    // [B1, dead, B2]: the dead channel fails over to B2 at once, as in the original.
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b = Balance::start(&[], &[b1.operand(), refused_operand(), b2.operand()]);
    let start = Instant::now();
    assert_eq!(tags(&b, 4), ["B1", "B2", "B1", "B2"]);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "refused must fail over at once"
    );
    let (cur, total, _, _) = counters(&b.table_path(), 0, 1);
    assert_eq!((cur, total), (0, 0), "failed attempts leave nothing behind");
}

#[test]
fn maxc_is_enforced_across_workers() {
    if !require_root() {
        return;
    }
    // [B1:1, B2:1] ! [B3]: with two workers, held connections still respect maxc globally.
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b3 = Backend::start("B3", Behaviour::TagEcho);
    let b = Balance::start(
        &[],
        &[
            format!("{}:1", b1.operand()),
            format!("{}:1", b2.operand()),
            "!".into(),
            b3.operand(),
        ],
    );
    let held: Vec<_> = (0..4).map(|_| hold(b.addr())).collect();
    let mut got: Vec<&str> = held.iter().map(|(_, t)| t.as_str()).collect();
    got.sort_unstable();
    assert_eq!(got, ["B1", "B2", "B3", "B3"]);
    assert_eq!(counters(&b.table_path(), 0, 0).0, 1);
    assert_eq!(counters(&b.table_path(), 0, 1).0, 1);
    assert_eq!(counters(&b.table_path(), 1, 0).0, 2);
    drop(held);
    let path = b.table_path();
    assert!(
        wait_until(Duration::from_secs(5), || {
            (0..2).all(|c| counters(&path, 0, c).0 == 0) && counters(&path, 1, 0).0 == 0
        }),
        "current counts return to zero"
    );
    // Freed slots are used again.
    let again: Vec<_> = (0..2).map(|_| hold(b.addr())).collect();
    let mut got: Vec<&str> = again.iter().map(|(_, t)| t.as_str()).collect();
    got.sort_unstable();
    assert_eq!(got, ["B1", "B2"]);
}

#[test]
fn hash_group_keeps_each_client_on_its_channel() {
    if !require_root() {
        return;
    }
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let mut ops: Vec<String> = backends.iter().map(Backend::operand).collect();
    ops.push("%".into());
    let b = Balance::start(&[], &ops);
    // Expected channel = the original's dual-stack hash mod 3 (reference §3.3).
    let cases = [
        ("127.0.0.1", 2),
        ("127.0.0.2", 1),
        ("127.0.0.3", 0),
        ("127.0.0.4", 2),
        ("127.0.0.5", 1),
        ("127.1.2.3", 1),
    ];
    for (client, channel) in cases {
        let ip: IpAddr = client.parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(
                greeting_from(ip, b.addr()),
                format!("B{}", channel + 1),
                "client {client}"
            );
        }
    }
}

#[test]
fn hash_group_hashes_ipv6_clients_too() {
    if !require_root() {
        return;
    }
    let backends: Vec<Backend> = (1..=4)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let mut ops: Vec<String> = backends.iter().map(Backend::operand).collect();
    ops.push("%".into());
    let b = Balance::start_with(Start {
        operands: &ops,
        bind: "::1",
        ..Start::default()
    });
    // ::1 hashes to 4001564289: channel 1 of 4 (reference §3.3).
    for _ in 0..3 {
        assert_eq!(greeting(b.addr()), "B2");
    }
}

#[test]
fn hash_without_failover_moves_to_the_next_group_and_with_h_stays() {
    if !require_root() {
        return;
    }
    // 127.0.0.1 hashes to channel 2 of 3 here: make that one refuse.
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b4 = Backend::start("B4", Behaviour::TagEcho);
    let ops = vec![
        b1.operand(),
        b2.operand(),
        refused_operand(),
        "%".into(),
        b4.operand(),
    ];
    let plain = Balance::start(&[], &ops);
    assert_eq!(greeting(plain.addr()), "B4");
    drop(plain);
    let failover = Balance::start(&["-H"], &ops);
    // -H: the rest of the hash group in order, wrapping: channel 0.
    assert_eq!(greeting(failover.addr()), "B1");
}

#[test]
fn fall_through_skips_disabled_channels_of_later_groups() {
    if !require_root() {
        return;
    }
    // The original used a disabled channel of a fallback group (reference §11.23).
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b3 = Backend::start("B3", Behaviour::TagEcho);
    let b = Balance::start(
        &[],
        &[refused_operand(), "!".into(), b2.operand(), b3.operand()],
    );
    let path = b.table_path();
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open table rw");
        let t = balance::table::Table::open(&file, true).expect("map");
        t.update(|w| w.set_enabled(1, 0, false)).expect("disable");
    }
    assert_eq!(tags(&b, 3), ["B3", "B3", "B3"]);
    assert_eq!(b2.accepted(), 0);
}

#[test]
fn connect_timeout_fails_over_after_t_seconds() {
    if !require_root() {
        return;
    }
    let hole = Blackhole::start();
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&["-t", "1"], &[hole.operand(), b1.operand()]);
    let start = Instant::now();
    assert_eq!(greeting(b.addr()), "B1");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "waited {waited:?}"
    );
}

/// A connection that fails over inside a round-robin group after a slow connect does not
/// rewind the rotation that connections started meanwhile have moved on (the original's
/// child did: reference §8.15); without such connections, a failover moves it on as the
/// original did.
#[test]
fn a_failover_does_not_rewind_the_rotation() {
    if !require_root() {
        return;
    }
    let hole = Blackhole::start();
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("B{i}"), Behaviour::TagEcho))
        .collect();
    let mut ops = vec![hole.operand()];
    ops.extend(backends.iter().map(Backend::operand));
    let b = Balance::start_with(Start {
        flags: &["-t", "1"],
        operands: &ops,
        workers: 1,
        ..Start::default()
    });
    let addr = b.addr();
    // The first connection waits a second on the black hole, then fails over to B1.
    let slow = std::thread::spawn(move || greeting(addr));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tags(&b, 2), ["B1", "B2"], "while the first one waits");
    assert_eq!(slow.join().expect("first connection"), "B1");
    // The rotation goes on after B2; the black hole's turn fails over to B1 and moves it on.
    assert_eq!(tags(&b, 3), ["B3", "B1", "B2"]);
}

/// A client that resets while its backend connect is still under way gives its place
/// under maxc back at once, not when the connect times out.
#[test]
fn a_client_reset_during_the_connect_frees_its_place_at_once() {
    if !require_root() {
        return;
    }
    let hole = Blackhole::start();
    let b = Balance::start_with(Start {
        flags: &["-t", "5"],
        operands: &[format!("{}:1", hole.operand())],
        workers: 1,
        ..Start::default()
    });
    let path = b.table_path();
    let client = TcpStream::connect(b.addr()).expect("connect");
    assert!(
        wait_until(Duration::from_secs(3), || counters(&path, 0, 0).0 == 1),
        "the connect attempt holds the place"
    );
    let now = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &now)
        .expect("SO_LINGER");
    let reset_at = Instant::now();
    drop(client);
    assert!(
        wait_until(Duration::from_secs(3), || counters(&path, 0, 0).0 == 0),
        "the place is still held"
    );
    assert!(
        reset_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        reset_at.elapsed()
    );
}

/// A backend that accepts and at once resets made a connection, as the original's blocking
/// connect had it: the client is closed, no other channel is tried, and `-a` leaves the
/// channel enabled. The worker is held stopped while the handshake completes and the
/// backend resets, so that it finds the reset already on the socket at its first look
/// (where it used to fail over, and `-a` disabled the channel; when it looked before the
/// reset it relayed, so the outcome hung on timing).
#[test]
fn a_backend_that_resets_at_once_made_a_connection() {
    if !require_root() {
        return;
    }
    use nix::sys::signal::Signal;
    use nix::sys::socket::SockaddrIn;
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType};
    use std::io::Read;
    use std::os::fd::AsRawFd;

    /// Resumes a stopped worker however the test ends.
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            signal(self.0, Signal::SIGCONT);
        }
    }

    // A listener with a one-place queue, taken: the worker's SYN is dropped and retried
    // a second later.
    let listener = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .expect("socket");
    socket::bind(listener.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
    socket::listen(&listener, Backlog::new(0).expect("backlog")).expect("listen");
    let port = socket::getsockname::<SockaddrIn>(listener.as_raw_fd())
        .expect("getsockname")
        .port();
    let filler = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("filler");
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        flags: &["-a", "-d", "-t", "5", "--log-connections"],
        operands: &[format!("127.0.0.1:{port}"), b2.operand()],
        workers: 1,
        ..Start::default()
    });
    let path = b.table_path();
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert!(
        wait_until(Duration::from_secs(3), || counters(&path, 0, 0).0 == 1),
        "no connect to channel 0 under way"
    );
    let worker = b.workers()[0];
    signal(worker, Signal::SIGSTOP);
    let resume = Resume(worker);

    // Room in the queue: the retried SYN completes the handshake, then the reset.
    drop(socket::accept(&listener).expect("accept the filler"));
    drop(filler);
    let mut from_worker = None;
    assert!(
        wait_until(Duration::from_secs(4), || {
            from_worker = socket::accept(&listener).ok();
            from_worker.is_some()
        }),
        "the worker's retried SYN never arrived"
    );
    let conn = from_worker.expect("accepted");
    let now = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    socket::setsockopt(&conn, sockopt::Linger, &now).expect("SO_LINGER");
    drop(conn);
    std::thread::sleep(Duration::from_millis(100));
    drop(resume);

    let mut buf = [0u8; 64];
    let got = client.read(&mut buf);
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "the client got {:?} (failed over)",
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    assert_eq!(b2.accepted(), 0, "failed over to channel 1");
    assert!(
        wait_until(Duration::from_secs(3), || counters(&path, 0, 0).0 == 0),
        "the place is still held"
    );
    assert_eq!(counters(&path, 0, 0).1, 1, "not counted as a connection");
    assert!(
        enabled(&b, 0).expect("snapshot"),
        "-a disabled the channel; stderr:\n{}",
        b.stderr()
    );
    // Logged like any connection, though the reset socket has no peer address left.
    assert!(
        b.logged(&format!("via group 0 channel 0 (127.0.0.1:{port})")),
        "{}",
        b.stderr()
    );
}

#[test]
fn all_channels_failing_closes_the_client() {
    if !require_root() {
        return;
    }
    let b = Balance::start(
        &["-t", "1"],
        &[refused_operand(), "!".into(), refused_operand()],
    );
    let start = Instant::now();
    assert_eq!(greeting(b.addr()), "", "closed without data");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn autodisable_marks_a_failed_channel_disabled() {
    if !require_root() {
        return;
    }
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b2 = Backend::start("B2", Behaviour::TagEcho);
    let dead = refused_operand();
    let b = Balance::start(&["-a"], &[b1.operand(), dead.clone(), b2.operand()]);
    assert_eq!(tags(&b, 2), ["B1", "B2"]);
    assert!(
        wait_until(Duration::from_secs(5), || enabled(&b, 1) == Some(false)),
        "channel 1 disabled in the table"
    );
    // From now on the disabled channel is skipped: strict alternation of the live ones.
    assert_eq!(tags(&b, 4), ["B1", "B2", "B1", "B2"]);
    assert!(
        b.logged(&format!(
            "{dead} needs to be enabled manually using balance -i after the problem is solved"
        )),
        "stderr:\n{}",
        b.stderr()
    );
}

/// With `-a`, a disable request that finds the table locked (a shell stopped while holding
/// the lock) waits for the lock without holding the supervisor up, which used to wait two
/// seconds per request: signals, restarts and reloads waited with it.
#[test]
fn autodisable_does_not_wait_on_a_locked_table() {
    if !require_root() {
        return;
    }
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        flags: &["-a"],
        operands: &[refused_operand(), b1.operand()],
        workers: 1,
        ..Start::default()
    });
    let path = b.table_path();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let holder_path = path.clone();
    let holder = std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&holder_path)
            .expect("open the table");
        let t = balance::table::Table::open(&file, true).expect("map the table");
        t.update(|_| {
            let _ = locked_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(20));
        })
        .expect("take the lock");
    });
    locked
        .recv_timeout(Duration::from_secs(5))
        .expect("the lock taken");
    // Connects to channel 0 are refused: each asks for it to be disabled.
    assert_eq!(tags(&b, 6), ["B1"; 6]);
    let asked = Instant::now();
    signal(b.pid, nix::sys::signal::Signal::SIGHUP);
    let answered = wait_until(Duration::from_secs(10), || {
        b.stderr().contains("reload (SIGHUP)")
    });
    let took = asked.elapsed();
    drop(release);
    holder.join().expect("lock holder");
    assert!(
        answered && took < Duration::from_secs(1),
        "SIGHUP answered after {took:?}"
    );
    // Once the lock is free, the request goes through.
    assert!(
        wait_until(Duration::from_secs(5), || enabled(&b, 0) == Some(false)),
        "channel 0 not disabled; stderr:\n{}",
        b.stderr()
    );
}

/// `-a` does not disable a channel that the operator disabled, reassigned and enabled while
/// a connect to its old address was still under way: the failure is about the old address.
#[test]
fn autodisable_leaves_a_channel_reassigned_since_the_attempt() {
    if !require_root() {
        return;
    }
    let hole = Blackhole::start();
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b3 = Backend::start("B3", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        flags: &["-a", "-t", "2"],
        operands: &[hole.operand(), b1.operand()],
        workers: 1,
        ..Start::default()
    });
    let addr = b.addr();
    let slow = std::thread::spawn(move || greeting(addr));
    std::thread::sleep(Duration::from_millis(300));
    let b3_port = b3.operand().rsplit(':').next().expect("port").to_string();
    for command in [
        "disable 0".to_string(),
        format!("assign 0 127.0.0.1 {b3_port}"),
        "enable 0".to_string(),
    ] {
        let out = b.control(&command);
        assert!(out.status.success(), "{command}: {out:?}");
    }
    assert_eq!(slow.join().expect("slow connection"), "B1", "failed over");
    assert!(
        b.logged("left as it is") || b.logged("needs to be enabled manually"),
        "stderr:\n{}",
        b.stderr()
    );
    assert!(enabled(&b, 0).expect("snapshot"), "stderr:\n{}", b.stderr());
    assert_eq!(tags(&b, 2), ["B3", "B1"]);
}

#[test]
fn source_address_is_used_for_backend_connections() {
    if !require_root() {
        return;
    }
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&["-B", "127.0.0.2"], &[b1.operand()]);
    assert_eq!(greeting(b.addr()), "B1");
    let peers = b1.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip(), "127.0.0.2".parse::<IpAddr>().expect("ip"));
}

/// `-B 0.0.0.0` (or `::`) is the system's choice of source, as without `-B`: the original
/// bound to it, which chooses nothing (it was refused as an invalid address).
#[test]
fn an_unspecified_source_address_is_the_default_one() {
    if !require_root() {
        return;
    }
    let b1 = Backend::start("B1", Behaviour::TagEcho);
    for any in ["0.0.0.0", "::", "::ffff:0.0.0.0", "0"] {
        let b = Balance::start(&["-B", any], &[b1.operand()]);
        assert_eq!(greeting(b.addr()), "B1", "-B {any}: {}", b.stderr());
        let local: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(b1.peers().last().map(|p| p.ip()), Some(local), "-B {any}");
    }
}

/// A channel named by a host with both an IPv6 and an IPv4 address (stock Debian's
/// `localhost` has ::1 too, listed first) is its IPv4 address, as the original's IPv4-only
/// resolver took it: a backend that listens on IPv4 only kept working. A name with an IPv6
/// address only is an IPv6 channel. The names are given to `create` by a control shell
/// that runs with its own /etc/hosts (a private mount namespace).
#[test]
fn a_name_with_both_families_is_its_ipv4_address() {
    if !require_root() {
        return;
    }
    let b = Balance::start(&[], &[]);
    let dir = temp_dir("hosts");
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        "::1 dual.test v6only.test\n127.0.0.1 dual.test\n127.0.0.1 localhost\n",
    )
    .expect("hosts file");
    for (name, port) in [("dual.test", "8080"), ("v6only.test", "8081")] {
        let o = Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && exec "$2" --run-dir "$3" -b "$4" -c "$5" "$6""#)
            .arg("sh")
            .arg(&hosts)
            .arg(BIN)
            .arg(&b.run_dir)
            .arg(&b.bind)
            .arg(format!("create {name} {port}"))
            .arg(b.port.to_string())
            .output_within(COMMAND_LIMIT)
            .expect("run the shell");
        assert!(o.status.success(), "{name}: {o:?}");
    }
    let (_f, t) = table(&b.table_path());
    let snap = t.snapshot().expect("snapshot");
    let addrs: Vec<Option<std::net::SocketAddr>> =
        snap.groups[0].channels.iter().map(|c| c.addr).collect();
    assert_eq!(
        addrs,
        [
            Some("127.0.0.1:8080".parse().expect("addr")),
            Some("[::1]:8081".parse().expect("addr"))
        ]
    );
}

#[test]
fn ipv6_backends_are_reached() {
    if !require_root() {
        return;
    }
    let v6 = Backend::start_on("[::1]:0", "V6", Behaviour::TagEcho);
    let b = Balance::start(&[], &[v6.operand()]);
    assert_eq!(greeting(b.addr()), "V6");
    let (_, total, _, _) = counters(&b.table_path(), 0, 0);
    assert_eq!(total, 1);
}

/// A source address written IPv4-mapped (`-B ::ffff:127.0.0.2`) is the IPv4 address it
/// maps: used for IPv4 channels (it was left out), never bound for an IPv6 one (every
/// connect there failed, and `-a` disabled the channel).
#[test]
fn a_v4_mapped_source_address_is_taken_as_ipv4() {
    if !require_root() {
        return;
    }
    let v6 = Backend::start_on("[::1]:0", "V6", Behaviour::TagEcho);
    let v4 = Backend::start("V4", Behaviour::TagEcho);
    let b = Balance::start(
        &["-a", "-B", "::ffff:127.0.0.2"],
        &[v6.operand(), v4.operand()],
    );
    assert_eq!(tags(&b, 2), ["V6", "V4"]);
    let source: IpAddr = "127.0.0.2".parse().expect("address");
    assert_eq!(v4.peers().first().map(|p| p.ip()), Some(source));
    assert!(enabled(&b, 0).expect("snapshot"), "{}", b.stderr());
}

/// An IPv4 client of an IPv6 listener (`-6`) arrives as ::ffff:a.b.c.d; it is logged as the
/// IPv4 address it is, as without `-6` and as the hash group sees it.
#[test]
fn an_ipv4_client_of_an_ipv6_listener_is_logged_as_ipv4() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        flags: &["-6", "-d", "--log-connections"],
        operands: &[backend.operand()],
        bind: "::ffff:127.0.0.1",
        ..Start::default()
    });
    assert_eq!(greeting(b.addr()), "B1");
    assert!(b.logged("connection from 127.0.0.1:"), "{}", b.stderr());
    assert!(!b.stderr().contains("from [::ffff:"), "{}", b.stderr());
}

#[test]
fn a_source_address_that_cannot_be_bound_is_left_out_as_the_original_did() {
    if !require_root() {
        return;
    }
    let v6 = Backend::start_on("[::1]:0", "V6", Behaviour::TagEcho);
    // ::2 is no address of this host: binding it fails (EADDRNOTAVAIL), and no packet goes
    // anywhere. With -a, a channel whose connect fails is disabled.
    let b = Balance::start(&["-a", "-B", "::2"], &[v6.operand()]);
    assert_eq!(greeting(b.addr()), "V6");
    assert_eq!(greeting(b.addr()), "V6", "the channel is still enabled");
    let peers = v6.peers();
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == "::1".parse::<IpAddr>().expect("ip")),
        "{peers:?}"
    );
    assert!(
        b.logged("cannot bind the source address ::2"),
        "stderr:\n{}",
        b.stderr()
    );
    assert!(!b.stderr().contains("connection failed"), "{}", b.stderr());
}

#[test]
fn connections_from_the_source_address_share_its_ports_between_destinations() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("ports");
    // Twelve ports for every connect and port-0 bind in the namespace.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40011");
    let backend = ns.enter(|| Backend::start_on("127.0.0.1:45001", "B1", Behaviour::TagEcho));
    let wrapper = ns.wrapper();
    let b = Balance::start_with(Start {
        flags: &["-B", "127.0.0.1"],
        operands: &[backend.operand()],
        wrapper: &wrapper,
        ..Start::default()
    });
    // Eight clients take eight of the ports. Each relayed connection goes to another
    // destination (the backend), so it may use a port a client uses: bound to the source
    // address without a port, all eight fit; a bind that took a port of its own would find
    // only four left.
    let tags = greetings_in(&ns, b.addr(), vec![None; 8]);
    assert_eq!(tags, vec!["B1"; 8], "stderr:\n{}", b.stderr());
    let peers = backend.peers();
    assert!(
        peers.iter().all(|p| p.ip() == Ipv4Addr::LOCALHOST),
        "{peers:?}"
    );
}

/// Opens one client connection to `addr` per entry of `ports` from a thread inside `ns`,
/// each from that port of 127.0.0.1 (outside the ephemeral range, so that it takes none of
/// it) or from an ephemeral one (None), and holds them all open until every one has said
/// its first line. Returns those lines, or what went wrong.
fn greetings_in(ns: &Netns, addr: std::net::SocketAddr, ports: Vec<Option<u16>>) -> Vec<String> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType};
    use nix::sys::socket::{SockaddrIn, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let client = move |port: Option<u16>| -> Result<TcpStream, String> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(port) = port {
            bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))
                .map_err(|e| format!("bind: {e}"))?;
        }
        connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(|e| format!("connect: {e}"))?;
        Ok(TcpStream::from(fd))
    };
    ns.enter(move || {
        let mut held = Vec::new();
        let mut lines = Vec::new();
        for port in ports {
            match client(port) {
                Ok(conn) => {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut line = String::new();
                    let _ = BufReader::new(&conn).read_line(&mut line);
                    lines.push(line.trim_end().to_string());
                    held.push(conn);
                }
                Err(e) => lines.push(e),
            }
        }
        lines
    })
}

#[test]
fn a_channel_out_of_source_ports_is_failed_over_but_not_disabled() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("noport");
    // Four ephemeral ports: four connections from balance to one destination.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40003");
    // Backends on ports of their own, outside the range.
    let (b1, b2) = ns.enter(|| {
        (
            Backend::start_on("127.0.0.1:45001", "B1", Behaviour::TagEcho),
            Backend::start_on("127.0.0.1:45002", "B2", Behaviour::TagEcho),
        )
    });
    let wrapper = ns.wrapper();
    let b = Balance::start_with(Start {
        flags: &["-a"],
        operands: &[b1.operand(), "!".to_string(), b2.operand()],
        wrapper: &wrapper,
        ..Start::default()
    });
    let tags = greetings_in(&ns, b.addr(), (50000..50005).map(Some).collect());
    // The fifth finds no port left towards B1 (EADDRNOTAVAIL) and fails over to B2.
    assert_eq!(
        tags,
        ["B1", "B1", "B1", "B1", "B2"],
        "stderr:\n{}",
        b.stderr()
    );
    let show = b.control("show");
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        !show.contains(" dis "),
        "-a disabled a channel that was only out of source ports:\n{show}"
    );
}
