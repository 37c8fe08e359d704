use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::*;
use crate::table::{GroupKind, InitialGroup, AUDIT_SLOTS, MAX_CHANNELS};

/// A table in a temp file, plus a second open of it that holds the master's lock.
struct Fixture {
    path: PathBuf,
    file: File,
    table: Table,
    /// Holds the exclusive lock, as the supervisor does; None once "the master died".
    master: Option<File>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn fixture(tag: &str, groups: &[InitialGroup], writable: bool) -> Fixture {
    let path =
        std::env::temp_dir().join(format!("balance-control-test-{tag}-{}", std::process::id()));
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create table");
    Table::initialise(&master, groups).expect("initialise");
    assert!(crate::sys::try_flock(master.as_fd(), true).expect("flock"));
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&path)
        .expect("reopen");
    let table = Table::open(&file, writable).expect("map");
    Fixture {
        path,
        file,
        table,
        master: Some(master),
    }
}

fn three_channels(tag: &str, writable: bool) -> Fixture {
    let groups = vec![InitialGroup {
        kind: GroupKind::RoundRobin,
        channels: vec![
            (addr("127.0.0.1:21001"), 0),
            (addr("127.0.0.1:21002"), 0),
            (addr("127.0.0.1:21003"), 0),
        ],
    }];
    fixture(tag, &groups, writable)
}

fn session(f: &Fixture) -> Session<'_> {
    Session {
        table: &f.table,
        file: &f.file,
        path: &f.path,
        group: 0,
        json: false,
        debug: false,
        services: Services::parse("smtp 25/tcp mail\nhttp 80/tcp www\n"),
        logger: std::cell::RefCell::new(crate::log::Logger::for_shell(Some(
            std::path::PathBuf::from("/nonexistent/balance-test-log"),
        ))),
        who: std::cell::OnceCell::new(),
    }
}

/// Runs a line; returns stdout text, or the failure's stdout/stderr text and code.
fn run(s: &mut Session<'_>, line: &str) -> Result<String, (String, u8)> {
    match s.run_line(line) {
        Ok(reply) => Ok(reply.text),
        Err(f) => {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            f.report(s.path, &mut out, &mut err).expect("report");
            out.extend(err);
            Err((String::from_utf8(out).expect("utf8"), f.code()))
        }
    }
}

fn ok(s: &mut Session<'_>, line: &str) -> String {
    run(s, line).unwrap_or_else(|e| panic!("{line}: {e:?}"))
}

fn rejected(s: &mut Session<'_>, line: &str) -> String {
    match run(s, line) {
        Err((text, 65)) => text,
        other => panic!("{line}: expected a rejection, got {other:?}"),
    }
}

#[test]
fn prefixes_follow_the_original_order() {
    let p = |l: &str| Command::parse(l).expect(l).expect("not blank");
    assert_eq!(p("q"), Command::Quit);
    assert_eq!(p("s"), Command::Show { json: false });
    assert_eq!(p("show json"), Command::Show { json: true });
    assert_eq!(p("h"), Command::Help);
    assert_eq!(p("?"), Command::Help);
    assert_eq!(p("ha"), Command::Hash);
    assert_eq!(p("k"), Command::Kill);
    assert_eq!(p("d 1"), Command::Disable(1));
    assert_eq!(p("g 3"), Command::Group(3));
    assert_eq!(p("r 1"), Command::Reset(1));
    assert_eq!(p("rr"), Command::RoundRobin);
    assert_eq!(p("e 0"), Command::Enable(0));
    assert_eq!(
        p("m 1 5"),
        Command::Maxc {
            channel: 1,
            maxc: 5
        }
    );
    assert_eq!(
        p("mrtg 0 1"),
        Command::MrtgBytes {
            group: 0,
            channel: 1
        }
    );
    assert_eq!(
        p("mrtg-c 0 1"),
        Command::MrtgConns {
            group: 0,
            channel: 1
        }
    );
    assert_eq!(p("v"), Command::Version);
    assert_eq!(p("  disable\t-1 \n"), Command::Disable(-1));
    assert_eq!(Command::parse(" \t\n"), Ok(None));
}

#[test]
fn bad_words_and_arguments_are_refused() {
    let e = |l: &str| Command::parse(l).expect_err(l);
    for line in [
        "showx",
        "SHOW",
        "bogus",
        "disable",
        "disable x",
        "disable 1 2",
        "show all",
    ] {
        assert_eq!(e(line), ParseError::Syntax, "{line}");
    }
    assert_eq!(e("group abc"), ParseError::Syntax);
    assert_eq!(e("group 256"), ParseError::OutOfRange);
    assert_eq!(e("group 32"), ParseError::OutOfRange);
    assert_eq!(e("group -1"), ParseError::OutOfRange);
    assert_eq!(e("maxc 1 3000000000"), ParseError::OutOfRange);
    assert_eq!(e("disable 99999999999999999999"), ParseError::OutOfRange);
    assert_eq!(e("create host"), ParseError::Syntax);
    assert_eq!(e("mrtg-bytes 0"), ParseError::Syntax);
    assert_eq!(e("assign 1 host"), ParseError::Syntax);
    assert_eq!(
        Command::parse("create [::1]:80"),
        Ok(Some(Command::Create {
            host: "[::1]:80".into(),
            port: None
        }))
    );
}

#[test]
fn addresses_resolve_with_an_inline_port_winning() {
    let services = Services::parse("smtp 25/tcp mail\n");
    let r = |h: &str, p: Option<&str>| commands::resolve(h, p, &services);
    assert_eq!(r("127.0.0.1", Some("80")), Ok(addr("127.0.0.1:80")));
    assert_eq!(r("127.0.0.1:81", Some("80")), Ok(addr("127.0.0.1:81")));
    assert_eq!(r("127.0.0.1", Some("smtp")), Ok(addr("127.0.0.1:25")));
    assert_eq!(r("[::1]:82", None), Ok(addr("[::1]:82")));
    assert_eq!(r("[::1]", Some("83")), Ok(addr("[::1]:83")));
    assert_eq!(r("::1", Some("84")), Ok(addr("[::1]:84")));
    assert_eq!(r("localhost", Some("85")), Ok(addr("127.0.0.1:85")));
    assert_eq!(r("127.0.0.1", Some("abc")), Err("invalid port"));
    assert_eq!(r("127.0.0.1", Some("0")), Err("invalid port"));
    assert_eq!(r("127.0.0.1", Some("70000")), Err("invalid port"));
    assert_eq!(r("127.0.0.1:", Some("80")), Err("invalid port"));
    assert_eq!(r(":80", None), Err("invalid address"));
    assert_eq!(r("nosuchhost.invalid", Some("80")), Err("invalid address"));
}

#[test]
fn show_and_mrtg_keep_the_original_formats() {
    let f = three_channels("show", true);
    let ch = f.table.counters(0, 0).expect("channel");
    ch.total.store(3, Ordering::Relaxed);
    ch.sent.store(21, Ordering::Relaxed);
    ch.received.store(30, Ordering::Relaxed);
    ch.current.store(1, Ordering::Relaxed);
    let mut s = session(&f);
    assert_eq!(
        ok(&mut s, "show"),
        "GRP Type  #   S       ip-address  port    c      totalc maxc        sent        rcvd\n\
         \x20 0   RR  0 ENA        127.0.0.1 21001    1           3    0          21          30\n\
         \x20 0   RR  1 ENA        127.0.0.1 21002    0           0    0           0           0\n\
         \x20 0   RR  2 ENA        127.0.0.1 21003    0           0    0           0           0\n"
    );
    assert_eq!(
        ok(&mut s, "mrtg-bytes 0 0"),
        "30\n21\nUNKNOWN\ngroup 0 channel 0\n"
    );
    assert_eq!(
        ok(&mut s, "mrtg-conns 0 0"),
        "3\nUNKNOWN\nUNKNOWN\ngroup 0 channel 0\n"
    );
    assert_eq!(rejected(&mut s, "mrtg-bytes 32 0"), "unknown group\n");
    assert_eq!(rejected(&mut s, "mrtg-bytes -1 0"), "unknown group\n");
    assert_eq!(rejected(&mut s, "mrtg-bytes 0 3"), "unknown channel\n");
    assert_eq!(rejected(&mut s, "mrtg-conns 5 2"), "unknown channel\n");
    assert_eq!(rejected(&mut s, "mrtg-bytes 0"), "syntax error\n");
    assert_eq!(
        ok(&mut s, "show json"),
        "{\"supervisor_pid\":".to_string()
            + &std::process::id().to_string()
            + ",\"groups\":[{\"group\":0,\"type\":\"rr\",\"channels\":[\
            {\"channel\":0,\"enabled\":true,\"address\":\"127.0.0.1\",\"port\":21001,\"current\":1,\"total\":3,\"maxc\":0,\"sent\":21,\"received\":30},\
            {\"channel\":1,\"enabled\":true,\"address\":\"127.0.0.1\",\"port\":21002,\"current\":0,\"total\":0,\"maxc\":0,\"sent\":0,\"received\":0},\
            {\"channel\":2,\"enabled\":true,\"address\":\"127.0.0.1\",\"port\":21003,\"current\":0,\"total\":0,\"maxc\":0,\"sent\":0,\"received\":0}]}]}\n"
    );
    s.json = true;
    assert!(ok(&mut s, "show").starts_with("{\"supervisor_pid\":"));
    assert_eq!(
        ok(&mut s, "version"),
        format!(
            "  This is balance {}\n  MAXGROUPS=32\n  MAXCHANNELS=64\n",
            crate::VERSION
        )
    );
}

#[test]
fn show_widens_the_address_column_for_ipv6_only() {
    let groups = vec![InitialGroup {
        kind: GroupKind::Hash,
        channels: vec![
            (addr("10.0.0.1:80"), 0),
            (addr("[2001:db8::1234:5678:9abc]:443"), 7),
        ],
    }];
    let f = fixture("ipv6", &groups, true);
    let text = ok(&mut session(&f), "show");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{text}");
    assert!(lines[0].contains("   GRP".trim_start()));
    assert!(lines[2].contains(" Hash  1 ENA 2001:db8::1234:5678:9abc   443    0           0    7"));
    assert!(lines[1].contains("                10.0.0.1    80"));
}

#[test]
fn enable_disable_maxc_reset_messages() {
    let f = three_channels("enable", true);
    let mut s = session(&f);
    assert_eq!(ok(&mut s, "disable 1"), "channel 1 disabled\n");
    assert_eq!(ok(&mut s, "disable 1"), "channel 1 already disabled\n");
    assert_eq!(ok(&mut s, "enable 1"), "channel 1 enabled\n");
    assert_eq!(ok(&mut s, "e 1"), "channel 1 already enabled\n");
    assert_eq!(rejected(&mut s, "disable 5"), "no such channel 5\n");
    assert_eq!(rejected(&mut s, "disable -1"), "no such channel -1\n");
    assert_eq!(rejected(&mut s, "disable"), "syntax error\n");
    assert_eq!(ok(&mut s, "maxc 1 5"), "maxc of channel 1 changed to 5\n");
    assert_eq!(rejected(&mut s, "maxc 3 5"), "unknown channel\n");
    assert_eq!(
        f.table.snapshot().expect("snap").groups[0].channels[1].maxc,
        5
    );
    let ch = f.table.counters(0, 2).expect("channel");
    ch.total.store(9, Ordering::Relaxed);
    ch.sent.store(8, Ordering::Relaxed);
    ch.received.store(7, Ordering::Relaxed);
    ch.current.store(2, Ordering::Relaxed);
    let reply = s.run_line("r 2").expect("reset");
    assert_eq!(reply.text, "channel 2 counters reset\n");
    let event = reply.audit.expect("audit");
    assert_eq!(
        event.to_string(),
        format!(
            "uid {} ({}) pid {}: reset group 0 channel 2: totalc 9 sent 8 rcvd 7 -> 0",
            nix::unistd::getuid(),
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map_or_else(|| "?".to_string(), |u| u.name),
            std::process::id()
        )
    );
    assert_eq!(ch.total.load(Ordering::Relaxed), 0);
    assert_eq!(ch.sent.load(Ordering::Relaxed), 0);
    assert_eq!(ch.received.load(Ordering::Relaxed), 0);
    assert_eq!(
        ch.current.load(Ordering::Relaxed),
        2,
        "open connections stay counted"
    );
    assert_eq!(rejected(&mut s, "reset 3"), "no such channel 3\n");
}

/// Every change is put on record in the update that makes it (one update: the table's
/// generation moves by one), so that a shell killed right after a change cannot leave it
/// unrecorded; a command that changes nothing records nothing.
#[test]
fn each_change_is_recorded_in_the_update_that_makes_it() {
    let f = three_channels("recorded", true);
    let mut s = session(&f);
    let generation = || f.table.header().generation.load(Ordering::Relaxed);
    let mut next = f.table.audit_next();
    for (line, what) in [
        (
            "disable 1",
            "disable group 0 channel 1: enabled -> disabled",
        ),
        ("enable 1", "enable group 0 channel 1: disabled -> enabled"),
        ("maxc 1 5", "maxc group 0 channel 1: 0 -> 5"),
        (
            "reset 2",
            "reset group 0 channel 2: totalc 0 sent 0 rcvd 0 -> 0",
        ),
        ("hash", "hash group 0: round robin -> hash"),
        (
            "disable 0",
            "disable group 0 channel 0: enabled -> disabled",
        ),
        (
            "assign 0 127.0.0.1 21009",
            "assign group 0 channel 0: 127.0.0.1:21001 -> 127.0.0.1:21009",
        ),
        (
            "create 127.0.0.1 21004",
            "create group 0 channel 3: - -> 127.0.0.1:21004",
        ),
    ] {
        let before = generation();
        let reply = s.run_line(line).unwrap_or_else(|e| panic!("{line}: {e:?}"));
        assert_eq!(generation(), before.wrapping_add(1), "{line}: one update");
        let batch = f.table.read_audit(next);
        assert_eq!(batch.lines.len(), 1, "{line}: {:?}", batch.lines);
        assert!(batch.lines[0].ends_with(what), "{line}: {:?}", batch.lines);
        assert_eq!(
            Some(batch.lines[0].clone()),
            reply.audit.map(|e| e.to_string())
        );
        next = batch.next;
    }
    for line in ["disable 0", "maxc 9 1", "show"] {
        let _ = s.run_line(line);
        assert!(f.table.read_audit(next).lines.is_empty(), "{line}");
    }
}

/// Once the instance is stopping (a `kill`, or the supervisor's stop, which then reads the
/// audit ring a last time), a change is refused as if the master were gone, and leaves no
/// record; looking still works. (Changes made during a stop were confirmed, and lost.)
#[test]
fn a_stopping_instance_takes_no_change() {
    let f = three_channels("stopping", true);
    let mut s = session(&f);
    f.table.header().shutdown.store(4242, Ordering::Relaxed);
    let next = f.table.audit_next();
    for line in [
        "disable 0",
        "maxc 1 3",
        "reset 2",
        "hash",
        "create 127.0.0.1 80",
        "kill",
    ] {
        match run(&mut s, line) {
            Err((text, 69)) => assert_eq!(text, "no master process, exiting.\n", "{line}"),
            other => panic!("{line}: {other:?}"),
        }
    }
    assert!(f.table.read_audit(next).lines.is_empty());
    assert!(ok(&mut s, "show").contains("127.0.0.1"));
    let snap = f.table.snapshot().expect("snapshot");
    assert!(snap.groups[0].channels[0].enabled);
}

/// An IPv4-mapped address is the IPv4 address it maps: shown and connected as IPv4, and
/// refused where that one would be (::ffff:0.0.0.0 slipped past the check and was
/// connected to as 0.0.0.0, this host).
#[test]
fn a_v4_mapped_channel_address_is_taken_as_ipv4() {
    let f = three_channels("mapped", true);
    let mut s = session(&f);
    for bad in [
        "[::ffff:0.0.0.0]",
        "[::ffff:255.255.255.255]",
        "[::ffff:224.0.0.1]",
    ] {
        assert_eq!(
            rejected(&mut s, &format!("create {bad} 80")),
            "invalid address\n",
            "{bad}"
        );
    }
    assert_eq!(
        ok(&mut s, "create [::ffff:127.0.0.1] 80"),
        "channel created\n"
    );
    let snap = f.table.snapshot().expect("snapshot");
    assert_eq!(snap.groups[0].channels[3].addr, Some(addr("127.0.0.1:80")));
}

/// The caller's user name (an NSS lookup, perhaps over the network) is looked up for a
/// change only, before the lock: a monitoring probe makes none.
#[test]
fn only_a_change_looks_the_caller_up() {
    let f = three_channels("who", true);
    let mut s = session(&f);
    for probe in [
        "show",
        "mrtg-bytes 0 0",
        "mrtg-conns 0 0",
        "version",
        "help",
    ] {
        ok(&mut s, probe);
        assert!(s.who.get().is_none(), "{probe}");
    }
    ok(&mut s, "disable 1");
    assert_eq!(s.who.get().map(String::as_str), Some(caller().as_str()));
}

#[test]
fn groups_create_assign_and_kind() {
    let f = three_channels("create", true);
    let mut s = session(&f);
    assert_eq!(ok(&mut s, "group 1"), "");
    assert_eq!(s.group, 1);
    assert_eq!(rejected(&mut s, "group 32"), "value out of range\n");
    assert_eq!(s.group, 1);
    // A slot used before (stale values) comes back clean.
    f.table
        .counters(1, 0)
        .expect("channel")
        .total
        .store(2, Ordering::Relaxed);
    f.table
        .channel(1, 0)
        .expect("channel")
        .maxc
        .store(7, Ordering::Relaxed);
    let reply = s.run_line("create 127.0.0.1 21004").expect("create");
    assert_eq!(reply.text, "channel created\n");
    assert_eq!(reply.audit.expect("audit").channel, Some(0));
    assert!(ok(&mut s, "show").ends_with(
        "  1   RR  0 dis        127.0.0.1 21004    0           0    0           0           0\n"
    ));
    assert_eq!(
        rejected(&mut s, "create nosuchhost.invalid 80"),
        "invalid address\n"
    );
    for unusable in [
        "0.0.0.0 80",
        ":: 80",
        "[::]:80 81",
        "255.255.255.255 80",
        "ff02::1 80",
    ] {
        assert_eq!(
            rejected(&mut s, &format!("create {unusable}")),
            "invalid address\n",
            "create {unusable}"
        );
    }
    assert_eq!(ok(&mut s, "ha"), "group 1 set to hash\n");
    assert_eq!(ok(&mut s, "rr"), "group 1 set to round robin\n");
    assert_eq!(ok(&mut s, "hash"), "group 1 set to hash\n");
    assert_eq!(
        f.table.snapshot().expect("snap").groups[1].kind,
        GroupKind::Hash
    );

    s.group = 0;
    assert_eq!(
        rejected(&mut s, "assign 1 127.0.0.1 21004"),
        "channel must be disabled to assign new address\n"
    );
    assert_eq!(
        rejected(&mut s, "assign 9 127.0.0.1 21004"),
        "unknown channel\n"
    );
    assert_eq!(
        rejected(&mut s, "assign 0 nosuchhost.invalid 21004"),
        "invalid address\n"
    );
    ok(&mut s, "disable 1");
    assert_eq!(
        rejected(&mut s, "assign 1 nosuchhost.invalid 21004"),
        "invalid address\n"
    );
    assert_eq!(
        rejected(&mut s, "assign 1 0.0.0.0 21004"),
        "invalid address\n"
    );
    assert_eq!(
        f.table.snapshot().expect("snap").groups[0].channels[1].addr,
        Some(addr("127.0.0.1:21002")),
        "a failed assign changes nothing"
    );
    assert_eq!(ok(&mut s, "assign 1 [::1]:21005 9"), "channel reassigned\n");
    assert_eq!(
        f.table.snapshot().expect("snap").groups[0].channels[1].addr,
        Some(addr("[::1]:21005"))
    );
}

#[test]
fn a_full_group_refuses_create() {
    let groups = vec![InitialGroup {
        kind: GroupKind::RoundRobin,
        channels: vec![(addr("127.0.0.1:1"), 0); MAX_CHANNELS],
    }];
    let f = fixture("full", &groups, true);
    assert_eq!(
        rejected(&mut session(&f), "create 127.0.0.1 2"),
        "no channel slots available\n"
    );
}

#[test]
fn read_only_access_can_look_but_not_change() {
    let f = three_channels("readonly", false);
    let mut s = session(&f);
    assert!(ok(&mut s, "show").starts_with("GRP Type"));
    assert!(ok(&mut s, "mrtg-bytes 0 0").ends_with("group 0 channel 0\n"));
    assert_eq!(ok(&mut s, "group 2"), "");
    for line in [
        "disable 0",
        "enable 0",
        "maxc 0 1",
        "reset 0",
        "create 127.0.0.1 1",
        "assign 0 127.0.0.1 1",
        "hash",
        "rr",
        "kill",
    ] {
        let (text, code) = run(&mut s, line).expect_err(line);
        assert_eq!(code, 77, "{line}");
        assert!(
            text.starts_with(&format!(
                "balance: read-only access to {}: ",
                f.path.display()
            )),
            "{text}"
        );
        assert!(text.contains("needs write permission"), "{text}");
    }
    assert_eq!(f.table.header().shutdown.load(Ordering::Relaxed), 0);
}

#[test]
fn a_table_without_master_ends_the_session() {
    let mut f = three_channels("nomaster", true);
    assert!(ok(&mut session(&f), "show").starts_with("GRP"));
    f.master = None;
    let mut s = session(&f);
    assert_eq!(
        run(&mut s, "show"),
        Err(("no master process, exiting.\n".into(), 69))
    );
    assert_eq!(ok(&mut s, "quit"), "");
}

#[test]
fn interactive_prompts_until_end_of_input() {
    let f = three_channels("interactive", true);
    let mut s = session(&f);
    let mut input: &[u8] = b"group 2\nbogus\n\ndisable 0\n";
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(s.interactive(&mut input, &mut out, &mut err), 0);
    let out = String::from_utf8(out).expect("utf8");
    assert!(out.starts_with("\nbalance "), "{out}");
    assert!(out.ends_with(
        "balance[0] balance[2] syntax error\nbalance[2] balance[2] no such channel 0\nbalance[2] \n"
    ), "{out}");
    let mut input: &[u8] = b"quit\nshow\n";
    let mut out = Vec::new();
    assert_eq!(s.interactive(&mut input, &mut out, &mut err), 0);
    assert!(String::from_utf8(out)
        .expect("utf8")
        .ends_with("balance[2] "));
}

#[test]
fn stats_add_counters_modulo_2_64() {
    let f = three_channels("stats-wrap", true);
    let mut s = session(&f);
    for c in 0..2 {
        let ch = f.table.counters(0, c).expect("channel");
        ch.sent.store(u64::MAX, Ordering::Relaxed);
        ch.received.store(u64::MAX, Ordering::Relaxed);
    }
    let out = ok(&mut s, "stats");
    assert!(
        out.contains(&format!(
            "bytes: {} sent, {} received",
            u64::MAX - 1,
            u64::MAX - 1
        )),
        "{out}"
    );
}

/// Input that is one endless line: every read returns more of it, none a newline.
struct EndlessLine {
    served: usize,
    limit: usize,
}

impl std::io::Read for EndlessLine {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.limit - self.served);
        buf[..n].fill(b'x');
        self.served += n;
        Ok(n)
    }
}

#[test]
fn an_overlong_line_is_a_syntax_error_and_is_not_kept() {
    let f = three_channels("overlong", true);
    let mut s = session(&f);
    // 64 MiB without a newline, then two commands: answered once, then the shell goes on.
    let line = EndlessLine {
        served: 0,
        limit: 64 << 20,
    };
    let rest: &[u8] = b"\ndisable 0\nx\n";
    let mut input = std::io::BufReader::new(std::io::Read::chain(line, rest));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(s.interactive(&mut input, &mut out, &mut err), 0);
    let out = String::from_utf8(out).expect("utf8");
    assert!(
        out.ends_with(
            "balance[0] syntax error\nbalance[0] channel 0 disabled\nbalance[0] syntax error\nbalance[0] \n"
        ),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );
    // Of a long line, no more than MAX_LINE bytes are kept.
    let mut line = Vec::new();
    let mut long: &[u8] = &[b'y'; 10_000];
    assert_eq!(
        read_line_bounded(&mut long, &mut line).expect("read"),
        (10_000, true)
    );
    assert_eq!(line.len(), MAX_LINE);
}

#[test]
fn one_command_exit_codes() {
    let f = three_channels("exitcodes", true);
    let mut s = session(&f);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(s.run_one("disable 0", &mut out, &mut err), 0);
    assert_eq!(s.run_one("", &mut out, &mut err), 0);
    assert_eq!(s.run_one("bogus", &mut out, &mut err), 65);
    assert_eq!(s.run_one("disable 7", &mut out, &mut err), 65);
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        "channel 0 disabled\nsyntax error\nno such channel 7\n"
    );
    s.debug = true;
    let mut err = Vec::new();
    assert_eq!(s.run_one("enable 0", &mut Vec::new(), &mut err), 0);
    assert!(String::from_utf8(err)
        .expect("utf8")
        .ends_with(": enable group 0 channel 0: disabled -> enabled\n"));
}

#[test]
fn show_repairs_a_writer_that_died_mid_update() {
    let f = three_channels("repair", true);
    let seq = f.table.seq();
    f.table.header().seq.store(seq + 1, Ordering::Relaxed);
    f.table.header().lock.store(0x4000_0000, Ordering::Relaxed);
    assert!(ok(&mut session(&f), "show").starts_with("GRP"));
    assert_eq!(f.table.seq() & 1, 0);
}

/// A read-only shell that finds a write in progress waits for it to end (here a writer
/// stopped mid-update for 300 ms, or repaired by the supervisor) instead of failing at
/// once; one that never ends is reported as busy (exit 75) after the wait.
#[test]
fn a_read_only_show_waits_out_a_write_in_progress() {
    let f = three_channels("wait-write", true);
    let (_file, reader) = reopen(&f, false);
    let session_on = |table| Session {
        table,
        ..session(&f)
    };
    let header = f.table.header();
    header.seq.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let shown = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            header.seq.fetch_add(1, Ordering::Release);
        });
        run(&mut session_on(&reader), "show")
    });
    assert!(shown.expect("show").starts_with("GRP"));
    assert!(start.elapsed() >= Duration::from_millis(300));
    // Never ends: busy after the wait, and the count is left alone.
    header.seq.fetch_add(1, Ordering::Relaxed);
    let seq = f.table.seq();
    let start = Instant::now();
    match run(&mut session_on(&reader), "show") {
        Err((text, 75)) => assert!(text.contains("kept changing"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert_eq!(f.table.seq(), seq);
}

/// `create` on a port the workers admit already returns at once and quietly; when the
/// daemon is gone it says so instead of waiting.
#[test]
fn a_new_port_is_awaited_only_while_the_daemon_serves() {
    let mut f = three_channels("admit", true);
    let mut s = session(&f);
    let reply = s.run_line("create 127.0.0.1 21009").expect("create");
    assert_eq!(reply.port, Some(21009));
    f.table.admit_ports([21009]);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    s.emit(&reply, &mut out, &mut err).expect("emit");
    assert!(started.elapsed() < ADMIT_WAIT / 2);
    assert_eq!(String::from_utf8_lossy(&out), "channel created\n");
    assert_eq!(String::from_utf8_lossy(&err), "");

    let reply = s.run_line("create 127.0.0.1 21010").expect("create");
    drop(s);
    f.master = None;
    let s = session(&f);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    s.emit(&reply, &mut out, &mut err).expect("emit");
    assert!(started.elapsed() < ADMIT_WAIT / 2);
    assert_eq!(String::from_utf8_lossy(&out), "channel created\n");
    assert!(
        String::from_utf8_lossy(&err).contains("the daemon stopped meanwhile"),
        "{}",
        String::from_utf8_lossy(&err)
    );
}

/// A second mapping of the fixture's table: writable as the supervisor has its own, or
/// read-only as a member of the control group has it.
fn reopen(f: &Fixture, writable: bool) -> (File, Table) {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&f.path)
        .expect("reopen");
    let table = Table::open(&file, writable).expect("map");
    (file, table)
}

/// Fills the audit ring with records nobody has read, up to the last two slots.
fn fill_audit_ring(f: &Fixture) {
    f.table
        .update(|w| {
            for i in 0..AUDIT_SLOTS - 2 {
                w.append_audit(&format!("filler {i}"));
            }
        })
        .expect("fill");
}

/// Changes come faster than the supervisor reads (a script piped into `balance -i`): a
/// change waits for room in the audit ring instead of overwriting records not yet logged,
/// so every change is on record. (Past 256 unread records the oldest were overwritten,
/// and only counted.)
#[test]
fn a_change_waits_for_room_in_the_audit_ring_and_no_record_is_lost() {
    let f = three_channels("audit-room", true);
    let mut s = session(&f);
    let done = std::sync::atomic::AtomicBool::new(false);
    let changes = 3 * AUDIT_SLOTS;
    let (lines, lost, was_full) = std::thread::scope(|scope| {
        // The supervisor's part: it first lets the shell fill the ring (so that the shell
        // has to wait, however slow this machine is), then looks every 50 ms, each time
        // marking what it read.
        let reader = scope.spawn(|| {
            let (_file, table) = reopen(&f, true);
            let deadline = Instant::now() + Duration::from_secs(60);
            let full = |t: &Table| t.audit_next() >= AUDIT_SLOTS as u64 - 1;
            while !full(&table) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let was_full = full(&table);
            // Still full a while later: the shell waits rather than overwrite.
            std::thread::sleep(Duration::from_millis(100));
            let was_full = was_full && table.audit_next() == AUDIT_SLOTS as u64 - 1;
            let (mut lines, mut lost, mut next) = (Vec::new(), 0, 0);
            let mut last_look = false;
            while Instant::now() < deadline {
                let finished = last_look;
                last_look = done.load(Ordering::Acquire);
                let batch = table.read_audit(next);
                lines.extend(batch.lines);
                lost += batch.lost;
                next = batch.next;
                table.audit_read_up_to(next);
                if finished {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (lines, lost, was_full)
        });
        for i in 0..changes {
            let line = if i % 2 == 0 { "disable 1" } else { "enable 1" };
            ok(&mut s, line);
        }
        done.store(true, Ordering::Release);
        reader.join().expect("reader")
    });
    assert!(was_full, "the shell never had to wait");
    assert_eq!(lost, 0);
    assert_eq!(lines.len(), changes);
    let disables = lines
        .iter()
        .filter(|l| l.ends_with("disable group 0 channel 1: enabled -> disabled"))
        .count();
    assert_eq!(disables, changes / 2);
}

/// With the ring full and nobody reading it (the supervisor stopped), a change is not made
/// after the wait, and says why (exit 75); the unread records stay as they were, and the
/// slot kept for a dead writer's record takes it without overwriting any. Once the ring
/// is read, the same change goes through; a master gone meanwhile is said at once.
#[test]
fn with_the_audit_ring_full_and_unread_a_change_is_refused() {
    let mut f = three_channels("audit-full", true);
    // The master's lock, held here so that it can be let go of below.
    let master = f.master.take();
    let mut s = session(&f);
    fill_audit_ring(&f);
    // One record's room left: this change takes it.
    ok(&mut s, "maxc 2 4");
    let start = Instant::now();
    match run(&mut s, "disable 0") {
        Err((text, 75)) => assert!(
            text.contains("change not made") && text.contains("(is it stopped?)"),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= commands::AUDIT_WAIT);
    let snap = f.table.snapshot().expect("snapshot");
    assert!(snap.groups[0].channels[0].enabled);
    // A writer died mid-update: its record goes to the kept slot.
    let header = f.table.header();
    header.seq.fetch_add(1, Ordering::Relaxed);
    assert!(ok(&mut s, "show").contains("127.0.0.1"));
    let batch = f.table.read_audit(0);
    assert_eq!((batch.lines.len(), batch.lost), (AUDIT_SLOTS, 0));
    assert_eq!(batch.lines[0], "filler 0");
    assert!(batch.lines[AUDIT_SLOTS - 2].ends_with("maxc group 0 channel 2: 0 -> 4"));
    assert!(batch.lines[AUDIT_SLOTS - 1].contains("previous writer died"));
    f.table.audit_read_up_to(batch.next);
    ok(&mut s, "disable 0");
    assert!(!f.table.snapshot().expect("snapshot").groups[0].channels[0].enabled);
    let after = f.table.read_audit(batch.next);
    assert_eq!(after.lines.len(), 1);
    assert!(after.lines[0].ends_with("disable group 0 channel 0: enabled -> disabled"));
    // Full again, and the master dies during the wait: no waiting on for a reader that
    // will never come.
    fill_audit_ring(&f);
    let start = Instant::now();
    let refused = std::thread::scope(|scope| {
        scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(master);
        });
        run(&mut s, "enable 0")
    });
    match refused {
        Err((text, 69)) => assert_eq!(text, "no master process, exiting.\n"),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < commands::AUDIT_WAIT / 2);
}

/// With the audit ring full and nobody reading it, a command that changes nothing answers at
/// once with its own answer: it needs no record. (It waited out the ring and was refused
/// as "change not made", whatever it was.) A real change still waits.
#[test]
fn with_the_audit_ring_full_a_command_that_changes_nothing_answers_at_once() {
    let f = three_channels("audit-full-noop", true);
    let mut s = session(&f);
    ok(&mut s, "disable 1");
    // With that record, one short of full: no room for another change's.
    fill_audit_ring(&f);
    let written = f.table.read_audit(0).next;
    let start = Instant::now();
    let refusals = [
        ("disable 99", "no such channel 99"),
        ("enable -1", "no such channel -1"),
        ("reset 3", "no such channel 3"),
        ("maxc 7 1", "unknown channel"),
        (
            "assign 0 127.0.0.1:21009",
            "channel must be disabled to assign new address",
        ),
        ("assign 5 127.0.0.1:21009", "unknown channel"),
    ];
    for (line, why) in refusals {
        match run(&mut s, line) {
            Err((text, 65)) => assert!(text.contains(why), "{line}: {text}"),
            other => panic!("{line}: {other:?}"),
        }
    }
    assert_eq!(ok(&mut s, "enable 0"), "channel 0 already enabled\n");
    assert_eq!(ok(&mut s, "disable 1"), "channel 1 already disabled\n");
    assert!(start.elapsed() < commands::AUDIT_WAIT / 2);
    // Nothing was written, and the ring is as full as before.
    let batch = f.table.read_audit(0);
    assert_eq!((batch.next, batch.lost), (written, 0));
    let snap = f.table.snapshot().expect("snapshot");
    let channels = &snap.groups[0].channels;
    assert_eq!(channels.len(), 3);
    assert!(channels[0].enabled && !channels[1].enabled);
    assert_eq!(channels[0].addr, Some(addr("127.0.0.1:21001")));
    // A change that is valid waits for room as before, and is refused without a reader.
    let start = Instant::now();
    match run(&mut s, "enable 1") {
        Err((text, 75)) => assert!(text.contains("change not made"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= commands::AUDIT_WAIT);
    assert!(!f.table.snapshot().expect("snapshot").groups[0].channels[1].enabled);
}
