//! The command line through the real binary: the original's syntax, its exit codes and
//! messages, and the limits (32 groups of 64 channels).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output_within(COMMAND_LIMIT)
        .expect("run balance")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn usage_errors_exit_64_with_one_clear_message() {
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(o.stdout.is_empty(), "usage goes to stderr");
    assert!(
        stderr(&o).contains("Usage") || stderr(&o).contains("usage"),
        "{}",
        stderr(&o)
    );
    for (args, words) in [
        (&["-x", "8000", "h"][..], "invalid option -- 'x'"),
        (&["-t"][..], "option requires an argument -- 't'"),
        (&["-t", "0", "8000", "h"][..], "-t"),
        (&["-t", "abc", "8000", "h"][..], "-t"),
        (&["-T", "-1", "8000", "h"][..], "-T"),
        (&["-i"][..], "PORT"),
        (&["-i", "8000", "h"][..], "PORT"),
        (&["-c", "mrtg-bytes", "0", "0", "8000"][..], "PORT"),
        (&["--workers", "0", "8000"][..], "--workers"),
        (&["-b", "a/b", "8000"][..], "-b"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(words), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn ports_and_channels_are_validated_with_the_originals_codes() {
    for (args, code, message) in [
        (&["-f", "abc", "h"][..], 64, "invalid port [abc], exiting."),
        (&["-f", "0", "h"][..], 64, "invalid port [0], exiting."),
        (
            &["-f", "70000", "h"][..],
            64,
            "invalid port [70000], exiting.",
        ),
        (&["-f", "8000", "h:70000"][..], 64, "invalid port [70000]"),
        (
            &["-f", "8000", "!", "h"][..],
            69,
            "balance: no channels in group",
        ),
        (
            &["-f", "8000", "h", "!", "!", "h"][..],
            69,
            "balance: no channels in group",
        ),
        (
            &["-f", "8000", "%", "h"][..],
            69,
            "balance: no channels in group",
        ),
        (&["-f", "8000", "[]"][..], 65, "unknown or invalid address"),
        // Addresses that cannot be a backend are refused, not stored and never used.
        (
            &["-f", "8000", "0.0.0.0:81"][..],
            65,
            "unknown or invalid address [0.0.0.0]",
        ),
        (
            &["-f", "8000", "255.255.255.255"][..],
            65,
            "unknown or invalid address [255.255.255.255]",
        ),
        (
            &["-f", "8000", "[::]:81"][..],
            65,
            "unknown or invalid address [::]",
        ),
        (
            &["-f", "8000", "224.0.0.1"][..],
            65,
            "unknown or invalid address [224.0.0.1]",
        ),
        // Read as host fe80 with maxc 1, as the original did; the message says how to
        // write the IPv6 address.
        (
            &["-f", "8000", "fe80::1"][..],
            65,
            "unknown or invalid address [fe80] (for the IPv6 address, write [fe80::1])",
        ),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
    }
    let mut too_many_groups = vec!["-f", "8000"];
    for _ in 0..33 {
        too_many_groups.extend(["h", "!"]);
    }
    too_many_groups.push("h");
    let o = run(&too_many_groups);
    assert_eq!(o.status.code(), Some(69));
    assert!(stderr(&o).contains("balance: too many groups"));
    let mut too_many_channels = vec!["-f", "8000"];
    too_many_channels.extend(std::iter::repeat_n("h", 65));
    let o = run(&too_many_channels);
    assert_eq!(o.status.code(), Some(69));
    assert!(stderr(&o).contains("balance: too many channels in one group"));
}

#[test]
fn help_and_version() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for option in [
        "-a", "-b", "-B", "-c", "-d", "-f", "-H", "-i", "-M", "-p", "-t", "-T", "-6",
    ] {
        assert!(
            help.contains(&format!("  {option} ")),
            "{option} documented"
        );
    }
    for long in [
        "--user",
        "--workers",
        "--pidfile",
        "--run-dir",
        "--control-group",
    ] {
        assert!(help.contains(long), "{long} documented");
    }
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("balance {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Output that cannot be written ends with an exit code, never a panic: a reader that went
/// away (`balance --help | head -1`) is no error, a full device is 74, and a usage error
/// keeps its 64 whatever happens to its message.
#[test]
fn unwritable_output_is_an_exit_code_not_a_panic() {
    let dir = temp_dir("unwritable");
    let full = || Stdio::from(std::fs::File::create("/dev/full").expect("/dev/full"));
    let closed_pipe = || {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        Stdio::from(write)
    };
    // (exit code, what reached stderr when it was not one of the two above)
    let run_with = |args: &[&str], stdout: Stdio, stderr: Option<Stdio>| {
        let log = dir.join("stderr");
        let stderr = stderr.unwrap_or_else(|| std::fs::File::create(&log).expect("log").into());
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn balance");
        let pid = child.id();
        let mut status = None;
        let ended = wait_until(COMMAND_LIMIT, || {
            status = child.try_wait().expect("wait");
            status.is_some()
        });
        if !ended {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!("balance {args:?} did not end");
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        (status.and_then(|s| s.code()), text)
    };
    for args in [&["--help"][..], &["--version"]] {
        assert_eq!(
            run_with(args, closed_pipe(), None),
            (Some(0), String::new()),
            "{args:?} into a closed pipe"
        );
        let (code, text) = run_with(args, full(), None);
        assert_eq!(code, Some(74), "{args:?} into /dev/full: {text}");
        assert!(text.contains("cannot write the output"), "{text}");
    }
    for stderr_to in [full(), closed_pipe()] {
        let (code, _) = run_with(&["-t", "0", "8000"], Stdio::null(), Some(stderr_to));
        assert_eq!(code, Some(64), "a usage error whose message is lost");
    }
}

#[test]
fn thirty_two_groups_of_sixty_four_channels() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let mut operands = Vec::new();
    for g in 0..32 {
        if g > 0 {
            operands.push("!".to_string());
        }
        for _ in 0..64 {
            operands.push(backend.operand());
        }
    }
    let b = Balance::start(&[], &operands);
    let (_f, t) = table(&b.table_path());
    let snap = t.snapshot().expect("snapshot");
    assert_eq!(snap.groups.len(), 32);
    assert!(snap.groups.iter().all(|g| g.channels.len() == 64));
    assert_eq!(greeting(b.addr()), "B1");
    let show = b.control("show");
    assert_eq!(
        String::from_utf8_lossy(&show.stdout).lines().count(),
        1 + 32 * 64
    );
}

#[test]
fn bundled_flags_options_after_operands_and_service_names() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let dir = temp_dir("cli");
    let run_dir = dir.join("run");
    let port = free_port();
    // Options after the operands (GNU permutation), bundled -fd, a service name as the
    // channel port, and a channel whose port defaults to the listen port.
    let mut child = Command::new(BIN)
        .arg(port.to_string())
        .arg(backend.operand())
        .arg("127.0.0.1:ssh")
        .arg("127.0.0.1::5")
        .args(["-fd", "-b", "127.0.0.1", "--workers", "1", "--run-dir"])
        .arg(&run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let table_path = run_dir.join(format!("balance.{port}.127.0.0.1"));
    let up = wait_until(Duration::from_secs(10), || {
        table_path.exists() && worker_pids(pid).len() == 1
    });
    let ports: Vec<(u16, i32)> = if up {
        let (_f, t) = table(&table_path);
        t.snapshot()
            .map(|s| {
                s.groups[0]
                    .channels
                    .iter()
                    .map(|c| (c.addr.map_or(0, |a| a.port()), c.maxc))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let still_foreground = child.try_wait().ok().flatten().is_none();
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    assert!(up, "started");
    assert!(
        still_foreground,
        "-fd after the operands kept it in the foreground"
    );
    assert_eq!(ports, vec![(backend.port(), 0), (22, 0), (port, 5)]);
}
