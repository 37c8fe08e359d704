//! The only place bytes move between a client and its backend.
//!
//! The worker's event loop (see `worker.rs`) owns the sockets and records what epoll said
//! about them in a [`Readiness`]; [`pump`] then moves one direction as far as that readiness
//! allows and returns. Each direction is pumped independently (a client that keeps uploading
//! while the backend sends a large reply never stalls either side: the original's relay could
//! deadlock there), half-close is passed on (EOF from one side becomes `shutdown(SHUT_WR)`
//! towards the other, and the reverse direction keeps flowing), a failed side is named in
//! the [`Failure`] so that the worker can deliver what that side sent before it failed and
//! then pass the failure on as a reset ([`take_error`], [`Flow::abandon`],
//! [`reset_on_close`]), and bytes are counted per chunk with relaxed atomics.
//!
//! Small messages (requests, replies, protocol chatter) are read into the worker's one
//! scratch buffer and written on at once: two system calls per message, and a read shorter
//! than the buffer is taken to mean the socket is empty, which saves the read that would only
//! say so. Once a read fills the buffer the direction is bulk, and from then on moves with
//! `splice(2)` through a pipe, so the bytes never enter user space. A pipe comes from the
//! worker's pool only when data is ready and goes back once drained. An idle connection holds
//! no pipe and no buffer: only a write that the peer cannot take at once leaves its rest
//! (in a buffer of the connection's own, or in the pipe) until the peer can take it.
//!
//! With `-p`, data goes through the scratch buffer only, so that every read can also be
//! written to stdout in the original's packet-dump format.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::MsgFlags;

/// Largest read with `-p` (the original's chunk).
const CHUNK: usize = 32 * 1024;
/// A read of this many bytes (the scratch buffer's working size) makes a direction bulk.
const SMALL: usize = 16 * 1024;
/// The pipe size asked for (the default is 64 KiB): fewer splices per byte in bulk.
/// Best effort: past the user's pipe-buffer quota the kernel keeps the default.
const PIPE_SIZE: i32 = 256 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
/// Pipes kept for reuse per worker; more are closed when given back. Few: an idle pipe holds
/// two descriptors and counts against the service user's pipe-buffer quota
/// (`pipe-user-pages-soft`, shared by every balance process on the host), past which new
/// pipes silently get smaller. A burst that needs more opens them and closes them after.
const POOL_LIMIT: usize = 16;
/// Chunks one call of [`pump`] moves at most, so that one busy connection cannot starve the
/// others; the event loop calls again after serving them.
const BUDGET: usize = 32;

/// A pipe for splicing: read end, write end, capacity in bytes.
pub struct Pipe(OwnedFd, OwnedFd, usize);

/// What the worker lends its connections: spare pipes, the scratch buffer, and a reserve of
/// two descriptors.
pub struct Spares {
    free: Vec<Pipe>,
    scratch: Box<[u8]>,
    /// A pipe held only for its two descriptors: closed when a client has been accepted but
    /// no descriptor is left for its backend socket, so that the client is served while
    /// the worker stops accepting.
    reserve: Option<(OwnedFd, OwnedFd)>,
}

impl Default for Spares {
    fn default() -> Spares {
        Spares {
            free: Vec::new(),
            scratch: vec![0; CHUNK].into_boxed_slice(),
            reserve: None,
        }
    }
}

impl Spares {
    fn take(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.free.pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe(r, w, size))
    }

    /// A pipe, or None when none can be had (no descriptor or memory left for one): the
    /// chunk then takes the copying path, which needs none, instead of costing the
    /// connection.
    fn take_unless_short(&mut self) -> Option<Pipe> {
        self.take().ok()
    }

    /// Returns an empty pipe for reuse.
    fn give_back(&mut self, pipe: Pipe) {
        if self.free.len() < POOL_LIMIT {
            self.free.push(pipe);
        }
    }

    /// Closes the pipes kept for reuse (two descriptors each), for a worker that has run out
    /// of descriptors; how many there were.
    pub fn drop_idle(&mut self) -> usize {
        std::mem::take(&mut self.free).len()
    }

    /// Makes sure the reserve is held.
    pub fn refill_reserve(&mut self) -> io::Result<()> {
        if self.reserve.is_none() {
            self.reserve = Some(nix::unistd::pipe2(OFlag::O_CLOEXEC)?);
        }
        Ok(())
    }

    /// Whether two more descriptors can be opened now: tried with a pipe closed at once.
    pub fn room_for_two() -> bool {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).is_ok()
    }

    /// Closes the reserve, freeing its two descriptors; false when there was none.
    pub fn spend_reserve(&mut self) -> bool {
        self.reserve.take().is_some()
    }
}

/// What epoll (edge-triggered) last said about one socket. `readable`/`writable` are cleared
/// when an operation finds the socket empty/full; `read_closed` stays set, so that the next
/// read finds the EOF even when no further event comes, and `error` until [`take_error`]
/// reads the socket's error (which marks the socket readable, so that what came before the
/// error is read).
#[derive(Debug, Default, Clone, Copy)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    pub read_closed: bool,
    pub error: bool,
    /// The peer has sent TCP urgent data (EPOLLPRI), for the rest of the connection: reads
    /// stop at the urgent mark, so a short read no longer means the socket is empty, and
    /// `splice` cannot get past the mark at all. Such a direction is copied, and read until
    /// a read finds nothing. (The urgent byte itself is dropped, as by the original 3.54.)
    pub urgent: bool,
}

impl Readiness {
    fn can_read(&self) -> bool {
        self.readable || self.read_closed || self.error
    }

    fn can_write(&self) -> bool {
        self.writable || self.error
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

/// Bytes read from one side that the other could not take yet.
#[derive(Default)]
enum Pending {
    #[default]
    Nothing,
    /// A copy of the unwritten rest of a small read, and how much of it is written.
    Buffer(Box<[u8]>, usize),
    /// A pipe holding this many bytes.
    Pipe(Pipe, usize),
}

/// One direction of a connection.
#[derive(Default)]
pub struct Flow {
    /// A read filled the scratch buffer: move with splice from now on.
    bulk: bool,
    /// The source sent EOF.
    eof: bool,
    /// EOF was read and everything before it written (and passed on, if it had to be).
    done: bool,
    pending: Pending,
    /// The source failed (a reset): what it sent before goes on, but no FIN follows the
    /// last of it at once (the close waits for the destination's acknowledgement), and the
    /// dump ends with -1.
    source_failed: bool,
    /// The destination failed: what the source sends is read and dropped (see
    /// [`Flow::abandon`]).
    discarding: bool,
    /// Bytes moved so far.
    pub bytes: u64,
}

impl Flow {
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes read from the source wait for the destination to take them.
    pub fn has_pending(&self) -> bool {
        !matches!(self.pending, Pending::Nothing)
    }

    /// Gives this direction up (its destination failed): what is pending for it is
    /// dropped, and from now on what its source sends is read and dropped too, so that a
    /// source that writes before it reads (a client sending its whole body before reading
    /// the answer) gets on to reading what the other direction still owes it. Dropped
    /// bytes are neither counted nor progress.
    pub fn abandon(&mut self) {
        self.pending = Pending::Nothing;
        self.done = true;
        self.discarding = true;
    }

    /// Marks this direction's source as failed: it is read to its end, and what it sent is
    /// delivered, but the last chunk is not held back for a FIN.
    pub fn source_failed(&mut self) {
        self.source_failed = true;
    }
}

/// The socket of a direction that an operation failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A read failed: the peer we read from reset (or otherwise lost) its connection.
    Source,
    /// A write failed: the peer we write to is gone.
    Destination,
}

/// Why [`pump`] stopped on an error, and which of its two sockets it came from.
#[derive(Debug)]
pub struct Failure {
    pub side: Side,
    pub error: io::Error,
}

fn failed_at(side: Side) -> impl FnOnce(io::Error) -> Failure {
    move |error| Failure { side, error }
}

/// Where one call of [`pump`] left its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for an event: the source is empty or the destination full.
    Waiting,
    /// The budget ran out with work left: call again soon.
    Busy,
    /// EOF passed on; nothing more will move this way.
    Done,
}

/// What one call of [`pump`] did.
#[derive(Debug, Clone, Copy)]
pub struct Pumped {
    /// Bytes were read, or pending bytes written.
    pub moved: bool,
    pub state: State,
}

/// One side of a direction: the socket and what epoll said about it.
pub struct End<'a, S> {
    pub socket: &'a S,
    pub ready: &'a mut Readiness,
}

/// Moves bytes from `src` to `dst` as far as readiness allows (or up to the budget).
/// `other_done`: the opposite direction has finished, so an EOF here ends the connection and
/// needs no `shutdown` (the close that follows sends the FIN). `dump` is `-p`.
pub fn pump<S: AsFd>(
    flow: &mut Flow,
    src: End<'_, S>,
    dst: End<'_, S>,
    other_done: bool,
    counter: &AtomicU64,
    dump: Option<Direction>,
    spares: &mut Spares,
) -> Result<Pumped, Failure> {
    let mut moved = false;
    let waiting = |moved| {
        Ok(Pumped {
            moved,
            state: State::Waiting,
        })
    };
    if flow.discarding {
        return discard(flow, src, spares);
    }
    for _ in 0..BUDGET {
        // What the destination could not take last time goes first.
        if !flush(&mut flow.pending, dst.socket, dst.ready, spares, &mut moved)
            .map_err(failed_at(Side::Destination))?
        {
            return waiting(moved);
        }
        if flow.eof {
            if !flow.done {
                flow.done = true;
                if !other_done {
                    let _ = nix::sys::socket::shutdown(
                        dst.socket.as_fd().as_raw_fd(),
                        nix::sys::socket::Shutdown::Write,
                    );
                }
            }
            return Ok(Pumped {
                moved,
                state: State::Done,
            });
        }
        if !src.ready.can_read() {
            return waiting(moved);
        }
        // Without a pipe (not bulk, -p, or no descriptor left for one) the chunk is copied.
        let pipe = if flow.bulk && dump.is_none() && !src.ready.urgent {
            spares.take_unless_short()
        } else {
            None
        };
        let spliced = pipe.is_some();
        let read = match pipe {
            Some(pipe) => splice_in(src.socket, pipe, spares, &mut flow.pending)
                .map_err(failed_at(Side::Source))?,
            None => copy(
                flow, src.socket, src.ready, dst.socket, dst.ready, dump, spares,
            )?,
        };
        match read {
            None => {
                src.ready.readable = false;
                return waiting(moved);
            }
            // `splice` also finds nothing at an urgent mark whose EPOLLPRI has not been
            // seen yet (urgent data, more data and the FIN arriving together): a read of
            // the copying path, which gets past the mark, tells that from the end.
            Some(0) if spliced => src.ready.urgent = true,
            Some(0) => flow.eof = true,
            Some(n) => {
                moved = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                flow.bytes += n as u64;
            }
        }
    }
    Ok(Pumped {
        moved,
        state: State::Busy,
    })
}

/// Reads and drops what the source of an abandoned direction sends, up to its end or the
/// budget. `MSG_TRUNC` makes the kernel drop TCP data without copying it (tcp(7)), so the
/// scratch buffer only sets how much one call drops.
fn discard<S: AsFd>(
    flow: &mut Flow,
    src: End<'_, S>,
    spares: &mut Spares,
) -> Result<Pumped, Failure> {
    let drop_at_most = spares.scratch.len();
    for _ in 0..BUDGET {
        if flow.eof || !src.ready.can_read() {
            return Ok(Pumped {
                moved: false,
                state: State::Waiting,
            });
        }
        let fd = src.socket.as_fd().as_raw_fd();
        match nix::sys::socket::recv(fd, &mut spares.scratch, MsgFlags::MSG_TRUNC) {
            Ok(0) => flow.eof = true,
            // At the urgent mark a read stops short with more behind it (see `copy`).
            Ok(n) if n < drop_at_most && !src.ready.urgent => src.ready.readable = false,
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EINTR) => src.ready.readable = false,
            Err(e) => return Err(failed_at(Side::Source)(e.into())),
        }
    }
    Ok(Pumped {
        moved: false,
        state: State::Busy,
    })
}

/// The error (a reset, a timeout) held by a socket that epoll flagged with one. Reading
/// it clears it: reads then return what the peer sent before it, then end of stream (so
/// the socket is marked readable). The flag is cleared either way, so that it costs no
/// further look.
pub fn take_error<S: AsFd>(end: End<'_, S>) -> Option<io::Error> {
    if !end.ready.error {
        return None;
    }
    end.ready.error = false;
    let error = pending_error(end.socket);
    if error.is_some() {
        end.ready.readable = true;
    }
    error
}

/// The error a socket holds (a reset, a timeout), if any; reading it clears it.
fn pending_error(socket: &impl AsFd) -> Option<io::Error> {
    match nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::SocketError) {
        Ok(0) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
        Err(e) => Some(e.into()),
    }
}

/// Bytes written to the socket that its peer has not acknowledged yet (0 when that cannot
/// be told: nothing to wait for).
pub fn unacknowledged(socket: &impl AsFd) -> usize {
    crate::sys::unacknowledged(socket.as_fd()).unwrap_or(0)
}

/// Makes the socket's close send a reset (SO_LINGER 0) instead of a FIN after its data.
pub fn reset_on_close(socket: &impl AsFd) {
    let now = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Linger, &now);
}

/// Writes out what is pending (setting `wrote` if any of it went); true when nothing is
/// left.
fn flush(
    pending: &mut Pending,
    dst: &impl AsFd,
    ready: &mut Readiness,
    spares: &mut Spares,
    wrote: &mut bool,
) -> io::Result<bool> {
    loop {
        match pending {
            Pending::Nothing => return Ok(true),
            _ if !ready.can_write() => return Ok(false),
            Pending::Buffer(buf, off) => match send(dst, &buf[*off..]) {
                Ok(k) => {
                    *wrote = true;
                    *off += k;
                    if *off == buf.len() {
                        *pending = Pending::Nothing;
                    }
                }
                Err(Errno::EAGAIN) => {
                    ready.writable = false;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            },
            Pending::Pipe(pipe, left) => match splice(&pipe.0, None, dst, None, *left, flags()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    *wrote = true;
                    *left -= k;
                    if *left == 0 {
                        if let Pending::Pipe(pipe, _) = std::mem::take(pending) {
                            spares.give_back(pipe);
                        }
                    }
                }
                Err(Errno::EAGAIN) => {
                    ready.writable = false;
                    return Ok(false);
                }
                // The pipe may still hold data: it is dropped with the connection.
                Err(e) => return Err(e.into()),
            },
        }
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn send(dst: &impl AsFd, data: &[u8]) -> Result<usize, Errno> {
    send_with(dst, data, MsgFlags::MSG_NOSIGNAL)
}

fn send_with(dst: &impl AsFd, data: &[u8], flags: MsgFlags) -> Result<usize, Errno> {
    loop {
        match nix::sys::socket::send(dst.as_fd().as_raw_fd(), data, flags) {
            Ok(0) if !data.is_empty() => return Err(Errno::EPIPE),
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// Whether an error says this process is out of descriptors or memory: a local shortage
/// that passes, not a fault of the connection or of its backend.
pub fn is_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ENOSPC)
    )
}

/// Whether the error a connecting socket reports says the handshake completed and the peer
/// then reset: a connect that is refused reports ECONNREFUSED instead.
pub fn is_reset_after_handshake(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE))
}

/// Reads one chunk from the source into `pipe`. None: the socket was empty.
fn splice_in(
    src: &impl AsFd,
    pipe: Pipe,
    spares: &mut Spares,
    pending: &mut Pending,
) -> io::Result<Option<usize>> {
    match splice(src, None, &pipe.1, None, pipe.2, flags()) {
        Ok(0) => {
            spares.give_back(pipe);
            Ok(Some(0))
        }
        Ok(n) => {
            *pending = Pending::Pipe(pipe, n);
            Ok(Some(n))
        }
        Err(e) => {
            spares.give_back(pipe);
            match e {
                Errno::EAGAIN | Errno::EINTR => Ok(None),
                e => Err(e.into()),
            }
        }
    }
}

/// Reads one chunk into the scratch buffer and writes what the destination takes now; the
/// rest becomes pending. None: the socket was empty.
fn copy(
    flow: &mut Flow,
    src: &impl AsFd,
    src_ready: &mut Readiness,
    dst: &impl AsFd,
    dst_ready: &mut Readiness,
    dump: Option<Direction>,
    spares: &mut Spares,
) -> Result<Option<usize>, Failure> {
    let want = if dump.is_some() { CHUNK } else { SMALL };
    let buf = &mut spares.scratch[..want];
    let n = match nix::sys::socket::recv(src.as_fd().as_raw_fd(), buf, MsgFlags::empty()) {
        Ok(n) => n,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(None),
        // The dump's -1 comes with the end of the stream, once the worker has read what
        // the failed side sent before (see `source_failed`).
        Err(e) => return Err(failed_at(Side::Source)(e.into())),
    };
    if let Some(dir) = dump {
        write_dump(dir, (n > 0 || !flow.source_failed).then_some(&buf[..n]));
    }
    if n == 0 {
        return Ok(Some(0));
    }
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if n < want && src_ready.urgent {
        // Perhaps only stopped at the urgent mark: read on until a read finds nothing.
    } else if n < want {
        // A short read emptied the socket: the next data brings a new event.
        src_ready.readable = false;
        if src_ready.read_closed && !src_ready.error && !flow.source_failed && dump.is_none() {
            // The peer's FIN had arrived before this read, so this was the last of the data:
            // no read needed to learn it. MSG_MORE holds the data back for the FIN that
            // follows at once (shutdown or close), and both leave in one segment: a packet,
            // and the peer's ACK of it, saved per connection.
            flow.eof = true;
            flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
        }
    } else if dump.is_none() {
        flow.bulk = true;
    }
    let mut off = 0;
    while off < n && dst_ready.can_write() {
        match send_with(dst, &buf[off..n], flags) {
            Ok(k) => off += k,
            Err(Errno::EAGAIN) => dst_ready.writable = false,
            Err(e) => return Err(failed_at(Side::Destination)(e.into())),
        }
    }
    if off < n {
        flow.pending = Pending::Buffer(buf[off..n].into(), 0);
    }
    Ok(Some(n))
}

/// Writes one `-p` block on stdout. A stdout that cannot take it (a closed pipe, a full
/// disk) loses the dump, never the connection; the first such loss is said on stderr.
fn write_dump(dir: Direction, data: Option<&[u8]>) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let block = format_dump(dir, data);
    let mut out = io::stdout().lock();
    let written = out.write_all(block.as_bytes()).and_then(|()| out.flush());
    if let Err(e) = written {
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            crate::say!("balance: -p: cannot write the dump on stdout ({e}); what follows is lost");
        }
    }
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
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// One direction under test: `src` and `dst` are the relay's sockets, `src_peer` and
    /// `dst_peer` the client's and backend's ends.
    struct Rig {
        src: UnixStream,
        src_peer: UnixStream,
        dst: UnixStream,
        dst_peer: UnixStream,
        sr: Readiness,
        dr: Readiness,
        flow: Flow,
        counter: AtomicU64,
        spares: Spares,
    }

    impl Rig {
        /// `src_peer` has sent `data`; epoll said `src` is readable (and, with
        /// `fin_seen`, that the peer's FIN arrived) and `dst` writable.
        fn new(data: &[u8], fin_seen: bool) -> Rig {
            let pair = || {
                let (ours, peer) = UnixStream::pair().expect("socketpair");
                ours.set_nonblocking(true).expect("nonblocking");
                peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .expect("timeout");
                (ours, peer)
            };
            let ((src, mut src_peer), (dst, dst_peer)) = (pair(), pair());
            src_peer.write_all(data).expect("write");
            Rig {
                src,
                src_peer,
                dst,
                dst_peer,
                sr: Readiness {
                    readable: true,
                    read_closed: fin_seen,
                    ..Readiness::default()
                },
                dr: Readiness {
                    writable: true,
                    ..Readiness::default()
                },
                flow: Flow::default(),
                counter: AtomicU64::new(0),
                spares: Spares::default(),
            }
        }

        /// One call of `pump`, `-p` off, the other direction still open.
        fn pump(&mut self) -> Pumped {
            let src = End {
                socket: &self.src,
                ready: &mut self.sr,
            };
            let dst = End {
                socket: &self.dst,
                ready: &mut self.dr,
            };
            let (flow, counter) = (&mut self.flow, &self.counter);
            pump(flow, src, dst, false, counter, None, &mut self.spares).expect("pump")
        }
    }

    #[test]
    fn short_read_after_the_fin_is_the_end_and_is_passed_on() {
        // The source's peer is deliberately left open, so that only the inference from the
        // FIN flag, not a second read, can end the direction.
        let mut rig = Rig::new(b"last words", true);
        let p = rig.pump();
        assert!(p.moved);
        assert_eq!(p.state, State::Done);
        assert_eq!(rig.counter.load(Ordering::Relaxed), 10);
        assert_eq!(rig.flow.bytes, 10);
        let mut got = Vec::new();
        rig.dst_peer.read_to_end(&mut got).expect("read to EOF");
        assert_eq!(got, b"last words", "data, then EOF from shutdown(SHUT_WR)");
    }

    #[test]
    fn without_the_fin_a_short_read_only_clears_readable() {
        let mut rig = Rig::new(b"ping", false);
        let p = rig.pump();
        assert_eq!(p.state, State::Waiting);
        assert!(!rig.sr.readable, "a short read means the socket is empty");
        assert!(!rig.flow.is_done());
        let mut buf = [0u8; 4];
        rig.dst_peer.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn a_full_destination_keeps_the_rest_until_it_can_take_it() {
        let message: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut rig = Rig::new(&message, false);
        // Fill the destination until it refuses more.
        let mut filled = 0usize;
        for _ in 0..10_000 {
            let filler = [b'f'; 4096];
            match nix::sys::socket::send(rig.dst.as_raw_fd(), &filler, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => filled += n,
                Err(_) => break,
            }
        }
        assert!(filled > 0);
        assert_eq!(rig.pump().state, State::Waiting);
        assert!(!rig.dr.writable, "the refused write clears writable");
        assert!(
            matches!(rig.flow.pending, Pending::Buffer(..)),
            "the rest waits in a buffer"
        );
        // The peer drains; epoll would now say writable.
        let mut sink = vec![0u8; filled];
        rig.dst_peer
            .read_exact(&mut sink)
            .expect("drain the filler");
        rig.dr.writable = true;
        assert_eq!(rig.pump().state, State::Waiting);
        assert!(matches!(rig.flow.pending, Pending::Nothing));
        let mut got = vec![0u8; message.len()];
        rig.dst_peer.read_exact(&mut got).expect("read the message");
        assert_eq!(got, message, "every byte, in order");
        assert_eq!(rig.counter.load(Ordering::Relaxed), message.len() as u64);
    }

    #[test]
    fn a_read_that_fills_the_buffer_switches_to_splice() {
        let data: Vec<u8> = (0..(SMALL * 3) as u32).map(|i| (i % 253) as u8).collect();
        let mut rig = Rig::new(&data, false);
        let mut dst_peer = rig.dst_peer.try_clone().expect("clone");
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; SMALL * 3];
            dst_peer.read_exact(&mut got).expect("read");
            got
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while rig.counter.load(Ordering::Relaxed) < data.len() as u64 {
            assert!(std::time::Instant::now() < deadline, "relay stalled");
            (rig.sr.readable, rig.dr.writable) = (true, true);
            rig.pump();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().expect("reader"), data);
        assert!(rig.flow.bulk, "a full read makes the direction bulk");
        drop(rig.src_peer);
    }

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
