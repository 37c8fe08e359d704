//! Helpers shared by the integration tests: real backends on loopback, the real balance
//! binary started and stopped by pid, and bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_balance");

/// Copies balance's binary to `to` (a place another user can run it from) with `cp`, not
/// `std::fs::copy`: a file this test process opens for writing is inherited by any child
/// another test thread forks at that moment, and running the copy then fails with "Text
/// file busy" (ETXTBSY) until that child has exec'd. Only `cp` holds the file open here.
pub fn copy_binary(to: &Path) {
    let status = Command::new("cp")
        .arg("--")
        .arg(BIN)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {BIN} {}: {status}", to.display());
}

/// True when running as root. Under CI (CI=true) a test that needs root fails loudly
/// instead of being skipped.
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root, and CI runs as root"
    );
    eprintln!("skipped: needs root");
    false
}

/// Waits until `cond` holds, polling, for at most `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A fresh directory under /tmp that other users may traverse (for tests that run clients
/// as another user).
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static N: AtomicUsize = AtomicUsize::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_finished_runs);
    let dir = std::env::temp_dir().join(format!(
        "balance-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Removes what earlier test processes left in the temp directory: every
/// `balance-test-TAG-PID-N` whose process PID is gone. Each test process leaves its own
/// directories (run directories, logs, binary copies) for a look after a failure; the next
/// run clears them.
fn sweep_finished_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("balance-test-")) else {
            continue;
        };
        let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// What a backend does with each accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Sends `TAG\n`, then echoes everything back.
    TagEcho,
    /// Reads to EOF, then answers `TAG got N bytes\n` and closes.
    ReadAllThenReply,
    /// Echoes without a greeting (bulk tests).
    Echo,
}

/// A TCP backend on loopback, run by threads; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub tag: String,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(tag: &str, behaviour: Behaviour) -> Backend {
        Self::start_on("127.0.0.1:0", tag, behaviour)
    }

    pub fn start_on(bind: &str, tag: &str, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind(bind).expect("bind backend");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, p, s, t) = (
            Arc::clone(&accepted),
            Arc::clone(&peers),
            Arc::clone(&stop),
            tag.to_string(),
        );
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        p.lock().expect("peers").push(peer);
                        let t = t.clone();
                        thread::spawn(move || serve_backend(conn, &t, behaviour));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            addr,
            tag: tag.to_string(),
            accepted,
            peers,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The operand naming this backend on balance's command line.
    pub fn operand(&self) -> String {
        match self.addr {
            SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_backend(mut conn: TcpStream, tag: &str, behaviour: Behaviour) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::TagEcho | Behaviour::Echo => {
            if behaviour == Behaviour::TagEcho
                && conn.write_all(format!("{tag}\n").as_bytes()).is_err()
            {
                return;
            }
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        Behaviour::ReadAllThenReply => {
            let mut total = 0;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(_) => return,
                }
            }
            let _ = conn.write_all(format!("{tag} got {total} bytes\n").as_bytes());
        }
    }
}

/// A listener that never accepts, with its backlog full: connects to it time out (SYNs
/// dropped), which is how `-t` is tested.
pub struct Blackhole {
    pub port: u16,
    _listener: std::os::fd::OwnedFd,
    _fillers: Vec<std::os::fd::OwnedFd>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
        use std::os::fd::AsRawFd;
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
        socket::listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
        let addr: SockaddrIn = socket::getsockname(fd.as_raw_fd()).expect("getsockname");
        let port = addr.port();
        // Fill the queue: after this, further SYNs are dropped.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            let s = socket::socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .expect("socket");
            let _ = socket::connect(s.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port));
            fillers.push(s);
        }
        thread::sleep(Duration::from_millis(200));
        Blackhole {
            port,
            _listener: fd,
            _fillers: fillers,
        }
    }

    pub fn operand(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A port on 127.0.0.1 with nothing listening (connects are refused).
pub fn refused_operand() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A balance instance in the foreground, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Balance {
    pub child: Option<Child>,
    pub pid: u32,
    pub port: u16,
    pub run_dir: PathBuf,
    pub bind: String,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

/// Options for [`Balance::start_with`].
pub struct Start<'a> {
    pub flags: &'a [&'a str],
    pub operands: &'a [String],
    pub workers: usize,
    pub bind: &'a str,
    pub port: Option<u16>,
    /// A command that execs balance (e.g. `prlimit --nproc=4:4 --`), keeping the pid.
    pub wrapper: &'a [&'a str],
    /// The run directory; default: a fresh one.
    pub run_dir: Option<&'a Path>,
}

impl Default for Start<'_> {
    fn default() -> Self {
        Start {
            flags: &[],
            operands: &[],
            workers: 2,
            bind: "127.0.0.1",
            port: None,
            wrapper: &[],
            run_dir: None,
        }
    }
}

impl Balance {
    /// `balance -f -b 127.0.0.1 --run-dir DIR --workers 2 FLAGS PORT OPERANDS`, ready to serve.
    pub fn start(flags: &[&str], operands: &[String]) -> Balance {
        Self::start_with(Start {
            flags,
            operands,
            ..Start::default()
        })
    }

    pub fn start_with(opts: Start<'_>) -> Balance {
        let run_dir = opts
            .run_dir
            .map_or_else(|| temp_dir("run").join("balance"), Path::to_path_buf);
        let port = opts.port.unwrap_or_else(free_port);
        let logs = temp_dir("logs");
        let stderr_path = logs.join("stderr");
        let stdout_path = logs.join("stdout");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.arg("-f")
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--workers")
            .arg(opts.workers.to_string());
        if !opts.bind.is_empty() {
            cmd.arg("-b").arg(opts.bind);
        }
        cmd.args(opts.flags)
            .arg(port.to_string())
            .args(opts.operands)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        let child = cmd.spawn().expect("spawn balance");
        let pid = child.id();
        let mut b = Balance {
            child: Some(child),
            pid,
            port,
            run_dir,
            bind: opts.bind.to_string(),
            stderr_path,
            stdout_path,
        };
        let table = b.table_path();
        let up = wait_until(Duration::from_secs(10), || {
            table.exists()
                && worker_pids(pid).len() == opts.workers
                && b.stderr().contains(" started: ")
        });
        if !up {
            let status = b.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "balance did not come up (status {status:?}); stderr:\n{}",
                b.stderr()
            );
        }
        b
    }

    pub fn table_path(&self) -> PathBuf {
        let bind = if self.bind.is_empty() {
            "0.0.0.0"
        } else {
            &self.bind
        };
        self.run_dir.join(format!("balance.{}.{}", self.port, bind))
    }

    pub fn addr(&self) -> SocketAddr {
        let ip: std::net::IpAddr = self.bind.parse().unwrap_or(Ipv4Addr::LOCALHOST.into());
        SocketAddr::new(ip, self.port)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (up to 5 s) until stderr, where the foreground daemon logs, contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        wait_until(Duration::from_secs(5), || self.stderr().contains(text))
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn workers(&self) -> Vec<u32> {
        worker_pids(self.pid)
    }

    /// Runs `balance -c CMD` against this instance.
    pub fn control(&self, command: &str) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("--run-dir").arg(&self.run_dir);
        if !self.bind.is_empty() {
            cmd.arg("-b").arg(&self.bind);
        }
        cmd.arg("-c")
            .arg(command)
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .output_within(COMMAND_LIMIT)
            .expect("run balance -c")
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns its status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(self.pid, nix::sys::signal::Signal::SIGTERM);
        wait_for_exit(&mut child, Duration::from_secs(10))
    }
}

impl Drop for Balance {
    fn drop(&mut self) {
        let workers = self.workers();
        self.terminate();
        for w in workers {
            signal(w, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// How long a command a test runs to completion may take before it counts as hung.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Waits up to `limit` for `child` to exit, and kills it if it has not; its status.
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// `Command::output` with a time limit: stdin is /dev/null, stdout and stderr are captured,
/// and a command still running after `limit` is killed (by its pid) and fails the test
/// instead of hanging the suite.
pub trait OutputWithin {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{self:?} still running after {limit:?}: killed");
            }
            thread::sleep(Duration::from_millis(10));
        };
        // A daemon the command started may hold the pipes open: wait for them, bounded too.
        while !(stdout.is_finished() && stderr.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "{self:?} exited but its output stayed open after {limit:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Live (not zombie) children of `pid` that run `balance --worker`.
pub fn worker_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some((state, ppid)) = proc_state(child) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if ppid == pid && state != 'Z' && cmdline.split(|&b| b == 0).any(|a| a == b"--worker") {
            out.push(child);
        }
    }
    out
}

/// The names in a directory (none when it does not exist).
pub fn dir_entries(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// (state, ppid) from /proc/PID/stat.
pub fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether a process is gone or a zombie (PID 1 here reaps orphans late).
pub fn is_dead(pid: u32) -> bool {
    proc_state(pid).is_none_or(|(s, _)| s == 'Z' || s == 'X')
}

/// A field of /proc/PID/status, e.g. "Uid" or "CapEff".
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// Connects to `addr` and returns the first line the backend sends (its tag).
pub fn greeting(addr: SocketAddr) -> String {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    let _ = BufReader::new(conn).read_line(&mut line);
    line.trim_end().to_string()
}

/// Connects from a chosen source address and returns the greeting line.
pub fn greeting_from(source: std::net::IpAddr, addr: SocketAddr) -> String {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let family = if source.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd =
        socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )
    .expect("bind source");
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).expect("connect");
    let conn = TcpStream::from(fd);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    let _ = BufReader::new(conn).read_line(&mut line);
    line.trim_end().to_string()
}

/// Opens a connection and waits for the greeting; the connection stays open until dropped.
pub fn hold(addr: SocketAddr) -> (TcpStream, String) {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    (conn, line.trim_end().to_string())
}

/// A fresh table (in an unlinked file) mapped as a worker maps it: the configuration
/// read-only, the counters writable, both descriptors closed.
pub fn worker_table() -> balance::table::Table {
    use std::os::fd::AsRawFd;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "balance-worker-table-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let read_write = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create table");
    let _ = std::fs::remove_file(&path);
    balance::table::Table::initialise(&read_write, &[]).expect("initialise");
    let read_only = std::fs::File::open(format!("/proc/self/fd/{}", read_write.as_raw_fd()))
        .expect("reopen read-only");
    balance::table::Table::open_for_worker(&read_only, &read_write).expect("map as a worker")
}

/// Reads the table file through the library, as the control shell would.
pub fn table(path: &Path) -> (std::fs::File, balance::table::Table) {
    let file = std::fs::File::open(path).expect("open table");
    let table = balance::table::Table::open(&file, false).expect("map table");
    (file, table)
}

/// (current, total, sent, received) of channel (g, c).
pub fn counters(path: &Path, g: usize, c: usize) -> (u32, u64, u64, u64) {
    let (_f, t) = table(path);
    let ch = t.counters(g, c).expect("channel");
    (
        ch.current.load(Ordering::Relaxed),
        ch.total.load(Ordering::Relaxed),
        ch.sent.load(Ordering::Relaxed),
        ch.received.load(Ordering::Relaxed),
    )
}

/// Idle processes of one user, to use up that user's process limit (RLIMIT_NPROC counts
/// every process of the user); killed and reaped by pid when dropped.
pub struct Fillers(Vec<Child>);

impl Fillers {
    pub fn exhaust(user: &str, group: &str, n: usize) -> Fillers {
        Fillers(
            (0..n)
                .map(|_| {
                    Command::new("setpriv")
                        .arg(format!("--reuid={user}"))
                        .arg(format!("--regid={group}"))
                        .args(["--clear-groups", "sleep", "30"])
                        .spawn()
                        .expect("spawn filler")
                })
                .collect(),
        )
    }
}

impl Drop for Fillers {
    fn drop(&mut self) {
        for f in &mut self.0 {
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// A network namespace of the test's own (`ip netns`), with its loopback up; deleted when
/// dropped. Its sysctls (the port range, say) are its own, so a test can set them without
/// touching the machine's.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "balance-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    /// Sets a network sysctl inside the namespace (`net.ipv4.ip_local_port_range`): written
    /// from a thread in the namespace, where /proc/sys/net is the namespace's own.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.enter(move || std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("set {key} in the namespace: {e}"));
    }

    /// `ip netns exec NAME`: a wrapper that runs a command (balance) inside.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Runs `f` on a thread that has entered the namespace: the sockets it opens (backends,
    /// clients) live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
