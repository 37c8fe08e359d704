//! A worker process: the code that touches client bytes.
//!
//! Started by the supervisor as `balance --worker` (its own image, exec'd fresh) with the
//! supervisor channel on fd 3, a worker runs in three steps, like every balance process:
//! 1. receive what it needs: a `Start` message carrying its settings, the listening
//!    socket(s) and the table;
//! 2. lock itself down (`sandbox::lock_down_worker`) before it reads a single client byte;
//! 3. run a single-threaded event loop: accept → pick a channel → connect with failover →
//!    relay → account.
//!
//! The event loop is epoll (through `mio`, edge-triggered) and a table of connections, each a
//! small plain struct: an idle connection costs its two sockets and a few hundred bytes,
//! and a relayed chunk costs the socket calls and nothing else. A connection moves through
//! two phases: *connecting* (trying the candidates in order, each with the connect timeout)
//! and *relaying* (see `relay.rs`). Timers (connect and idle timeouts) are one heap of
//! deadlines, checked lazily.
//!
//! A worker never resolves names, opens files or takes the table lock: it reads the
//! configuration through the seqlock, admits against maxc with atomics, and asks the
//! supervisor to disable a failed channel (`-a`). It exits when the supervisor's channel closes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::ipc::{self, Message, Priority, WorkerConfig};
use crate::relay::{self, Direction, End, Flow, Readiness, State};
use crate::select::{self, Candidate};
use crate::table::{GroupKind, Snapshot, Table};

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
/// Pause after an accept failed for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The worker's entry point; returns only on a start-up error or when it is done.
pub fn run() -> Result<(), WorkerError> {
    let channel = crate::sys::take_inherited_fd(CHANNEL_FD)
        .map_err(|e| fail("supervisor channel missing", e))?;
    let channel = UnixDatagram::from(channel);
    let (config, listeners, table_fd) = receive_start(&channel)?;
    let table = Table::open(&File::from(table_fd), true).map_err(|e| fail("table", e))?;

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
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET | EpollFlags::EPOLLEXCLUSIVE;
        shared
            .add(&l, EpollEvent::new(flags, (1 + i) as u64))
            .map_err(|e| fail("listener", e))?;
        accepting.push(Some(TcpListener::from_std(l)));
    }

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
        config,
        table,
        channel,
        listeners: accepting,
        accept_paused_until: None,
        conns: Vec::new(),
        free: Vec::new(),
        closed: Vec::new(),
        live: 0,
        serial: 0,
        timers: BinaryHeap::new(),
        busy: Vec::new(),
        draining: false,
        cache: None,
        full_logged: HashMap::new(),
        spares: relay::Spares::default(),
        now,
    };
    worker.run()
}

/// Waits for the `Start` message and checks its descriptors.
fn receive_start(
    channel: &UnixDatagram,
) -> Result<(WorkerConfig, Vec<std::net::TcpListener>, OwnedFd), WorkerError> {
    let (msg, mut fds) = ipc::recv_blocking(channel).map_err(|e| fail("start message", e))?;
    let Message::Start(config) = msg else {
        return Err(WorkerError("first message was not Start".into()));
    };
    if config.listeners == 0 || fds.len() != config.listeners as usize + 1 {
        return Err(WorkerError(format!(
            "expected {} listeners and the table, got {} descriptors",
            config.listeners,
            fds.len()
        )));
    }
    let table = fds
        .pop()
        .ok_or_else(|| WorkerError("no table descriptor".into()))?;
    let listeners = fds.into_iter().map(std::net::TcpListener::from).collect();
    Ok((config, listeners, table))
}

/// One client connection, from accept to close.
struct Conn {
    /// Distinguishes this connection from later ones in the same table entry (timers and
    /// deferred work refer to a connection by entry and serial).
    serial: u64,
    client: TcpStream,
    client_ready: Readiness,
    peer: SocketAddr,
    backend: Option<TcpStream>,
    backend_ready: Readiness,
    /// The channel this connection holds a place on (while connecting to it or relaying).
    slot: Option<(u16, u16)>,
    phase: Phase,
    up: Flow,
    down: Flow,
    last_activity: Instant,
}

enum Phase {
    /// Looking for a backend.
    Connecting(Box<Connecting>),
    /// Relaying; what `--log-connections` reports at the end, when it is on.
    Relaying(Option<Box<Logged>>),
}

struct Logged {
    started: Instant,
    addr: SocketAddr,
}

/// The failover state of a connection that has no backend yet.
struct Connecting {
    snap: Rc<Snapshot>,
    candidates: Vec<Candidate>,
    /// Index in `candidates` of the next one to try.
    next: usize,
    /// When the connect in progress times out (None: a timeout too large to represent).
    deadline: Option<Instant>,
    /// When the connection was accepted (for `--log-connections`).
    started: Instant,
}

/// Why a connection ended.
enum Ending {
    Closed,
    IdleTimeout,
    Error(io::Error),
    NoChannel,
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
    table: Table,
    channel: UnixDatagram,
    listeners: Vec<Option<TcpListener>>,
    accept_paused_until: Option<Instant>,
    /// Connections by entry; `free` lists the empty entries. An entry emptied while events
    /// are being handled waits in `closed` until the batch is done, so that a later event
    /// of the same batch cannot reach a new connection in the same entry.
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    closed: Vec<u32>,
    live: usize,
    serial: u64,
    /// Deadlines, earliest first. Stale ones are skipped when they come up.
    timers: BinaryHeap<Reverse<Timer>>,
    busy: Vec<Busy>,
    draining: bool,
    cache: Option<Rc<Snapshot>>,
    /// When "maxc reached" was last logged, per channel.
    full_logged: HashMap<(usize, usize), Instant>,
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
            for ev in events.iter() {
                let token = ev.token().0;
                let error = ev.is_error();
                let read_closed = ev.is_read_closed();
                if token >= CONN_BASE {
                    let ready = Readiness {
                        readable: ev.is_readable(),
                        writable: ev.is_writable(),
                        read_closed,
                        error,
                    };
                    self.on_socket_event((token - CONN_BASE) / 2, token % 2 == 1, ready);
                } else if token == CHANNEL.0 {
                    if !self.on_supervisor() {
                        return Ok(());
                    }
                } else {
                    self.accept(token - 1);
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
            if let Some(until) = self.accept_paused_until {
                if self.now >= until {
                    self.accept_paused_until = None;
                    for i in 0..self.listeners.len() {
                        self.accept(i);
                    }
                }
            }
            self.free.append(&mut self.closed);
            if self.draining && self.live == 0 {
                return Ok(());
            }
        }
    }

    /// How long the next wait may block: not past the next deadline.
    fn wait_timeout(&self) -> Option<Duration> {
        if !self.busy.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = [
            self.timers.peek().map(|Reverse(t)| t.when),
            self.accept_paused_until,
        ]
        .into_iter()
        .flatten()
        .min()?;
        // Round up so that the wake-up is not a millisecond early.
        Some(next.saturating_duration_since(Instant::now()) + Duration::from_micros(999))
    }

    fn serial_of(&self, i: usize) -> Option<u64> {
        self.conns.get(i)?.as_ref().map(|c| c.serial)
    }

    /// Handles the supervisor's messages; false when the worker must exit now.
    fn on_supervisor(&mut self) -> bool {
        loop {
            match ipc::try_recv(&self.channel) {
                Ok(None) => return true,
                Ok(Some((Message::Drain, _))) => self.drain(),
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
        for slot in &mut self.listeners {
            if let Some(l) = slot.take() {
                // Closing our descriptor would not remove it: the other workers hold the
                // same open socket.
                let _ = self.shared.delete(&l);
            }
        }
    }

    fn accept(&mut self, i: usize) {
        if self.accept_paused_until.is_some() {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(Some(listener)) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((client, peer)) => self.open(client, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match e.raw_os_error().map(Errno::from_raw) {
                    Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
                        // Out of descriptors or memory: back off instead of spinning.
                        self.debug(format_args!("accept error {e}"));
                        self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
                        return;
                    }
                    // The client gave up before we took it, or the like: take the next.
                    _ => self.debug(format_args!("accept error {e}")),
                },
            }
        }
        self.busy.push(Busy::Listener(i));
    }

    /// A new client: choose the candidates and start connecting.
    fn open(&mut self, mut client: TcpStream, peer: SocketAddr) {
        self.debug(format_args!("connect from {peer}"));
        let i = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut client,
            Token(CONN_BASE + 2 * i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.debug(format_args!("cannot watch the connection from {peer}: {e}"));
            self.closed.push(i as u32);
            return;
        }
        let snap = self.snapshot();
        let hash = select::client_hash(peer.ip());
        let candidates = select::candidates(&snap, hash, self.config.hash_failover, |g| {
            self.table.layout().groups[g].cursor.load(Ordering::Relaxed)
        });
        self.serial += 1;
        self.conns[i] = Some(Conn {
            serial: self.serial,
            client,
            // Optimistic: a fresh socket has room; a full one says so at the first write.
            client_ready: Readiness {
                writable: true,
                ..Readiness::default()
            },
            peer,
            backend: None,
            backend_ready: Readiness::default(),
            slot: None,
            phase: Phase::Connecting(Box::new(Connecting {
                snap,
                candidates,
                next: 0,
                deadline: None,
                started: self.now,
            })),
            up: Flow::default(),
            down: Flow::default(),
            last_activity: self.now,
        });
        self.live += 1;
        self.try_next(i);
    }

    fn on_socket_event(&mut self, i: usize, backend: bool, ev: Readiness) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            // An event of this batch for a connection closed earlier in it.
            return;
        };
        let r = if backend {
            &mut conn.backend_ready
        } else {
            &mut conn.client_ready
        };
        r.readable |= ev.readable;
        r.writable |= ev.writable;
        r.read_closed |= ev.read_closed;
        r.error |= ev.error;
        self.drive(i);
    }

    /// Moves a connection on after an event.
    fn drive(&mut self, i: usize) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        if matches!(conn.phase, Phase::Relaying(_)) {
            return self.relay(i);
        }
        let r = conn.backend_ready;
        if conn.backend.is_none() || !(r.writable || r.error) {
            // Client events while connecting wait in the readiness flags.
            return;
        }
        // Writable after a non-blocking connect: connected, unless an error came with it.
        let result = if r.error {
            match conn.backend.as_ref().map(|b| b.take_error()) {
                Some(Ok(Some(e))) | Some(Err(e)) => Err(e),
                _ => Ok(()),
            }
        } else {
            Ok(())
        };
        match result {
            Ok(()) => self.connected(i),
            Err(e) => {
                let reason = e.to_string();
                self.connect_failed(i, &reason);
            }
        }
    }

    /// Tries the remaining candidates in order until a connect is under way or none is left.
    fn try_next(&mut self, i: usize) {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(i) else {
                return;
            };
            let Phase::Connecting(connecting) = &mut conn.phase else {
                return;
            };
            let Some(&(g, c)) = connecting.candidates.get(connecting.next) else {
                let peer = conn.peer;
                self.log(
                    Priority::Warning,
                    format!("no channel could take the connection from {peer}"),
                );
                return self.close(i, Ending::NoChannel);
            };
            connecting.next += 1;
            let snap = Rc::clone(&connecting.snap);
            let group = &snap.groups[g];
            let ch = &group.channels[c];
            let Some(addr) = ch.addr else {
                continue;
            };
            if !self.table.reserve(self.row, g, c, ch.maxc) {
                self.debug(format_args!("group {g} channel {c} is full"));
                self.note_full(g, c, ch.maxc);
                continue;
            }
            if group.kind == GroupKind::RoundRobin {
                let next = ((c + 1) % group.channels.len()) as u32;
                self.table.layout().groups[g]
                    .cursor
                    .store(next, Ordering::Relaxed);
            }
            self.debug(format_args!("trying group {g} channel {c} ({addr}) ..."));
            let started = start_connect(addr, self.config.source).and_then(|mut s| {
                self.poll.registry().register(
                    &mut s,
                    Token(CONN_BASE + 2 * i + 1),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(s)
            });
            let deadline = self.now.checked_add(self.connect_timeout);
            let Some(Some(conn)) = self.conns.get_mut(i) else {
                return;
            };
            conn.slot = Some((g as u16, c as u16));
            match started {
                Ok(stream) => {
                    conn.backend = Some(stream);
                    conn.backend_ready = Readiness::default();
                    if let Phase::Connecting(connecting) = &mut conn.phase {
                        connecting.deadline = deadline;
                    }
                    if let Some(when) = deadline {
                        self.timers.push(Reverse(Timer {
                            when,
                            entry: i as u32,
                            serial: conn.serial,
                            kind: TimerKind::Connect,
                        }));
                    }
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    // A port added at run time that this worker's sandbox predates: the
                    // supervisor is replacing the workers. Not the channel's fault.
                    self.release(i);
                    self.debug(format_args!(
                        "group {g} channel {c}: port {} not admitted by this worker's sandbox yet",
                        addr.port()
                    ));
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.attempt_failed(i, &reason);
                }
            }
        }
    }

    /// The connect in progress failed: log it, give the place back, try the next candidate.
    fn connect_failed(&mut self, i: usize, reason: &str) {
        self.attempt_failed(i, reason);
        self.try_next(i);
    }

    /// Logs a failed attempt, gives the place back and applies `-a`.
    fn attempt_failed(&mut self, i: usize, reason: &str) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        // Closing the socket also takes it out of epoll.
        conn.backend = None;
        conn.backend_ready = Readiness::default();
        let Phase::Connecting(connecting) = &conn.phase else {
            return;
        };
        let Some((g, c)) = conn.slot.map(|(g, c)| (g as usize, c as usize)) else {
            return;
        };
        let addr = connecting.snap.groups[g].channels[c]
            .addr
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let next = match connecting.candidates.get(connecting.next) {
            Some((ng, nc)) => format!("failing over to group {ng} channel {nc}"),
            None => "no channel left to try".to_string(),
        };
        self.release(i);
        self.log(
            Priority::Notice,
            format!("connection failed group {g} channel {c} ({addr}): {reason}; {next}"),
        );
        if self.config.autodisable {
            self.notify(Message::Disable {
                group: g as u32,
                channel: c as u32,
            });
        }
    }

    /// The backend accepted: set it up and start relaying.
    fn connected(&mut self, i: usize) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        let (Some(backend), Some((g, c))) = (conn.backend.as_ref(), conn.slot) else {
            return;
        };
        // The client socket inherited both options from the listener (see the bootstrap).
        let _ = backend.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(backend, nix::sys::socket::sockopt::KeepAlive, &true);
        if let Some(ch) = self.table.channel(g as usize, c as usize) {
            ch.total.fetch_add(1, Ordering::Relaxed);
        }
        // Nothing of the choice is needed while the bytes flow.
        let logged = match &conn.phase {
            Phase::Connecting(connecting) if self.config.log_connections => {
                backend.peer_addr().ok().map(|addr| {
                    Box::new(Logged {
                        started: connecting.started,
                        addr,
                    })
                })
            }
            _ => None,
        };
        conn.phase = Phase::Relaying(logged);
        conn.last_activity = self.now;
        // A timeout too large to represent never fires.
        if let Some(when) = self.idle_timeout.and_then(|d| self.now.checked_add(d)) {
            self.timers.push(Reverse(Timer {
                when,
                entry: i as u32,
                serial: conn.serial,
                kind: TimerKind::Idle,
            }));
        }
        self.debug(format_args!("connect to group {g} channel {c} successful"));
        self.relay(i);
    }

    /// Moves bytes both ways as far as the sockets allow.
    fn relay(&mut self, i: usize) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        if !matches!(conn.phase, Phase::Relaying(_)) {
            return;
        }
        let (Some(backend), Some((g, c))) = (conn.backend.as_ref(), conn.slot) else {
            return;
        };
        let Some(ch) = self.table.channel(g as usize, c as usize) else {
            return;
        };
        let dump = self.config.dump;
        let up = relay::pump(
            &mut conn.up,
            End {
                socket: &conn.client,
                ready: &mut conn.client_ready,
            },
            End {
                socket: backend,
                ready: &mut conn.backend_ready,
            },
            conn.down.is_done(),
            &ch.sent,
            dump.then_some(Direction::Up),
            &mut self.spares,
        );
        let down = up.and_then(|up| {
            relay::pump(
                &mut conn.down,
                End {
                    socket: backend,
                    ready: &mut conn.backend_ready,
                },
                End {
                    socket: &conn.client,
                    ready: &mut conn.client_ready,
                },
                conn.up.is_done(),
                &ch.received,
                dump.then_some(Direction::Down),
                &mut self.spares,
            )
            .map(|down| (up, down))
        });
        let (up, down) = match down {
            Ok(both) => both,
            Err(e) => return self.close(i, Ending::Error(e)),
        };
        if up.moved || down.moved {
            conn.last_activity = self.now;
        }
        if conn.up.is_done() && conn.down.is_done() {
            return self.close(i, Ending::Closed);
        }
        if up.state == State::Busy || down.state == State::Busy {
            let serial = conn.serial;
            self.busy.push(Busy::Conn(i, serial));
        }
    }

    /// Ends the deadlines that have passed: connect timeouts fail over, idle connections
    /// close.
    fn fire_timers(&mut self) {
        while let Some(&Reverse(timer)) = self.timers.peek() {
            if timer.when > self.now {
                return;
            }
            self.timers.pop();
            let i = timer.entry as usize;
            let Some(Some(conn)) = self.conns.get(i) else {
                continue;
            };
            if conn.serial != timer.serial {
                continue;
            }
            match (&conn.phase, timer.kind) {
                (Phase::Connecting(c), TimerKind::Connect)
                    if c.deadline.is_some_and(|d| d <= self.now) && conn.backend.is_some() =>
                {
                    let reason = format!("timeout after {}s", self.connect_timeout.as_secs());
                    self.connect_failed(i, &reason);
                }
                (Phase::Relaying(_), TimerKind::Idle) => {
                    let Some(idle) = self.idle_timeout else {
                        continue;
                    };
                    match conn.last_activity.checked_add(idle) {
                        Some(due) if due <= self.now => self.close(i, Ending::IdleTimeout),
                        Some(due) => self.timers.push(Reverse(Timer { when: due, ..timer })),
                        None => {}
                    }
                }
                // A connect deadline that no longer applies (connected, or moved on).
                _ => {}
            }
        }
    }

    /// Gives back the place on the channel the connection holds, if any.
    fn release(&mut self, i: usize) {
        if let Some(Some(conn)) = self.conns.get_mut(i) {
            if let Some((g, c)) = conn.slot.take() {
                self.table.release(self.row, g as usize, c as usize);
            }
        }
    }

    /// Closes both sockets, gives the place back and logs what `-d`/`--log-connections` ask.
    fn close(&mut self, i: usize, ending: Ending) {
        let slot = self
            .conns
            .get(i)
            .and_then(|c| c.as_ref())
            .and_then(|c| c.slot);
        self.release(i);
        let Some(conn) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.live -= 1;
        self.closed.push(i as u32);
        if matches!(ending, Ending::NoChannel)
            || !(self.config.debug || self.config.log_connections)
        {
            return;
        }
        let how = match &ending {
            Ending::Closed | Ending::NoChannel => "closed".to_string(),
            Ending::IdleTimeout => format!(
                "timed out after {} seconds",
                self.config.idle_timeout_secs.unwrap_or(0)
            ),
            Ending::Error(e) => format!("ended: {e}"),
        };
        let peer = conn.peer;
        self.debug(format_args!("connection from {peer} {how}"));
        if !self.config.log_connections {
            return;
        }
        let (Some((g, c)), Phase::Relaying(Some(logged))) = (slot, &conn.phase) else {
            return;
        };
        let text = format!(
            "connection from {peer} via group {g} channel {c} ({}): {} bytes up, {} bytes down, {:.3}s, {how}",
            logged.addr,
            conn.up.bytes,
            conn.down.bytes,
            self.now.duration_since(logged.started).as_secs_f64()
        );
        self.log(Priority::Info, text);
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

    /// Logs that a channel turned a connection away because of maxc, at most once a second
    /// per channel (under load this would otherwise be a line per connection).
    fn note_full(&mut self, g: usize, c: usize, maxc: i32) {
        let now = self.now;
        let due = self
            .full_logged
            .get(&(g, c))
            .is_none_or(|last| now.duration_since(*last) >= FULL_LOG_INTERVAL);
        if due {
            self.full_logged.insert((g, c), now);
            self.log(
                Priority::Notice,
                format!("group {g} channel {c} reached maxc {maxc}; trying the next channel"),
            );
        }
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

/// Starts a non-blocking connect; the result comes as an event.
fn start_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(src) = source {
        if src.is_ipv4() == addr.is_ipv4() {
            nix::sys::socket::bind(
                fd.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(src, 0)),
            )?;
        }
    }
    match nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}
