//! The worker sandbox under test: the real seccomp policy and landlock rules are installed in
//! a probe process (this test binary, re-executed), which then tries what a compromised
//! worker would. Forbidden system calls must kill it with SIGSYS; connects and binds outside
//! the channels' ports must be refused by landlock.
//!
//! This target has its own `main` (no libtest harness) so that the probe role is not a
//! test that passes by doing nothing.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{OutputWithin, COMMAND_LIMIT};

const PROBE_ENV: &str = "BALANCE_SANDBOX_PROBE";
const SIGSYS: i32 = 31;

fn main() {
    if let Ok(probe) = std::env::var(PROBE_ENV) {
        std::process::exit(run_probe(&probe));
    }
    let cases: &[(&str, Case)] = &[
        ("open is killed", || expect_sigsys("open")),
        ("execve is killed", || expect_sigsys("execve")),
        ("fork is killed", || expect_sigsys("fork")),
        ("bind without -B is killed", || expect_sigsys("bind")),
        ("listen is killed even with -B", || expect_sigsys("listen")),
        ("ptrace is killed", || expect_sigsys("ptrace")),
        ("a raw socket family is killed", || {
            expect_sigsys("unix-socket")
        }),
        ("a UDP socket is killed", || expect_sigsys("udp-socket")),
        ("a raw IP socket is killed", || expect_sigsys("raw-socket")),
        ("executable memory is killed", || expect_sigsys("mmap-exec")),
        (
            "a write to the table's configuration is a memory fault",
            expect_table_write_faults,
        ),
        ("connect only to channel ports", landlock_connect),
        ("bind only to port 0", landlock_bind),
        ("allowed calls keep working", allowed_calls),
        (
            "a kernel without landlock: one warning, still serving",
            without_landlock,
        ),
    ];
    let mut failed = 0;
    for (name, case) in cases {
        match case() {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("sandbox: {} passed, {failed} failed", cases.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

/// One check, run in this (unrestricted) process; it starts probes as needed.
type Case = fn() -> Result<(), String>;

fn probe(what: &str, extra: &[String]) -> std::process::Output {
    Command::new(std::env::current_exe().expect("current exe"))
        .env(PROBE_ENV, what)
        .args(extra)
        .output_within(COMMAND_LIMIT)
        .expect("run probe")
}

fn expect_sigsys(what: &str) -> Result<(), String> {
    let out = probe(what, &[]);
    match out.status.signal() {
        Some(SIGSYS) => Ok(()),
        other => Err(format!(
            "{what}: expected SIGSYS, got signal {other:?} / status {:?}; stderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// The probe maps a table as a worker does, locks down, counts once (allowed), then writes
/// to the configuration: the process must die of SIGSEGV, reported as such (not as a
/// seccomp violation, which std's fault handler would turn it into).
fn expect_table_write_faults() -> Result<(), String> {
    let out = probe("table-write", &[]);
    match (out.status.signal(), String::from_utf8_lossy(&out.stderr)) {
        (Some(libc::SIGSEGV), stderr) if stderr.contains("counted") => Ok(()),
        (signal, stderr) => Err(format!(
            "expected SIGSEGV after counting, got signal {signal:?} / status {:?}; stderr: {stderr}",
            out.status.code()
        )),
    }
}

fn expect_exit_zero(what: &str, extra: &[String]) -> Result<(), String> {
    let out = probe(what, extra);
    if out.status.code() == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "{what}: status {:?} signal {:?}; stderr: {}",
            out.status.code(),
            out.status.signal(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn landlock_connect() -> Result<(), String> {
    let allowed = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let other = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let ports = [allowed.local_addr(), other.local_addr()]
        .map(|a| a.map(|a| a.port().to_string()).unwrap_or_default());
    expect_exit_zero("landlock-connect", &ports)
}

fn landlock_bind() -> Result<(), String> {
    expect_exit_zero("landlock-bind", &[])
}

fn allowed_calls() -> Result<(), String> {
    expect_exit_zero("allowed", &[])
}

/// In the probe process: lock down exactly like a worker, then try `what`.
/// Exit 0 = the expected refusal or success happened; 1 = the sandbox let it through.
fn run_probe(what: &str) -> i32 {
    let args: Vec<u16> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let source_bind = matches!(what, "listen" | "landlock-bind");
    let filter = balance::sandbox::worker_filter(source_bind).expect("compile policy");
    // For "table-write": a table mapped as a worker maps it, both descriptors closed.
    let table = (what == "table-write").then(common::worker_table);
    // Like a worker, make the event loop's epoll instance before the lockdown.
    let poll = mio::Poll::new().expect("epoll");
    let connect_ports: Vec<u16> = args.first().copied().into_iter().collect();
    let landlock = balance::sandbox::lock_down_worker(&connect_ports, &filter).expect("lockdown");
    let landlock_full = landlock == balance::sandbox::Landlock::Full;
    match what {
        "open" => report(std::fs::File::open("/etc/hostname").is_err()),
        "execve" => report(probe_execve()),
        "fork" => report(probe_fork()),
        "bind" | "listen" => {
            let ok = TcpListener::bind("127.0.0.1:0").is_err();
            report(ok)
        }
        "ptrace" => report(probe_ptrace()),
        "unix-socket" => report(std::os::unix::net::UnixDatagram::unbound().is_err()),
        "udp-socket" | "raw-socket" => {
            use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
            let kind = if what == "udp-socket" {
                SockType::Datagram
            } else {
                SockType::Raw
            };
            report(socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None).is_err())
        }
        "mmap-exec" => report(probe_mmap_exec()),
        "landlock-connect" => {
            if !landlock_full {
                eprintln!("landlock not fully enforced on this kernel");
                return 1;
            }
            let (allowed, other) = (args[0], args[1]);
            let to = |p: u16| std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], p)));
            let ok = to(allowed).is_ok()
                && to(other).err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES);
            report(ok)
        }
        "landlock-bind" => {
            if !landlock_full {
                eprintln!("landlock not fully enforced on this kernel");
                return 1;
            }
            report(probe_bind_ports())
        }
        "allowed" => report(probe_allowed(poll)),
        "table-write" => {
            let table = table.expect("table");
            let counters = table.counters(0, 0).expect("counters");
            counters
                .sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("counted");
            // Must fault: the configuration is mapped read-only.
            table
                .header()
                .shutdown
                .store(1, std::sync::atomic::Ordering::Relaxed);
            1
        }
        _ => 2,
    }
}

fn report(ok: bool) -> i32 {
    if ok {
        0
    } else {
        1
    }
}

fn probe_fork() -> bool {
    // SAFETY: if fork succeeded (it must not), the child exits at once without touching
    // anything.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    pid < 0
}

fn probe_ptrace() -> bool {
    // SAFETY: PTRACE_TRACEME with null arguments touches no memory.
    unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 }
}

fn probe_mmap_exec() -> bool {
    // SAFETY: an anonymous private mapping with no address hint aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    p == libc::MAP_FAILED
}

fn probe_execve() -> bool {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated strings and null-terminated arrays that outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) < 0 }
}

/// With -B, binding port 0 (a source address) works, a listening port does not.
fn probe_bind_ports() -> bool {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let try_bind = |port: u16| -> nix::Result<()> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))
    };
    try_bind(0).is_ok() && try_bind(8099) == Err(nix::errno::Errno::EACCES)
}

/// What a worker does all day still works: allocate, open a TCP socket, register it with
/// the event loop, wait for events with a timeout, deregister, close, write to stderr.
fn probe_allowed(mut poll: mio::Poll) -> bool {
    use mio::unix::SourceFd;
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let v: Vec<u8> = vec![7; 8 << 20];
    eprintln!("allocated {} bytes", v.len());
    let Ok(fd) = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    let raw = fd.as_raw_fd();
    let registry = poll.registry();
    if registry
        .register(&mut SourceFd(&raw), mio::Token(1), mio::Interest::WRITABLE)
        .is_err()
    {
        return false;
    }
    let mut events = mio::Events::with_capacity(8);
    let waited = poll
        .poll(&mut events, Some(std::time::Duration::from_millis(10)))
        .is_ok();
    let deregistered = poll.registry().deregister(&mut SourceFd(&raw)).is_ok();
    drop(fd);
    waited && deregistered && v.iter().all(|b| *b == 7)
}

/// Runs the real daemon in a process where `landlock_create_ruleset` fails with ENOSYS, as
/// on a kernel without landlock: it must serve anyway, with seccomp, and warn once.
fn without_landlock() -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    let backend = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let backend_port = backend.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for mut conn in backend.incoming().flatten().take(16) {
            let _ = conn.write_all(b"B1\n");
        }
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let run_dir = std::env::temp_dir().join(format!("balance-nolandlock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let stderr_path =
        std::env::temp_dir().join(format!("balance-nolandlock-{}.err", std::process::id()));
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let filter: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        [(libc::SYS_landlock_create_ruleset, vec![])]
            .into_iter()
            .collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| format!("{e:?}"))?,
    )
    .and_then(TryInto::try_into)
    .map_err(|e| e.to_string())?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_balance"));
    cmd.args(["-f", "--workers", "2", "--run-dir"])
        .arg(&run_dir)
        .args([
            "-b",
            "127.0.0.1",
            &port.to_string(),
            &format!("127.0.0.1:{backend_port}"),
        ])
        .stdin(std::process::Stdio::null())
        .stderr(stderr);
    // SAFETY: between fork and exec the closure only makes the prctl and seccomp system
    // calls on a filter compiled beforehand; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served = false;
    while Instant::now() < deadline && !served {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let _ = BufReader::new(conn).read_line(&mut line);
            served = line == "B1\n";
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().map_err(|e| e.to_string())?;
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    let _ = std::fs::remove_dir_all(&run_dir);
    let warnings = log.matches("landlock not available").count();
    if served && warnings == 1 && status.success() {
        Ok(())
    } else {
        Err(format!(
            "served {served}, {warnings} landlock warnings, status {status:?}; stderr:\n{log}"
        ))
    }
}
