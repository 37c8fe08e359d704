//! A worker process: the code that touches client bytes.
//!
//! Started by the supervisor as `balance --worker` (its own image, exec'd fresh) with the
//! supervisor channel on fd 3, a worker runs in three steps, like every balance process:
//! 1. receive what it needs: a `Start` message carrying its settings, the listening
//!    socket(s) and the table file twice, read-write and read-only (it maps the
//!    configuration read-only and only the counters writable, then closes both);
//! 2. lock itself down (`sandbox::lock_down_worker`) before it reads a single client byte;
//! 3. run a single-threaded event loop: accept → pick a channel → connect with failover →
//!    relay → account. This file holds the process and its loop; what happens to one
//!    connection, in order, is in `worker/conn.rs`.
//!
//! The event loop is epoll (through `mio`, edge-triggered) and a table of connections, each a
//! small plain struct: an idle connection costs its two sockets and a few hundred bytes,
//! and a relayed chunk costs the socket calls and nothing else. A connection moves through
//! two phases: *connecting* (trying the candidates in order, each with the connect timeout)
//! and *relaying* (see `relay.rs`). Timers are one heap of deadlines, checked lazily: the
//! connect timeout, the idle timeout (`-T`), the half-close timeout, and the stall check of
//! connections whose other side failed.
//!
//! A worker never resolves names, opens files or takes the table lock: it reads the
//! configuration through the seqlock, admits against maxc with atomics, and asks the
//! supervisor to disable a failed channel (`-a`). It exits when the supervisor's channel closes.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::ipc::{self, Message, Notice, NoticeLine, Priority, WorkerConfig};
use crate::relay::{self, Readiness};
use crate::table::{Snapshot, Table};

mod conn;

use conn::Conn;

/// The supervisor channel's descriptor number in a worker.
pub const CHANNEL_FD: i32 = 3;

#[derive(Debug)]
pub struct WorkerError(pub String);

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker: {}", self.0)
    }
}

impl std::error::Error for WorkerError {}

fn fail(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError(format!("{what}: {e}"))
}

/// Token of the supervisor channel; listeners follow; connections start at `CONN_BASE`,
/// two tokens each (client, backend).
const CHANNEL: Token = Token(0);
const CONN_BASE: usize = 16;
/// Events taken from the kernel per wait.
const EVENTS: usize = 1024;
/// Connections accepted from one listener before serving the others.
const ACCEPT_BUDGET: usize = 64;
/// How soon a worker that stopped accepting for lack of descriptors or memory tries again
/// when none of its connections has closed meanwhile (the shortage may be system-wide).
const ACCEPT_RETRY: Duration = Duration::from_millis(200);
/// The retry interval doubles up to this while nothing changes.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Throttled notices (a full channel, a refusing one, a worker out of descriptors) are
/// logged at most this often.
const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// The worker's entry point; returns only on a start-up error or when it is done.
pub fn run() -> Result<(), WorkerError> {
    // Executed through /proc/self/fd/N, the kernel named this process "N": give `ps`, `top`
    // and `pgrep` the name they expect. Cosmetic, so a failure is not fatal.
    let _ = nix::sys::prctl::set_name(c"balance");
    // Not dumpable from the start (the exec made it so again): until the lockdown, no
    // process of the service user may attach and take the table's read-write descriptor.
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail("prctl", e))?;
    let channel = crate::sys::take_inherited_fd(CHANNEL_FD)
        .map_err(|e| fail("supervisor channel missing", e))?;
    let channel = UnixDatagram::from(channel);
    let (config, listeners, [read_write, read_only]) = receive_start(&channel)?;
    // Both descriptors close here: the configuration stays mapped read-only for good.
    let table = Table::open_for_worker(&File::from(read_only), &File::from(read_write))
        .map_err(|e| fail("table", e))?;

    let poll = Poll::new().map_err(|e| fail("epoll", e))?;
    channel
        .set_nonblocking(true)
        .map_err(|e| fail("channel", e))?;
    poll.registry()
        .register(
            &mut SourceFd(&channel.as_raw_fd()),
            CHANNEL,
            Interest::READABLE,
        )
        .map_err(|e| fail("channel", e))?;
    // The listeners are shared with the other workers: registered exclusive, so that a new
    // connection wakes one waiting worker, not all of them (mio has no such flag, hence a
    // second handle on the same epoll instance).
    let shared = Epoll(nix::unistd::dup(poll.registry()).map_err(|e| fail("epoll", e))?);
    let mut accepting = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        l.set_nonblocking(true).map_err(|e| fail("listener", e))?;
        watch_listener(&shared, &l, i).map_err(|e| fail("listener", e))?;
        accepting.push(TcpListener::from_std(l));
    }
    let mut spares = relay::Spares::default();
    spares
        .refill_reserve()
        .map_err(|e| fail("descriptor reserve", e))?;

    let filter = crate::sandbox::worker_filter(config.source.is_some())
        .map_err(|e| fail("seccomp policy", e))?;
    let landlock = crate::sandbox::lock_down_worker(&config.connect_ports, &filter)
        .map_err(|e| fail("lockdown", e))?;
    let landlock = match landlock {
        crate::sandbox::Landlock::Full => None,
        crate::sandbox::Landlock::Partial(what) => Some(format!("partly enforced ({what})")),
        crate::sandbox::Landlock::Unavailable => Some("not available".to_string()),
    };
    // A fresh socket pair has room for one small message: this does not block.
    ipc::send_blocking(&channel, &Message::Ready { landlock }, &[])
        .map_err(|e| fail("ready", e))?;

    let now = Instant::now();
    let mut worker = Worker {
        poll,
        shared,
        row: config.row as usize,
        connect_timeout: Duration::from_secs(config.connect_timeout_secs),
        idle_timeout: config.idle_timeout_secs.map(Duration::from_secs),
        // With `-T` no longer, the idle timeout ends a half-closed connection first: no
        // second deadline is kept for it.
        half_close_timeout: config
            .half_close_timeout_secs
            .map(Duration::from_secs)
            .filter(|&h| config.idle_timeout_secs.is_none_or(|t| t > h.as_secs())),
        config,
        table,
        channel,
        listeners: accepting,
        saturated: None,
        retrying: None,
        conns: Vec::new(),
        free: FreeEntries::default(),
        live: 0,
        serial: 0,
        timers: Deadlines::default(),
        busy: Vec::new(),
        draining: false,
        cache: None,
        notices: HashMap::new(),
        spares,
        now,
    };
    worker.run()
}

/// The interval before the next try to accept again: the first, or double the last one.
fn next_retry(last: Option<Duration>) -> Duration {
    last.map_or(ACCEPT_RETRY, |b| (b * 2).min(ACCEPT_RETRY_MAX))
}

/// Registers listener `i` with the worker's epoll instance: exclusive, so that a new
/// connection wakes one waiting worker, not all of them.
fn watch_listener(shared: &Epoll, listener: &impl AsFd, i: usize) -> nix::Result<()> {
    let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET | EpollFlags::EPOLLEXCLUSIVE;
    shared.add(listener, EpollEvent::new(flags, (1 + i) as u64))
}

/// Waits for the `Start` message and checks its descriptors: the listeners, then the table
/// file opened read-write and read-only.
fn receive_start(
    channel: &UnixDatagram,
) -> Result<(WorkerConfig, Vec<std::net::TcpListener>, [OwnedFd; 2]), WorkerError> {
    let (msg, mut fds) = ipc::recv_blocking(channel).map_err(|e| fail("start message", e))?;
    let Message::Start(config) = msg else {
        return Err(WorkerError("first message was not Start".into()));
    };
    if config.listeners == 0 || fds.len() != config.listeners as usize + 2 {
        return Err(WorkerError(format!(
            "expected {} listeners and the table twice, got {} descriptors",
            config.listeners,
            fds.len()
        )));
    }
    let table = fds.split_off(config.listeners as usize);
    let table: [OwnedFd; 2] = table
        .try_into()
        .map_err(|_| WorkerError("no table descriptors".into()))?;
    let listeners = fds.into_iter().map(std::net::TcpListener::from).collect();
    Ok((config, listeners, table))
}

/// The connections' deadlines, earliest first. A heap cannot take out the deadline of a
/// connection that closed or moved on: such entries are skipped when they come up, and swept
/// out whenever they outnumber the live connections. Without the sweep, every short
/// connection would leave its idle deadline behind for the whole `-T`: at 5,000 connections
/// a second and `-T 3600`, half a gigabyte.
#[derive(Default)]
struct Deadlines(BinaryHeap<Reverse<Timer>>);

/// Entries allowed beyond three per live connection before a sweep. A connection has at
/// most two deadlines that apply (idle, and half-close or stall), so a sweep leaves at most
/// two per connection and the next one is at least a connection's worth of pushes away.
const DEADLINE_SLACK: usize = 64;

impl Deadlines {
    /// Adds a deadline; `applies` tells a current entry from a stale one for the sweep.
    fn push(&mut self, timer: Timer, live: usize, applies: impl Fn(&Timer) -> bool) {
        if self.0.len() >= 3 * live + DEADLINE_SLACK {
            self.0.retain(|Reverse(t)| applies(t));
        }
        self.0.push(Reverse(timer));
    }

    fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse(t)| t.when)
    }

    /// The earliest deadline, if it has passed.
    fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.0.peek() {
            Some(Reverse(t)) if t.when <= now => self.0.pop().map(|Reverse(t)| t),
            _ => None,
        }
    }
}

/// A deadline of one connection (by entry and serial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    when: Instant,
    entry: u32,
    serial: u64,
    kind: TimerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The connect in progress times out (unless it finished or moved on meanwhile).
    Connect,
    /// Check for the idle timeout; pushed again for the new deadline while there is traffic.
    Idle,
    /// A side has failed: check that the survivor still takes what it is owed; pushed
    /// again while it does.
    Stall,
    /// One side has ended its direction: check for `--half-close-timeout`; pushed again for
    /// the new deadline while there is traffic.
    HalfClosed,
}

/// A worker that has stopped accepting for lack of descriptors (or memory): its listeners
/// are out of its epoll set, so that new connections wake the other workers.
struct Saturated {
    /// Connections open when it stopped: once fewer are, a descriptor is free again.
    live: usize,
    /// When to try again anyway, and the interval that led there.
    retry: Instant,
    backoff: Duration,
}

/// A connection table at least this long is trimmed once three quarters of it are empty.
const TRIM_ABOVE: usize = 256;

/// The empty entries of the connection table. They are reused lowest first, so that after a
/// burst the connections gather at the front and the empty tail can be given back. An entry
/// emptied while events are being handled becomes reusable only after the batch, so that a
/// later event of the same batch cannot reach a new connection in the same entry.
#[derive(Default)]
struct FreeEntries {
    reusable: BinaryHeap<Reverse<u32>>,
    closed: Vec<u32>,
}

impl FreeEntries {
    /// The lowest reusable entry, if any.
    fn take(&mut self) -> Option<usize> {
        self.reusable.pop().map(|Reverse(i)| i as usize)
    }

    /// Entry `i` was emptied during the batch.
    fn closed(&mut self, i: usize) {
        self.closed.push(i as u32);
    }

    /// After a batch: its emptied entries become reusable, and a long table with `live`
    /// connections in at most a quarter of it loses its empty tail.
    fn end_batch<T>(&mut self, table: &mut Vec<Option<T>>, live: usize) {
        self.reusable.extend(self.closed.drain(..).map(Reverse));
        if table.len() <= TRIM_ABOVE
            || live * 4 > table.len()
            || !matches!(table.last(), Some(None))
        {
            return;
        }
        while matches!(table.last(), Some(None)) && table.len() > TRIM_ABOVE / 2 {
            table.pop();
        }
        let len = table.len() as u32;
        self.reusable.retain(|Reverse(i)| *i < len);
        table.shrink_to(2 * table.len());
    }
}

/// When a notice was last logged, and how many were held back since.
struct Throttled {
    last: Instant,
    held: u32,
}

/// Work left over because a budget ran out.
#[derive(Clone, Copy)]
enum Busy {
    Listener(usize),
    Conn(usize, u64),
}

struct Worker {
    poll: Poll,
    /// The same epoll instance, for the listeners' exclusive registrations.
    shared: Epoll,
    config: WorkerConfig,
    /// This worker's row in the table's per-worker counts.
    row: usize,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    half_close_timeout: Option<Duration>,
    table: Table,
    channel: UnixDatagram,
    /// Emptied when draining.
    listeners: Vec<TcpListener>,
    /// Set while the worker does not accept (out of descriptors).
    saturated: Option<Saturated>,
    /// While a timed retry runs: its interval (a failure doubles it and logs nothing new).
    retrying: Option<Duration>,
    /// Connections by entry (the entry is in their epoll tokens); `free` keeps the empty
    /// ones.
    conns: Vec<Option<Conn>>,
    free: FreeEntries,
    live: usize,
    serial: u64,
    timers: Deadlines,
    busy: Vec<Busy>,
    draining: bool,
    cache: Option<Rc<Snapshot>>,
    /// The throttled notices, by kind and channel (None: about the worker itself).
    notices: HashMap<(Notice, Option<(usize, usize)>), Throttled>,
    spares: relay::Spares,
    /// The time after the last wait; good enough for timeouts and activity.
    now: Instant,
}

impl Worker {
    fn run(&mut self) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.wait_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail("epoll", e)),
            }
            self.now = Instant::now();
            // Backend events (replies, finished connects) first: they move requests already
            // in flight, and doing so before taking new ones shortens the tail (interleaved
            // wrk runs at c64: p99 about 10 % lower, and slightly less CPU per request).
            for backends in [true, false] {
                for ev in events.iter() {
                    let token = ev.token().0;
                    if (token >= CONN_BASE && token % 2 == 1) == backends && !self.on_event(ev) {
                        return Ok(());
                    }
                }
            }
            for work in std::mem::take(&mut self.busy) {
                match work {
                    Busy::Listener(i) => self.accept(i),
                    Busy::Conn(i, serial) => {
                        if self.serial_of(i) == Some(serial) {
                            self.drive(i);
                        }
                    }
                }
            }
            self.fire_timers();
            if let Some(s) = &self.saturated {
                if self.live < s.live || self.now >= s.retry {
                    self.resume_accepting();
                }
            }
            self.free.end_batch(&mut self.conns, self.live);
            if self.draining && self.live == 0 {
                return Ok(());
            }
        }
    }

    /// Handles one event; false when the worker must exit now (the supervisor is gone).
    fn on_event(&mut self, ev: &mio::event::Event) -> bool {
        let token = ev.token().0;
        if token >= CONN_BASE {
            let ready = Readiness {
                readable: ev.is_readable(),
                writable: ev.is_writable(),
                read_closed: ev.is_read_closed(),
                error: ev.is_error(),
                urgent: ev.is_priority(),
            };
            self.on_socket_event((token - CONN_BASE) / 2, token % 2 == 1, ready);
        } else if token == CHANNEL.0 {
            return self.on_supervisor();
        } else {
            self.accept(token - 1);
        }
        true
    }

    /// How long the next wait may block: not past the next deadline.
    fn wait_timeout(&self) -> Option<Duration> {
        if !self.busy.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = [self.timers.next(), self.saturated.as_ref().map(|s| s.retry)]
            .into_iter()
            .flatten()
            .min()?;
        // Round up so that the wake-up is not a millisecond early.
        Some(next.saturating_duration_since(Instant::now()) + Duration::from_micros(999))
    }

    /// Handles the supervisor's messages; false when the worker must exit now.
    fn on_supervisor(&mut self) -> bool {
        loop {
            match ipc::try_recv(&self.channel) {
                Ok(None) => return true,
                Ok(Some((Message::Drain, _))) => self.drain(),
                // Another worker stopped accepting: connections may wait that woke it.
                Ok(Some((Message::Accept, _))) => self.accept_all(),
                Ok(Some(_)) => {}
                // The supervisor went away (its end closed): exit at once.
                Err(_) => return false,
            }
        }
    }

    /// Stops accepting (other workers share the listening socket and go on); the loop exits
    /// when the connections in progress are done.
    fn drain(&mut self) {
        self.draining = true;
        self.unwatch_listeners();
        self.listeners.clear();
        self.notify(Message::StoppedAccepting);
    }

    /// Takes the listeners out of this worker's epoll set. (Closing our descriptors would
    /// not: the other workers hold the same open sockets.)
    fn unwatch_listeners(&self) {
        for l in &self.listeners {
            let _ = self.shared.delete(l);
        }
    }

    fn accept_all(&mut self) {
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
    }

    fn accept(&mut self, i: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if self.saturated.is_some() {
                return;
            }
            let Some(listener) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((client, peer)) => self.open(client, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if relay::is_shortage(&e) => {
                    // The pipes kept for reuse hold descriptors a client can use now.
                    if self.spares.drop_idle() == 0 {
                        // The connection stays queued for a worker that has room.
                        self.stop_accepting(&e);
                    }
                }
                // The client gave up before we took it, or the like: take the next.
                Err(e) => self.debug(format_args!("accept error {e}")),
            }
        }
        self.busy.push(Busy::Listener(i));
    }

    /// Out of descriptors (or memory): takes the listeners out of this worker's epoll set,
    /// so that new connections wake the workers that have room, and asks the supervisor to
    /// have those accept what is already queued (its wake-up may have come here).
    pub(super) fn stop_accepting(&mut self, e: &io::Error) {
        if self.saturated.is_some() || self.draining {
            return;
        }
        self.unwatch_listeners();
        self.saturate(self.retrying);
        self.notify(Message::StoppedAccepting);
        if self.retrying.is_some() {
            // The same shortage as before, found by a timed retry: said already.
            return;
        }
        let live = self.live;
        let short_of = match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => "descriptors",
            _ => "memory or epoll watches",
        };
        self.notice(Notice::Saturated, None, || {
            format!(
                "out of {short_of} ({e}) with {live} connections: not accepting until one \
                 of them closes, new connections are left to the other workers"
            )
        });
    }

    /// Accepts again once a descriptor is free (first for the reserve), or when the retry
    /// interval is up.
    fn resume_accepting(&mut self) {
        let Some(was) = self.saturated.take() else {
            return;
        };
        if self.draining {
            return;
        }
        // Not one of our connections closed: a timed retry.
        let timed = (self.live >= was.live).then_some(was.backoff);
        // The reserve first, then room for one more connection: without it, accepting again
        // would only run into the limit at once.
        let room = self.spares.refill_reserve().is_ok() && relay::Spares::room_for_two();
        if !room {
            return self.saturate(timed);
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Err(e) = watch_listener(&self.shared, l, i) {
                self.log(
                    Priority::Error,
                    format!("cannot watch the listening socket again: {e}"),
                );
            }
        }
        self.debug(format_args!("accepting again"));
        self.retrying = timed;
        self.accept_all();
        self.retrying = None;
    }

    /// Marks the worker as not accepting, to try again after the interval that follows
    /// `last` (or as soon as one of its connections closes).
    fn saturate(&mut self, last: Option<Duration>) {
        let backoff = next_retry(last);
        self.saturated = Some(Saturated {
            live: self.live,
            retry: self.now + backoff,
            backoff,
        });
    }

    /// The configuration, re-read only when the table's seqlock moved.
    fn snapshot(&mut self) -> Rc<Snapshot> {
        let seq = self.table.seq();
        if let Some(s) = &self.cache {
            if s.seq == seq {
                return Rc::clone(s);
            }
        }
        match self.table.snapshot() {
            Some(s) => {
                let s = Rc::new(s);
                self.cache = Some(Rc::clone(&s));
                s
            }
            // A writer is stuck mid-update: keep the last good copy, or (a worker started
            // meanwhile) read the table as it stands.
            None => self
                .cache
                .clone()
                .unwrap_or_else(|| Rc::new(self.table.snapshot_or_torn())),
        }
    }

    /// `-d` lines go straight to our stderr (the supervisor's, in the foreground; /dev/null
    /// when detached).
    fn debug(&self, args: std::fmt::Arguments<'_>) {
        if self.config.debug {
            crate::log::stderr_line(args);
        }
    }

    fn log(&self, priority: Priority, text: String) {
        self.notify(Message::Log { priority, text });
    }

    /// Logs a notice that could otherwise come once per connection (a full channel, a
    /// refusing one, a worker out of descriptors): the first at once, then at most one a
    /// second per kind and channel (None: the worker), with how many were held back
    /// meanwhile, which the supervisor, throttling again across workers, puts in the line.
    /// `text` is only built when the line is sent.
    fn notice(
        &mut self,
        kind: Notice,
        channel: Option<(usize, usize)>,
        text: impl FnOnce() -> String,
    ) {
        let now = self.now;
        let held = match self.notices.entry((kind, channel)) {
            Entry::Occupied(mut seen) => {
                let t = seen.get_mut();
                if now.duration_since(t.last) < NOTICE_INTERVAL {
                    t.held += 1;
                    return;
                }
                t.last = now;
                std::mem::take(&mut t.held)
            }
            Entry::Vacant(first) => {
                first.insert(Throttled { last: now, held: 0 });
                0
            }
        };
        // Channel indexes are below MAX_GROUPS and MAX_CHANNELS (64): they fit.
        let channel = channel.map(|(g, c)| (g as u16, c as u16));
        self.notify(Message::Notice {
            text: text(),
            line: NoticeLine {
                kind,
                channel,
                held,
            },
        });
    }

    /// Sends a message to the supervisor without waiting; a full channel drops it.
    fn notify(&self, msg: Message) {
        if let Ok(bytes) = ipc::encode(&msg) {
            let _ = nix::sys::socket::send(
                self.channel.as_raw_fd(),
                &bytes,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_table_reuses_low_entries_and_gives_back_its_empty_tail() {
        let mut free = FreeEntries::default();
        let mut table: Vec<Option<u32>> = Vec::new();
        let open = |free: &mut FreeEntries, table: &mut Vec<Option<u32>>, v: u32| {
            let i = free.take().unwrap_or_else(|| {
                table.push(None);
                table.len() - 1
            });
            table[i] = Some(v);
            i
        };
        // A burst of 4,000, then all but ten of them close.
        for v in 0..4000 {
            open(&mut free, &mut table, v);
        }
        for (i, entry) in table.iter_mut().enumerate().skip(10) {
            *entry = None;
            free.closed(i);
        }
        // Not reusable before the batch is over.
        assert_eq!(free.take(), None);
        free.end_batch(&mut table, 10);
        assert_eq!(table.len(), TRIM_ABOVE / 2, "the empty tail is given back");
        assert!(table.capacity() <= TRIM_ABOVE);
        // New connections take the lowest empty entries, none past the end.
        assert_eq!(open(&mut free, &mut table, 1), 10);
        assert_eq!(open(&mut free, &mut table, 2), 11);
        // A connection near the end keeps the table long; a busy table is left alone.
        let mut table: Vec<Option<u32>> = (0..1000).map(Some).collect();
        let mut free = FreeEntries::default();
        for (i, entry) in table.iter_mut().enumerate().take(999) {
            *entry = None;
            free.closed(i);
        }
        free.end_batch(&mut table, 1);
        assert_eq!(table.len(), 1000);
        assert_eq!(free.take(), Some(0));
    }

    #[test]
    fn a_saturated_worker_retries_less_and_less_often_up_to_a_cap() {
        let mut last = None;
        let intervals: Vec<Duration> = (0..8)
            .map(|_| {
                let next = next_retry(last);
                last = Some(next);
                next
            })
            .collect();
        assert_eq!(intervals[0], ACCEPT_RETRY);
        assert_eq!(intervals[1], 2 * ACCEPT_RETRY);
        assert!(intervals.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(intervals[7], ACCEPT_RETRY_MAX);
    }

    fn timer(when: Instant, entry: u32) -> Timer {
        Timer {
            when,
            entry,
            serial: u64::from(entry),
            kind: TimerKind::Idle,
        }
    }

    #[test]
    fn stale_deadlines_are_swept_once_they_outnumber_the_live_connections() {
        let now = Instant::now();
        let mut d = Deadlines::default();
        // 10 live connections with odd entries; 10,000 closed ones came and went.
        let applies = |t: &Timer| t.entry % 2 == 1 && t.entry < 20;
        for entry in 0..10_000u32 {
            let when = now + Duration::from_secs(3600 + u64::from(entry));
            d.push(timer(when, entry), 10, applies);
            assert!(
                d.0.len() <= 3 * 10 + DEADLINE_SLACK + 1,
                "the heap grew to {}",
                d.0.len()
            );
        }
        // The live connections' deadlines survived every sweep.
        let kept: Vec<u32> =
            d.0.iter()
                .map(|Reverse(t)| t.entry)
                .filter(|&e| e < 20)
                .collect();
        assert_eq!(kept.iter().filter(|&&e| e % 2 == 1).count(), 10);
    }

    #[test]
    fn deadlines_come_due_earliest_first() {
        let now = Instant::now();
        let mut d = Deadlines::default();
        for (entry, secs) in [(1u32, 3u64), (2, 1), (3, 2)] {
            d.push(timer(now + Duration::from_secs(secs), entry), 3, |_| true);
        }
        assert_eq!(d.next(), Some(now + Duration::from_secs(1)));
        assert!(d.pop_due(now).is_none(), "nothing is due yet");
        let later = now + Duration::from_secs(2);
        let due: Vec<u32> = std::iter::from_fn(|| d.pop_due(later))
            .map(|t| t.entry)
            .collect();
        assert_eq!(due, vec![2, 3]);
        assert_eq!(d.next(), Some(now + Duration::from_secs(3)));
    }
}
