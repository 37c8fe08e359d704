//! The relay through the real binary: integrity in both directions, half-close, idle
//! timeout, socket options, counters, and the `-p` dump.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{sockopt, MsgFlags};

const MIB: usize = 1024 * 1024;

/// A deterministic byte stream (xorshift) so both ends can check it without storing it.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

fn fnv(hash: &mut u64, data: &[u8]) {
    for &b in data {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

#[test]
fn sixty_four_mib_each_way_arrive_intact() {
    if !require_root() {
        return;
    }
    let echo = Backend::start("E", Behaviour::Echo);
    let b = Balance::start(&[], &[echo.operand()]);
    let conn = TcpStream::connect(b.addr()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = conn.try_clone().expect("clone");
    let total = 64 * MIB;
    // Upload and download at the same time: a relay that serves one side first would stall.
    let upload = std::thread::spawn(move || {
        let mut gen = Stream(0x9e37_79b9_7f4a_7c15);
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            gen.fill(&mut buf[..n]);
            fnv(&mut hash, &buf[..n]);
            writer.write_all(&buf[..n]).expect("upload");
            sent += n;
        }
        writer.shutdown(Shutdown::Write).expect("half-close");
        hash
    });
    let mut reader = conn;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).expect("download");
        if n == 0 {
            break;
        }
        fnv(&mut hash, &buf[..n]);
        got += n;
    }
    let sent_hash = upload.join().expect("upload thread");
    assert_eq!(got, total, "bytes back");
    assert_eq!(hash, sent_hash, "checksum of the echoed stream");
    let path = b.table_path();
    assert!(
        wait_until(Duration::from_secs(5), || {
            counters(&path, 0, 0) == (0, 1, total as u64, total as u64)
        }),
        "counters {:?}",
        counters(&path, 0, 0)
    );
}

#[test]
fn half_close_still_gets_the_reply() {
    if !require_root() {
        return;
    }
    // The original closed both sides on the client's EOF (reference §11.30).
    let backend = Backend::start("B6", Behaviour::ReadAllThenReply);
    let b = Balance::start(&[], &[backend.operand()]);
    let mut conn = TcpStream::connect(b.addr()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"abcdef").expect("send");
    conn.shutdown(Shutdown::Write).expect("shutdown");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reply");
    assert_eq!(reply, "B6 got 6 bytes\n");
    let path = b.table_path();
    assert!(wait_until(Duration::from_secs(5), || {
        counters(&path, 0, 0) == (0, 1, 6, reply.len() as u64)
    }));
}

#[test]
fn idle_timeout_closes_quiet_connections_only() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&["-T", "1"], &[backend.operand()]);
    // Busy: a byte every 400 ms for 2 s keeps the connection alive.
    let mut busy = TcpStream::connect(b.addr()).expect("connect");
    busy.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert_eq!(busy.read(&mut buf).expect("greeting"), 3);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        busy.write_all(b"x").expect("still open");
        assert_eq!(busy.read(&mut buf).expect("echo"), 1);
    }
    // Idle: closed after about a second.
    let start = Instant::now();
    let n = busy.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed by the idle timeout");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
}

#[test]
fn no_idle_timeout_with_t_zero() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&["-T", "0"], &[backend.operand()]);
    let (mut conn, tag) = hold(b.addr());
    assert_eq!(tag, "B1");
    std::thread::sleep(Duration::from_millis(2500));
    conn.write_all(b"y").expect("still open");
    let mut buf = [0u8; 1];
    conn.read_exact(&mut buf).expect("echo after 2.5 s idle");
    assert_eq!(&buf, b"y");
}

#[test]
fn the_largest_timeouts_do_not_fire() {
    if !require_root() {
        return;
    }
    // The largest -t and -T the command line takes (68 years): a worker adding them up must
    // neither die nor fire them.
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let big = i32::MAX.to_string();
    let b = Balance::start(
        &["-t", &big, "-T", &big],
        &[refused_operand(), backend.operand()],
    );
    let workers = b.workers();
    for i in 0..3u8 {
        let (mut conn, tag) = hold(b.addr());
        assert_eq!(tag, "B1", "the refused channel fails over to the next");
        conn.write_all(&[b'a' + i]).expect("write");
        let mut buf = [0u8; 1];
        conn.read_exact(&mut buf).expect("echo");
        assert_eq!(buf[0], b'a' + i);
    }
    assert_eq!(b.workers(), workers, "no worker was replaced");
}

/// Duplicates descriptor `fd` of process `pid` into this process (root may do this).
fn steal_fd(pid: u32, fd: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscalls with integer arguments; the returned descriptors are new and
    // owned by nobody else, so wrapping them in OwnedFd is sound.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        (got >= 0).then(|| OwnedFd::from_raw_fd(got as i32))
    }
}

#[test]
fn relayed_sockets_have_nodelay_and_keepalive() {
    if !require_root() {
        return;
    }
    use nix::sys::socket::{getpeername, getsockopt, sockopt, SockaddrStorage};
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start(&[], &[backend.operand()]);
    let (client, tag) = hold(b.addr());
    assert_eq!(tag, "B1");
    let client_port = client.local_addr().expect("addr").port();
    let mut seen = Vec::new();
    for worker in b.workers() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{worker}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(sock) = steal_fd(worker, fd) else {
                continue;
            };
            let Ok(peer) = getpeername::<SockaddrStorage>(sock.as_raw_fd()) else {
                continue;
            };
            let Some(peer) = peer.as_sockaddr_in() else {
                continue;
            };
            if peer.port() == client_port || peer.port() == backend.port() {
                let nodelay = getsockopt(&sock, sockopt::TcpNoDelay).expect("nodelay");
                let keepalive = getsockopt(&sock, sockopt::KeepAlive).expect("keepalive");
                seen.push((peer.port(), nodelay, keepalive));
            }
        }
    }
    seen.sort_unstable();
    let mut expected = vec![(client_port, true, true), (backend.port(), true, true)];
    expected.sort_unstable();
    assert_eq!(seen, expected);
}

/// `-p` with one worker in front of `backend`, started through `wrapper` (see [`Start`]).
fn dumping<'a>(backend: &Backend, wrapper: &'a [&'a str]) -> Balance {
    Balance::start_with(Start {
        flags: &["-p"],
        operands: &[backend.operand()],
        workers: 1,
        wrapper,
        ..Start::default()
    })
}

/// A `-p` dump that stdout cannot take (here /dev/full) is lost, not the connections, and
/// the loss is said once on stderr (it used to go unsaid).
#[test]
fn a_dump_that_cannot_be_written_is_said_once() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = dumping(&backend, &["sh", "-c", "exec \"$0\" \"$@\" >/dev/full"]);
    for _ in 0..3 {
        assert_eq!(greeting(b.addr()), "B1");
    }
    assert!(
        b.logged("-p: cannot write the dump on stdout (No space left on device"),
        "{}",
        b.stderr()
    );
    assert_eq!(b.stderr().matches("cannot write the dump").count(), 1);
}

#[test]
fn packet_dump_in_the_originals_format() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = dumping(&backend, &[]);
    let (mut conn, tag) = hold(b.addr());
    assert_eq!(tag, "B1");
    conn.write_all(b"hello\tworld\\ \x01\xff\x7f~\r\nline2\n")
        .expect("send");
    let mut echo = [0u8; 25];
    conn.read_exact(&mut echo).expect("echo");
    conn.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    let expected = "-< 3\nB1\\0A\n\n-> 25\nhello\\09world\\\\ \\01\\FF\\7F~\\0D\\0A\nline2\\0A\n\n-< 25\nhello\\09world\\\\ \\01\\FF\\7F~\\0D\\0A\nline2\\0A\n\n-> 0\n\n";
    assert!(
        wait_until(Duration::from_secs(5), || b.stdout().starts_with(expected)),
        "stdout:\n{}",
        b.stdout()
    );
}

/// Descriptors of `pid` whose link starts with `kind` ("pipe:", "socket:").
fn fds_of_kind(pid: u32, kind: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with(kind))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn idle_connections_hold_no_pipe() {
    if !require_root() {
        return;
    }
    let backend = Backend::start("B1", Behaviour::TagEcho);
    let b = Balance::start_with(Start {
        operands: &[backend.operand()],
        workers: 1,
        ..Start::default()
    });
    let worker = b.workers()[0];
    // Every connection has moved data (the greeting) and is now idle.
    let held: Vec<_> = (0..40).map(|_| hold(b.addr())).collect();
    assert!(held.iter().all(|(_, t)| t == "B1"));
    let sockets = fds_of_kind(worker, "socket:");
    let pipes = fds_of_kind(worker, "pipe:");
    assert!(sockets >= 80, "two sockets per connection: {sockets}");
    // Only the pool's spare pipes (two ends each) remain, not one per connection.
    assert!(pipes <= 8, "{pipes} pipe ends for 40 idle connections");
}

/// Balance with one worker in front of a backend the test plays itself on `listener`; the
/// worker's pid.
fn one_worker_in_front_of(listener: &std::net::TcpListener) -> (Balance, u32) {
    one_worker_with(&[], listener)
}

/// The same, with options.
fn one_worker_with(flags: &[&str], listener: &std::net::TcpListener) -> (Balance, u32) {
    let operand = listener.local_addr().expect("addr").to_string();
    let b = Balance::start_with(Start {
        flags,
        operands: &[operand],
        workers: 1,
        ..Start::default()
    });
    let worker = b.workers()[0];
    (b, worker)
}

/// After a burst of bulk transfers, a worker keeps only a few spare pipes: idle ones hold
/// descriptors and count against the service user's pipe-buffer quota, which every balance
/// instance on the host shares (past it, new pipes silently get smaller).
#[test]
fn a_burst_of_bulk_transfers_leaves_few_spare_pipes() {
    if !require_root() {
        return;
    }
    const CONNS: usize = 40;
    const BYTES: usize = 8 << 20;
    // A backend that lets every upload stall in balance (each flow then holds a pipe with
    // data in it), then reads them all to the end.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    // Small receive buffers (inherited by accepted sockets): balance's writes stall soon.
    nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::RcvBuf, &4096)
        .expect("SO_RCVBUF");
    let (b, worker) = one_worker_in_front_of(&listener);
    let baseline = fds_of_kind(worker, "pipe:");
    let addr = b.addr();
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut conn = TcpStream::connect(addr).expect("connect");
                conn.set_write_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                conn.write_all(&vec![7u8; BYTES]).expect("upload");
                conn.shutdown(Shutdown::Write).expect("shutdown");
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.len() < CONNS && Instant::now() < deadline {
        match listener.accept() {
            Ok((conn, _)) => accepted.push(conn),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(accepted.len(), CONNS, "every upload reached the backend");
    // A first sip from each: balance's first (copied) chunk drains, the flow turns bulk,
    // and the next chunk waits in a pipe.
    for conn in &mut accepted {
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut sip = vec![0u8; 64 << 10];
        conn.read_exact(&mut sip).expect("first 64 KiB");
    }
    assert!(
        wait_until(Duration::from_secs(10), || fds_of_kind(worker, "pipe:")
            >= baseline + CONNS),
        "{} pipe ends during the stall",
        fds_of_kind(worker, "pipe:")
    );
    for mut conn in accepted {
        let mut got = 64 << 10;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("backend read: {e}"),
            }
        }
        assert_eq!(got, BYTES);
    }
    for c in clients {
        c.join().expect("client");
    }
    // Drained pipes went back to the pool, which keeps only a few.
    assert!(
        wait_until(Duration::from_secs(5), || fds_of_kind(worker, "pipe:")
            <= 34),
        "{} pipe ends kept after the burst",
        fds_of_kind(worker, "pipe:")
    );
}

/// How long balance waits, without progress, for the survivor of a reset to take what it
/// is still owed (`ABORT_STALL` in the worker).
const ABORT_STALL: Duration = Duration::from_secs(5);

/// Sends a reset: linger 0 makes close() abort the connection.
fn reset(conn: TcpStream) {
    let now = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &now)
        .expect("SO_LINGER");
    drop(conn);
}

/// Writes (non-blocking) until the path stalls for 300 ms or `cap` bytes are written; how
/// many were.
fn write_until_stalled(conn: &mut TcpStream, cap: usize) -> usize {
    conn.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![5u8; 1 << 16];
    let (mut written, mut stalled_since) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while written < cap && Instant::now() < deadline {
        match conn.write(&chunk[..chunk.len().min(cap - written)]) {
            Ok(n) => {
                written += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    written
}

/// Bytes written on a socket that its peer has not acknowledged yet.
fn unacknowledged(conn: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, which points at `n`.
    let rc = unsafe { libc::ioctl(conn.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "TIOCOUTQ");
    usize::try_from(n).expect("queue length")
}

/// What a socket's peer has not acknowledged once that stops changing (checked every
/// 100 ms, for at most 10 s): what a reset of this socket now would lose.
fn settled_unacknowledged(conn: &TcpStream) -> usize {
    let mut queued = unacknowledged(conn);
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let now = unacknowledged(conn);
        if now == queued {
            break;
        }
        queued = now;
    }
    queued
}

/// Reads to the end; the bytes read and how the stream ended.
fn read_to_end_or_reset(conn: &mut TcpStream) -> (usize, &'static str) {
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    for _ in 0..100_000 {
        match conn.read(&mut buf) {
            Ok(0) => return (got, "end of stream"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, "reset"),
            Err(e) => panic!("read: {e}"),
        }
    }
    panic!("the stream never ended");
}

/// A backend that answers and then resets (an HTTP server refusing an upload: its answer,
/// then a close with the request unread) does not lose the end of its answer in balance:
/// the client gets everything that reached balance, then the reset, as it would directly.
#[test]
fn what_a_backend_sent_before_its_reset_reaches_the_client() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, _worker) = one_worker_in_front_of(&listener);
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    let (mut backend, _) = listener.accept().expect("accept");
    // The client uploads, and the backend never reads: the upload stalls, pending in
    // balance too, and the backend's reset finds it unread. (The client then stops writing:
    // its socket reports the reset once, to the read below.)
    let uploaded = write_until_stalled(&mut client, 256 * MIB);
    assert!(uploaded < 256 * MIB, "the upload never stalled");
    // The client does not read yet: the answer fills its socket, balance's pipe and
    // balance's socket towards the backend.
    let written = write_until_stalled(&mut backend, 16 * MIB);
    // Whatever the backend's kernel still holds is lost with the reset (as on a direct
    // connection); the rest has reached balance. Wait for that to settle.
    let reached_balance = written - settled_unacknowledged(&backend);
    assert!(
        reached_balance > 512 * 1024,
        "only {reached_balance} bytes reached balance"
    );
    reset(backend);
    let (got, ended) = read_to_end_or_reset(&mut client);
    assert_eq!(got, reached_balance, "bytes of the answer the client got");
    assert_eq!(ended, "reset");
}

/// A short answer followed by a reset (an HTTP server refusing a request body: its "413",
/// then a close with the body unread) reaches the client at once, then the reset: the last
/// chunk is not held back waiting for a FIN that, on an aborted connection, never comes.
#[test]
fn a_short_answer_before_a_reset_is_not_held_back() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, _worker) = one_worker_in_front_of(&listener);
    let answer =
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let mut delays = Vec::new();
    for _ in 0..5 {
        let mut client = TcpStream::connect(b.addr()).expect("connect");
        let (mut backend, _) = listener.accept().expect("accept");
        client
            .write_all(b"POST /upload HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            .expect("request");
        client.write_all(&[0u8; 4096]).expect("part of the body");
        let mut head = [0u8; 16];
        backend
            .read_exact(&mut head)
            .expect("request reached the backend");
        backend.write_all(answer).expect("answer");
        let sent = Instant::now();
        reset(backend);
        let (got, ended) = read_to_end_or_reset(&mut client);
        delays.push(sent.elapsed());
        assert_eq!((got, ended), (answer.len(), "reset"));
    }
    delays.sort();
    assert!(
        delays[2] < Duration::from_millis(100),
        "answer and reset took {delays:?}"
    );
}

/// With `-p`, a direction whose source reset ends with -1 in the dump, as in the original.
#[test]
fn packet_dump_shows_a_reset_as_minus_one() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, _worker) = one_worker_with(&["-p"], &listener);
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    let (mut backend, _) = listener.accept().expect("accept");
    backend.write_all(b"hi").expect("send");
    let mut hi = [0u8; 2];
    client.read_exact(&mut hi).expect("hi");
    reset(backend);
    let (_, ended) = read_to_end_or_reset(&mut client);
    assert_eq!(ended, "reset");
    assert!(
        wait_until(Duration::from_secs(5), || b.stdout()
            == "-< 2\nhi\n-< -1\n\n"),
        "stdout:\n{}",
        b.stdout()
    );
}

/// A client that resets its connection in the middle of an upload, while the backend is not
/// reading (balance's buffers towards it full), gets its connection ended within
/// `ABORT_STALL`, and the backend is told with a reset: a peer that takes nothing does not
/// hold a connection (and a place under maxc) for a side that is gone.
#[test]
fn a_reset_ends_the_connection_when_the_other_side_takes_nothing() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, worker) = one_worker_in_front_of(&listener);
    let baseline = fds_of_kind(worker, "socket:");
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    let (mut backend, _) = listener.accept().expect("accept");
    // Upload until everything between the client and the backend is full.
    let written = write_until_stalled(&mut client, 256 * MIB);
    assert!(written < 256 * MIB, "the upload never stalled");
    assert_eq!(fds_of_kind(worker, "socket:"), baseline + 2);
    let reset_at = Instant::now();
    reset(client);
    assert!(
        wait_until(ABORT_STALL + Duration::from_secs(5), || fds_of_kind(
            worker, "socket:"
        ) == baseline),
        "balance still holds the connection"
    );
    assert!(
        reset_at.elapsed() >= ABORT_STALL - Duration::from_millis(500),
        "the backend was not given its time to read ({:?})",
        reset_at.elapsed()
    );
    // The backend learns of it as a reset, not as a clean end of the upload.
    let (_, ended) = read_to_end_or_reset(&mut backend);
    assert_eq!(ended, "reset");
}

/// When one side resets while the other is blocked writing towards it (an HTTP client that
/// sends its whole body before reading the answer, a backend that sends its whole reply
/// before reading the request), balance takes and drops what the survivor writes for the
/// side that is gone, so that the survivor gets on to reading what it is owed, then the
/// reset; without that, both wait until `ABORT_STALL` and the survivor loses it all.
#[test]
fn a_survivor_that_writes_before_it_reads_still_gets_what_it_is_owed() {
    if !require_root() {
        return;
    }
    for backend_fails in [false, true] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (b, _worker) = one_worker_in_front_of(&listener);
        let client = TcpStream::connect(b.addr()).expect("connect");
        let (backend, _) = listener.accept().expect("accept");
        let (mut failing, mut survivor) = if backend_fails {
            (backend, client)
        } else {
            (client, backend)
        };
        // Both ways full: the failing side's upload waits in balance for a survivor that
        // is busy writing, and the survivor's writes wait for a side that does not read.
        let uploaded = write_until_stalled(&mut failing, 256 * MIB);
        assert!(uploaded < 256 * MIB, "the upload never stalled");
        let answered = write_until_stalled(&mut survivor, 256 * MIB);
        assert!(answered < 256 * MIB, "the answer never stalled");
        // What the failing side's kernel still holds is lost with its reset.
        let reached_balance = uploaded - settled_unacknowledged(&failing);
        let reset_at = Instant::now();
        reset(failing);
        // The survivor finishes writing (4 MiB more than fits anywhere), then reads.
        survivor.set_nonblocking(false).expect("blocking");
        survivor
            .set_write_timeout(Some(ABORT_STALL - Duration::from_secs(2)))
            .expect("timeout");
        let side = if backend_fails { "client" } else { "backend" };
        if let Err(e) = survivor.write_all(&vec![9u8; 4 * MIB]) {
            panic!(
                "the {side}'s writes stalled after the reset ({e}, {:?})",
                reset_at.elapsed()
            );
        }
        let (got, ended) = read_to_end_or_reset(&mut survivor);
        assert_eq!(
            (got, ended),
            (reached_balance, "reset"),
            "what the {side} read, and how it ended"
        );
        assert!(
            reset_at.elapsed() < ABORT_STALL,
            "the {side} waited {:?}",
            reset_at.elapsed()
        );
    }
}

/// TCP urgent data (telnet's interrupt, FTP's abort): a read stops at the urgent mark, so
/// the bytes after it must not be taken for the end of the stream or left waiting for more.
/// The urgent byte itself is dropped, as by the original 3.54.
#[test]
fn data_after_urgent_data_is_relayed() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, _worker) = one_worker_in_front_of(&listener);
    // Also on a bulk direction, which moves with splice: splice cannot pass the mark.
    for (close_after, bulk) in [(false, false), (true, false), (false, true)] {
        for round in 0..5 {
            let mut client = TcpStream::connect(b.addr()).expect("connect");
            let (mut backend, _) = listener.accept().expect("accept");
            backend
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            if bulk {
                client.write_all(&vec![1u8; MIB]).expect("bulk");
                let mut first = vec![0u8; MIB];
                backend.read_exact(&mut first).expect("bulk relayed");
            }
            // Corked, so that all of it (and the FIN) arrives before balance reads: its read
            // then stops at the urgent mark, after "ab".
            let cork = |conn: &TcpStream, on: bool| {
                nix::sys::socket::setsockopt(conn, sockopt::TcpCork, &on).expect("TCP_CORK")
            };
            cork(&client, true);
            client.write_all(b"ab").expect("ab");
            nix::sys::socket::send(client.as_raw_fd(), b"c", MsgFlags::MSG_OOB).expect("urgent");
            client.write_all(b"de").expect("de");
            if close_after {
                client.shutdown(Shutdown::Write).expect("shutdown");
            }
            cork(&client, false);
            let mut got = Vec::new();
            if close_after {
                backend.read_to_end(&mut got).expect("read to the end");
            } else {
                // The client waits for an answer: nothing more comes to end a read.
                let mut buf = [0u8; 16];
                while got.len() < 4 {
                    match backend.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) => panic!("round {round}: backend read after {got:?}: {e}"),
                    }
                }
            }
            assert_eq!(
                String::from_utf8_lossy(&got),
                "abde",
                "round {round}, client closing: {close_after}, bulk first: {bulk}"
            );
        }
    }
    // Bulk data still on its way (spliced) when the urgent byte, more data and the FIN
    // arrive: splice stops at the mark as if at the end, and the bytes after it were lost,
    // under a clean FIN.
    for round in 0..10 {
        let mut client = TcpStream::connect(b.addr()).expect("connect");
        let (mut backend, _) = listener.accept().expect("accept");
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).map(|_| got)
        });
        client.write_all(&vec![1u8; MIB]).expect("bulk");
        nix::sys::socket::send(client.as_raw_fd(), b"c", MsgFlags::MSG_OOB).expect("urgent");
        client.write_all(&[2u8; 1000]).expect("after the mark");
        client.shutdown(Shutdown::Write).expect("shutdown");
        let got = reader.join().expect("reader").expect("read to the end");
        assert_eq!(got.len(), MIB + 1000, "round {round}");
        assert!(got[MIB..].iter().all(|&b| b == 2), "round {round}");
    }
}

/// A connection that one side has ended is reset once nothing moves for
/// `--half-close-timeout` (here 1 s), so that a backend that never answers a client's FIN
/// does not hold it for ever; while data still flows the other way, or waits in balance for
/// a slow reader, it stays open.
#[test]
fn a_half_closed_connection_ends_after_the_half_close_timeout() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, worker) = one_worker_with(&["--half-close-timeout", "1"], &listener);
    let baseline = fds_of_kind(worker, "socket:");
    let half_closed = || half_closed_request(&b, &listener);

    // The backend answers slowly for 2 s: every gap is shorter than the timeout.
    let (mut client, mut backend) = half_closed();
    let started = Instant::now();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        backend.write_all(b"x").expect("slow answer");
    }
    // Then it goes quiet without closing: a second later balance cuts the connection, with
    // a reset, so that the client cannot take what it got for a complete answer.
    assert_eq!(read_to_end_or_reset(&mut client), (8, "reset"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "ended after {took:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || fds_of_kind(worker, "socket:")
            == baseline),
        "balance still holds the connection"
    );
    // The backend had read the client's end already: the reset shows on its next write.
    let late = backend.write_all(b"late").and_then(|()| {
        std::thread::sleep(Duration::from_millis(100));
        backend.write_all(b"late")
    });
    assert!(late.is_err(), "the backend was not reset");

    // A client that pauses its reading: the answer waits in balance, longer than the
    // timeout, and is all delivered.
    let (mut client, mut backend) = half_closed();
    let answer = vec![3u8; 16 * MIB];
    let writer = std::thread::spawn(move || {
        backend.write_all(&answer).expect("answer");
        drop(backend);
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        read_to_end_or_reset(&mut client),
        (16 * MIB, "end of stream")
    );
    writer.join().expect("backend");

    // A side that ends after a silence longer than the timeout: the timeout counts from
    // that end, not from the last data, so an answer that follows at once goes through.
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    let (mut backend, _) = listener.accept().expect("accept");
    client.write_all(b"request").expect("request");
    std::thread::sleep(Duration::from_millis(1500));
    client.shutdown(Shutdown::Write).expect("half-close");
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut request = Vec::new();
    let read = backend.read_to_end(&mut request);
    assert!(
        read.is_ok() && request == b"request",
        "the backend got {read:?} after {request:?}"
    );
    let answered = backend.write_all(b"answer");
    assert!(answered.is_ok(), "balance reset the backend: {answered:?}");
    drop(backend);
    assert_eq!(read_to_end_or_reset(&mut client), (6, "end of stream"));
}

/// A reader that takes nothing at all is not a slow one: data waiting in balance for it
/// keeps a half-closed connection open for four half-close timeouts without progress at
/// most, then both sides are reset (a client that stopped reading held the connection,
/// and its place under maxc, for ever).
#[test]
fn a_reader_that_takes_nothing_does_not_hold_a_half_closed_connection() {
    if !require_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (b, worker) = one_worker_with(&["--half-close-timeout", "1"], &listener);
    let baseline = fds_of_kind(worker, "socket:");
    let (client, mut backend) = half_closed_request(&b, &listener);
    // An answer larger than every buffer on the way, to a client that never reads.
    backend
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let writer = std::thread::spawn(move || {
        let chunk = vec![5u8; 64 * 1024];
        for _ in 0..10_000 {
            if let Err(e) = backend.write_all(&chunk) {
                return Some(e.kind());
            }
        }
        None
    });
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || fds_of_kind(worker, "socket:")
            == baseline),
        "balance still holds the connection after {:?}",
        started.elapsed()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "ended after {took:?}"
    );
    let failed = writer.join().expect("writer");
    assert!(
        failed.is_some_and(
            |k| k != std::io::ErrorKind::WouldBlock && k != std::io::ErrorKind::TimedOut
        ),
        "the backend was not reset: {failed:?}"
    );
    drop(client);
}

/// A client connection through `b` that sent "request" and then its FIN, and the backend
/// connection (accepted on `listener`) that has read both.
fn half_closed_request(b: &Balance, listener: &std::net::TcpListener) -> (TcpStream, TcpStream) {
    let mut client = TcpStream::connect(b.addr()).expect("connect");
    let (mut backend, _) = listener.accept().expect("accept");
    client.write_all(b"request").expect("request");
    client.shutdown(Shutdown::Write).expect("half-close");
    let mut request = Vec::new();
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    backend
        .read_to_end(&mut request)
        .expect("request and its end");
    assert_eq!(request, b"request");
    (client, backend)
}
