//! The only place bytes move between a client and its backend.
//!
//! Each direction is pumped independently (a client that keeps uploading while the backend
//! sends a large reply never stalls either side: the original's relay could deadlock there),
//! half-close is passed on (EOF from one side becomes `shutdown(SHUT_WR)` towards the other,
//! and the reverse direction keeps flowing), bytes are counted per chunk with relaxed atomics,
//! and an optional idle timeout ends a connection on which nothing moved in either direction.
//!
//! Small messages (requests, replies, protocol chatter) are read into the worker's one
//! scratch buffer and written on at once: two system calls per message, and a read shorter
//! than the buffer is taken to mean the socket is empty, which saves the read that would only
//! say so. Once a read fills the buffer the direction is bulk, and from then on moves with
//! `splice(2)` through a pipe, so the bytes never enter user space. A pipe comes from the
//! worker's pool only when data is ready and goes back once drained; because it is always
//! drained before the next read, a splice that would block means "socket empty", never "pipe
//! full". An idle connection holds no pipe and no buffer: only a write that the peer cannot
//! take at once leaves its rest in a buffer of the connection's own until it is written.
//!
//! With `-p`, data goes through a user-space buffer instead, so that every read can also be
//! written to stdout in the original's packet-dump format.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest user-space read (`-p` only).
const CHUNK: usize = 32 * 1024;
/// The pipe size asked for (the default is 64 KiB): fewer splices per byte in bulk.
/// Best effort: past the user's pipe-buffer quota the kernel keeps the default.
const PIPE_SIZE: i32 = 256 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
/// Pipes kept for reuse per worker; more are closed when given back.
const POOL_LIMIT: usize = 256;

/// A pipe for splicing: read end, write end, capacity in bytes.
struct Pipe(OwnedFd, OwnedFd, usize);

/// Size of the worker's scratch buffer; a read that fills it makes the direction bulk.
const SCRATCH: usize = 16 * 1024;

/// What the worker lends its connections: spare pipes and the scratch buffer.
pub struct Spares {
    free: RefCell<Vec<Pipe>>,
    scratch: RefCell<Box<[u8]>>,
}

impl Default for Spares {
    fn default() -> Spares {
        Spares {
            free: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0; SCRATCH].into_boxed_slice()),
        }
    }
}

impl Spares {
    fn take(&self) -> io::Result<Pipe> {
        if let Some(p) = self.free.borrow_mut().pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe(r, w, size))
    }

    /// Returns an empty pipe for reuse.
    fn give_back(&self, pipe: Pipe) {
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_LIMIT {
            free.push(pipe);
        }
    }
}

/// Direction of a relayed chunk, as the dump labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend (`->`).
    Up,
    /// Backend → client (`-<`).
    Down,
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both sides closed their sending direction.
    Closed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// A read or write failed (reset, broken pipe…).
    Error(io::Error),
}

/// What one relayed connection did.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// Bytes client → backend.
    pub up: u64,
    /// Bytes backend → client.
    pub down: u64,
}

/// Relays until both directions are done, one fails, or the idle timeout expires. `spares`
/// are the worker's pipes and scratch buffer; `dump` (`-p`) selects the dumping path.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    (sent, received): (&AtomicU64, &AtomicU64),
    idle: Option<Duration>,
    dump: bool,
    spares: &Spares,
) -> Outcome {
    let activity = Cell::new(Instant::now());
    let ended = Cell::new(false);
    let (up_bytes, down_bytes) = (Cell::new(0u64), Cell::new(0u64));
    let flow = (&activity, &ended);
    let dump_as = |dir| dump.then_some(dir);
    let up = one_way(
        client,
        backend,
        (sent, &up_bytes),
        flow,
        dump_as(Direction::Up),
        spares,
    );
    let down = one_way(
        backend,
        client,
        (received, &down_bytes),
        flow,
        dump_as(Direction::Down),
        spares,
    );
    let idle_expired = async {
        match idle {
            Some(limit) => idle_expiry(&activity, limit).await,
            None => std::future::pending().await,
        }
    };
    // One select over everything, so that the pumps' state is stored once (this future is
    // what an idle connection costs).
    let ending = tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => Ending::Closed,
            Err(e) => Ending::Error(e),
        },
        () = idle_expired => Ending::IdleTimeout,
    };
    Outcome {
        ending,
        up: up_bytes.get(),
        down: down_bytes.get(),
    }
}

/// Completes once `limit` has passed since the last recorded activity.
async fn idle_expiry(activity: &Cell<Instant>, limit: Duration) {
    loop {
        let deadline = activity.get() + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Passes an EOF on: `dst` gets `shutdown(SHUT_WR)`, because the peer may still answer on
/// the other direction. When the other direction has ended already, both sockets are about
/// to be closed, which sends the FIN anyway: one system call saved per connection.
fn half_close(dst: &TcpStream, ended: &Cell<bool>) {
    if !ended.replace(true) {
        let _ = nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    }
}

/// One direction: dumped through a user-space buffer with `-p`, else [`pump_auto`].
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    counters: (&AtomicU64, &Cell<u64>),
    flow: (&Cell<Instant>, &Cell<bool>),
    dump: Option<Direction>,
    spares: &Spares,
) -> io::Result<()> {
    match dump {
        Some(dir) => pump(src, dst, counters, flow, dir).await,
        None => pump_auto(src, dst, counters, flow, spares).await,
    }
}

/// What one step of a direction did.
enum Step {
    /// The readiness was stale: nothing to read.
    Nothing,
    Eof,
    /// Moved this many bytes; `full`: the read filled the scratch buffer (bulk).
    Moved {
        n: usize,
        full: bool,
    },
}

/// Relays one direction until EOF (then half-closes `dst`) or an error: small messages
/// through the scratch buffer, bulk with splice.
async fn pump_auto(
    src: &TcpStream,
    dst: &TcpStream,
    (counter, local): (&AtomicU64, &Cell<u64>),
    (activity, ended): (&Cell<Instant>, &Cell<bool>),
    spares: &Spares,
) -> io::Result<()> {
    let mut bulk = false;
    loop {
        src.readable().await?;
        let step = if bulk {
            splice_once(src, dst, spares).await?
        } else {
            copy_once(src, dst, spares).await?
        };
        match step {
            Step::Nothing => continue,
            Step::Eof => {
                half_close(dst, ended);
                return Ok(());
            }
            Step::Moved { n, full } => {
                bulk |= full;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                local.set(local.get() + n as u64);
                activity.set(Instant::now());
            }
        }
    }
}

/// Reads what `src` has into the scratch buffer and writes it to `dst`.
async fn copy_once(src: &TcpStream, dst: &TcpStream, spares: &Spares) -> io::Result<Step> {
    let drained = Cell::new(None);
    // Returning WouldBlock from inside try_io clears the cached readiness (unless an event
    // arrived meanwhile): done after a short read, which emptied the socket.
    let read = src.try_io(Interest::READABLE, || {
        let mut buf = spares.scratch.borrow_mut();
        let n = nix::sys::socket::recv(src.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            drained.set(Some(n));
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    let n = match read {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => match drained.get() {
            Some(n) => n,
            None => return Ok(Step::Nothing),
        },
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Ok(Step::Eof);
    }
    // Write what the peer takes now; keep only the rest, in the connection's own buffer.
    let rest = {
        let buf = spares.scratch.borrow();
        let mut off = 0;
        while off < n {
            match dst.try_write(&buf[off..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        (off < n).then(|| buf[off..n].to_vec())
    };
    if let Some(rest) = rest {
        write_all(dst, &rest).await?;
    }
    Ok(Step::Moved {
        n,
        full: n == SCRATCH,
    })
}

/// Moves one pipe's worth from `src` to `dst` with splice.
async fn splice_once(src: &TcpStream, dst: &TcpStream, spares: &Spares) -> io::Result<Step> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let pipe = spares.take()?;
    // Returning WouldBlock from inside try_io clears the cached readiness.
    let read = src.try_io(Interest::READABLE, || {
        splice(src, None, &pipe.1, None, pipe.2, flags).map_err(io::Error::from)
    });
    let n = match read {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            spares.give_back(pipe);
            return Ok(Step::Nothing);
        }
        Err(e) => return Err(e),
    };
    if n == 0 {
        spares.give_back(pipe);
        return Ok(Step::Eof);
    }
    let mut left = n;
    while left > 0 {
        dst.writable().await?;
        let written = dst.try_io(Interest::WRITABLE, || {
            splice(&pipe.0, None, dst, None, left, flags).map_err(io::Error::from)
        });
        match written {
            Ok(k) => left -= k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // The pipe may still hold data: it is dropped, not pooled.
            Err(e) => return Err(e),
        }
    }
    spares.give_back(pipe);
    Ok(Step::Moved { n, full: true })
}

/// Copies one direction through a user-space buffer (`-p`), dumping every read.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (counter, local): (&AtomicU64, &Cell<u64>),
    (activity, ended): (&Cell<Instant>, &Cell<bool>),
    dir: Direction,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0; CHUNK];
        }
        let n = match src.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                write_dump(dir, None);
                return Err(e);
            }
        };
        write_dump(dir, Some(&buf[..n]));
        if n == 0 {
            half_close(dst, ended);
            return Ok(());
        }
        write_all(dst, &buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        local.set(local.get() + n as u64);
        activity.set(Instant::now());
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_dump(dir: Direction, data: Option<&[u8]>) {
    let block = format_dump(dir, data);
    let mut out = io::stdout().lock();
    let _ = out.write_all(block.as_bytes());
    let _ = out.flush();
}

/// One read in the original's `-p` format: a header `-> N` / `-< N` (N = -1 for an error),
/// then the bytes with printable ASCII as is, `\` doubled, anything else as `\XX`; a line
/// break after each `\0A` and whenever the line grows past 80 columns; then a newline.
pub fn format_dump(dir: Direction, data: Option<&[u8]>) -> String {
    let arrow = match dir {
        Direction::Up => "->",
        Direction::Down => "-<",
    };
    let len = data.map_or(-1, |d| d.len() as i64);
    let mut out = format!("{arrow} {len}\n");
    let mut col = 0usize;
    for &b in data.unwrap_or(&[]) {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:02X}")),
        }
        col += match b {
            b'\\' => 2,
            0x20..=0x7e => 1,
            _ => 3,
        };
        if b == b'\n' || col > 80 {
            out.push('\n');
            col = 0;
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_matches_the_original() {
        let data = b"hello\tworld\\ \x01\xff\x7f~\r\nline2\n";
        assert_eq!(
            format_dump(Direction::Up, Some(data)),
            "-> 25\nhello\\09world\\\\ \\01\\FF\\7F~\\0D\\0A\nline2\\0A\n\n"
        );
        assert_eq!(format_dump(Direction::Up, Some(b"")), "-> 0\n\n");
        assert_eq!(format_dump(Direction::Down, None), "-< -1\n\n");
    }

    #[test]
    fn dump_wraps_long_lines_after_81_columns() {
        let mut data = vec![b'A'; 100];
        data.push(b'\n');
        data.extend(0u8..=0x27);
        let expected = format!(
            "-> 141\n{}\n{}\\0A\n{}\\0A\n{} !\"#$%&'\n",
            "A".repeat(81),
            "A".repeat(19),
            (0..10).map(|b| format!("\\{b:02X}")).collect::<String>(),
            (0x0b..0x20)
                .map(|b| format!("\\{b:02X}"))
                .collect::<String>(),
        );
        assert_eq!(format_dump(Direction::Up, Some(&data)), expected);
    }
}
