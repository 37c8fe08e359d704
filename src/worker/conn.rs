//! One connection, top to bottom: accept → pick the candidates → connect with failover →
//! relay → close and account. The event loop in `worker.rs` calls in here with the events
//! and deadlines of a connection; everything a connection does happens in this file, in
//! that order.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};
use nix::errno::Errno;

use super::{Busy, Notice, Timer, TimerKind, Worker, CONN_BASE};
use crate::ipc::{Message, Priority};
use crate::relay::{self, Direction, End, Flow, Readiness, Side, State};
use crate::select::{self, Candidate};
use crate::table::{GroupKind, Snapshot};

/// One client connection, from accept to close.
pub(super) struct Conn {
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
    /// Set once a side has failed: the other is getting what the failed side sent before.
    abort: Option<Box<Abort>>,
    /// The half-close deadline is armed (one direction has ended).
    half_closed: bool,
}

/// A failed side of a relayed connection, while the survivor gets what it is still owed.
struct Abort {
    /// True: the backend failed; false: the client.
    backend: bool,
    error: io::Error,
    /// What the survivor had not acknowledged at the last look, once all is written
    /// (`usize::MAX` until then).
    unacknowledged: usize,
    /// When the side failed.
    since: Instant,
    /// The one check deadline that applies (older ones in the heap are stale); None when
    /// none is armed.
    check: Option<Instant>,
}

impl Abort {
    /// Everything is written; the survivor's acknowledgement is awaited.
    fn all_written(&self) -> bool {
        self.unacknowledged != usize::MAX
    }
}

/// What epoll watches on both sockets of a connection (edge-triggered); PRIORITY says when
/// the peer sent urgent data (see [`Readiness::urgent`]).
const WATCHED: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);

/// How long a connection whose other side failed waits for the survivor to take what it is
/// still owed, without progress, before resetting it anyway: a peer that does not read
/// must not hold the connection (and its place under maxc) for a side that is gone.
pub(super) const ABORT_STALL: std::time::Duration = std::time::Duration::from_secs(5);
/// How many half-close timeouts without progress data waiting in balance for a reader that
/// has paused keeps a half-closed connection open.
const HALF_CLOSE_PATIENCE: u32 = 4;
/// How long it waits at most, progress or not.
const ABORT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How often an aborting connection that has written everything looks at what the
/// survivor has acknowledged (no event tells when it is all).
const ABORT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

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
    /// The round-robin group whose cursor this connection last moved, and where to.
    moved_cursor: Option<(usize, u32)>,
}

/// Why a connection ended.
enum Ending {
    Closed,
    IdleTimeout,
    HalfCloseTimeout,
    Error(io::Error),
    /// A side failed (the error is in the connection's `abort`).
    Aborted,
    NoChannel,
}

impl Worker {
    /// A new client: choose the candidates and start connecting.
    pub(super) fn open(&mut self, mut client: TcpStream, peer: SocketAddr) {
        // An IPv4 client of a dual-stack listener (-6) arrives as ::ffff:a.b.c.d: logged
        // (and hashed) as the IPv4 address it is.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        self.debug(format_args!("connect from {peer}"));
        let i = match self.free.take() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut client, Token(CONN_BASE + 2 * i), WATCHED)
        {
            self.debug(format_args!("cannot watch the connection from {peer}: {e}"));
            self.free.closed(i);
            // Out of memory or of epoll watches (a per-user limit): like a shortage of
            // descriptors, let the other workers take new connections for a while rather
            // than accept and drop each one.
            if relay::is_shortage(&e) {
                self.stop_accepting(&e);
            }
            return;
        }
        let snap = self.snapshot();
        let hash = select::client_hash(peer.ip());
        let candidates = select::candidates(&snap, hash, self.config.hash_failover, |g| {
            self.table.layout().cursors[g].load(Ordering::Relaxed)
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
                moved_cursor: None,
            })),
            up: Flow::default(),
            down: Flow::default(),
            last_activity: self.now,
            abort: None,
            half_closed: false,
        });
        self.live += 1;
        self.try_next(i);
    }

    pub(super) fn on_socket_event(&mut self, i: usize, backend: bool, ev: Readiness) {
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
        r.urgent |= ev.urgent;
        self.drive(i);
    }

    /// Moves a connection on after an event.
    pub(super) fn drive(&mut self, i: usize) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        if matches!(conn.phase, Phase::Relaying(_)) {
            return self.relay(i);
        }
        // A client that reset while its backend is being connected is gone: the attempt
        // is dropped at once (its place under maxc with it), not carried to its end and
        // relayed to nobody. A client's FIN is not that: its request may still go through.
        let error = relay::take_error(End {
            socket: &conn.client,
            ready: &mut conn.client_ready,
        });
        if let Some(e) = error {
            let peer = conn.peer;
            self.debug(format_args!(
                "connection from {peer} reset while connecting: {e}"
            ));
            return self.close(i, Ending::Error(e));
        }
        let r = conn.backend_ready;
        if conn.backend.is_none() || !(r.writable || r.error) {
            // Client events while connecting wait in the readiness flags.
            return;
        }
        // Writable after a non-blocking connect: connected, unless an error came with it.
        let failed = match (&conn.backend, r.error) {
            (Some(b), true) => b.take_error().unwrap_or_else(Some),
            _ => None,
        };
        match failed {
            None => self.connected(i, None),
            // The backend accepted, then reset before this worker looked. That is a
            // connection that was made, as when the reset comes a moment later (and as
            // with the original's blocking connect): relayed and ended like any reset, not
            // failed over, and not held against the channel by `-a`.
            Some(e) if relay::is_reset_after_handshake(&e) => self.connected(i, Some(e)),
            Some(e) => self.connect_failed(i, &e.to_string()),
        }
    }

    /// Tries the remaining candidates in order until a connect is under way or none is left.
    fn try_next(&mut self, i: usize) {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(i) else {
                return;
            };
            let peer = conn.peer;
            let Phase::Connecting(connecting) = &mut conn.phase else {
                return;
            };
            let Some(&(g, c)) = connecting.candidates.get(connecting.next) else {
                self.notice(Notice::NoChannel, None, || {
                    format!("no channel could take the connection from {peer}")
                });
                return self.close(i, Ending::NoChannel);
            };
            connecting.next += 1;
            let snap = Rc::clone(&connecting.snap);
            let moved = connecting.moved_cursor;
            let Some(addr) = self.admit(&snap, g, c) else {
                continue;
            };
            if let Some(to) = self.move_cursor(&snap, g, c, moved) {
                if let Some(Some(Conn {
                    phase: Phase::Connecting(connecting),
                    ..
                })) = self.conns.get_mut(i)
                {
                    connecting.moved_cursor = Some((g, to));
                }
            }
            let mut attempt = self.start_attempt(i, g, c, addr);
            if let Err(e) = &attempt {
                if relay::is_shortage(e) && self.free_descriptors(e) {
                    attempt = self.start_attempt(i, g, c, addr);
                }
            }
            match attempt {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    // A port added at run time that this worker's sandbox predates: the
                    // supervisor is replacing the workers. Not the channel's fault.
                    self.release(i);
                    self.debug(format_args!(
                        "group {g} channel {c}: port {} not admitted by this worker's sandbox yet",
                        addr.port()
                    ));
                }
                Err(e) if relay::is_shortage(&e) => {
                    // Still no descriptor: no channel is to blame (nor disabled by `-a`),
                    // and every other one would fail alike.
                    self.release(i);
                    self.stop_accepting(&e);
                    self.notice(Notice::Shortage, Some((g, c)), || {
                        format!(
                            "cannot open a connection to group {g} channel {c} for {peer}: {e}; \
                             the client is closed (not the channel's fault)"
                        )
                    });
                    return self.close(i, Ending::Error(e));
                }
                Err(e) => {
                    // No source port left towards this channel (some tens of thousands of
                    // connections to it): fail over, but the channel is not dead, and `-a`
                    // leaves it enabled.
                    let blame = e.raw_os_error() != Some(libc::EADDRNOTAVAIL);
                    self.attempt_failed(i, &e.to_string(), blame);
                }
            }
        }
    }

    /// Out of descriptors with a client accepted: frees some for it, the pipes kept for reuse
    /// first, else the reserve kept for this moment (and then the worker stops accepting
    /// until a connection closes). False when there was nothing to free.
    fn free_descriptors(&mut self, e: &io::Error) -> bool {
        if self.spares.drop_idle() > 0 {
            return true;
        }
        if !self.spares.spend_reserve() {
            return false;
        }
        self.stop_accepting(e);
        true
    }

    /// Takes a place on channel (g, c) if its maxc allows. The channel's address when it
    /// admitted the connection.
    fn admit(&mut self, snap: &Snapshot, g: usize, c: usize) -> Option<SocketAddr> {
        let group = &snap.groups[g];
        let ch = &group.channels[c];
        let addr = ch.addr?;
        if !self.table.reserve(self.row, g, c, ch.maxc) {
            self.debug(format_args!("group {g} channel {c} is full"));
            let maxc = ch.maxc;
            self.notice(Notice::Full, Some((g, c)), || {
                format!("group {g} channel {c} reached maxc {maxc}; trying the next channel")
            });
            return None;
        }
        Some(addr)
    }

    /// Moves a round-robin group's cursor past channel c, which has just admitted the
    /// connection; where to, when it did. `moved`: where this connection last moved a
    /// cursor. A failover inside the group moves it only if no other connection has since:
    /// the original's child set it regardless, rewinding the rotation that connections
    /// started during a slow connect had moved on (reference §8.15).
    fn move_cursor(
        &self,
        snap: &Snapshot,
        g: usize,
        c: usize,
        moved: Option<(usize, u32)>,
    ) -> Option<u32> {
        let group = &snap.groups[g];
        if group.kind != GroupKind::RoundRobin {
            return None;
        }
        let next = ((c + 1) % group.channels.len()) as u32;
        let cursor = &self.table.layout().cursors[g];
        match moved {
            Some((same, ours)) if same == g => cursor
                .compare_exchange(ours, next, Ordering::Relaxed, Ordering::Relaxed)
                .ok()
                .map(|_| next),
            _ => {
                cursor.store(next, Ordering::Relaxed);
                Some(next)
            }
        }
    }

    /// Starts a non-blocking connect to channel (g, c) at `addr`, whose place the connection
    /// now holds, and arms the connect timeout. An error means this attempt failed at once.
    fn start_attempt(&mut self, i: usize, g: usize, c: usize, addr: SocketAddr) -> io::Result<()> {
        self.debug(format_args!("trying group {g} channel {c} ({addr}) ..."));
        if let Some(Some(conn)) = self.conns.get_mut(i) {
            conn.slot = Some((g as u16, c as u16));
        }
        let (mut stream, unbound) = start_connect(addr, self.config.source)?;
        if let (Some(e), Some(src)) = (unbound, self.config.source) {
            self.notice(Notice::Source, None, || {
                format!(
                    "cannot bind the source address {src} ({e}): connecting from the default one"
                )
            });
        }
        self.poll
            .registry()
            .register(&mut stream, Token(CONN_BASE + 2 * i + 1), WATCHED)?;
        let deadline = self.now.checked_add(self.connect_timeout);
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return Ok(());
        };
        conn.backend = Some(stream);
        conn.backend_ready = Readiness::default();
        if let Phase::Connecting(connecting) = &mut conn.phase {
            connecting.deadline = deadline;
        }
        if let Some(when) = deadline {
            let serial = conn.serial;
            self.set_deadline(Timer {
                when,
                entry: i as u32,
                serial,
                kind: TimerKind::Connect,
            });
        }
        Ok(())
    }

    /// The connect in progress failed: log it, give the place back, try the next candidate.
    fn connect_failed(&mut self, i: usize, reason: &str) {
        self.attempt_failed(i, reason, true);
        self.try_next(i);
    }

    /// Logs a failed attempt, gives the place back and applies `-a` when the channel is to
    /// `blame`.
    fn attempt_failed(&mut self, i: usize, reason: &str, blame: bool) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        // Closing the socket also takes it out of epoll.
        conn.backend = None;
        conn.backend_ready = Readiness::default();
        let Phase::Connecting(connecting) = &mut conn.phase else {
            return;
        };
        connecting.deadline = None;
        let Some((g, c)) = conn.slot.map(|(g, c)| (g as usize, c as usize)) else {
            return;
        };
        let addr = connecting.snap.groups[g].channels[c].addr;
        let next = connecting.candidates.get(connecting.next).copied();
        self.release(i);
        // `-d` shows every attempt, as the original did; the notice below is throttled.
        self.debug(format_args!(
            "connection failed group {g} channel {c}: {reason}"
        ));
        self.notice(Notice::Failed, Some((g, c)), || {
            let addr = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
            let next = match next {
                Some((ng, nc)) => format!("failing over to group {ng} channel {nc}"),
                None => "no channel left to try".to_string(),
            };
            format!("connection failed group {g} channel {c} ({addr}): {reason}; {next}")
        });
        if let (true, true, Some(addr)) = (self.config.autodisable, blame, addr) {
            self.notify(Message::Disable {
                group: g as u32,
                channel: c as u32,
                addr,
            });
        }
    }

    /// The backend accepted: set it up and start relaying. `reset`: the error of a backend
    /// that has already reset (read, and so cleared, from the socket), passed on as a
    /// failure while relaying would be.
    fn connected(&mut self, i: usize, reset: Option<io::Error>) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        let (Some(backend), Some((g, c))) = (conn.backend.as_ref(), conn.slot) else {
            return;
        };
        // The client socket inherited both options from the listener (see the bootstrap).
        let _ = backend.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(backend, nix::sys::socket::sockopt::KeepAlive, &true);
        if let Some(ch) = self.table.counters(g as usize, c as usize) {
            ch.total.fetch_add(1, Ordering::Relaxed);
        }
        // Nothing of the choice is needed while the bytes flow.
        let logged = match &conn.phase {
            Phase::Connecting(connecting) if self.config.log_connections => {
                // A backend that has reset already has no peer address any more: the
                // channel's address is the one connected to.
                let chosen = || {
                    let g = connecting.snap.groups.get(g as usize)?;
                    g.channels.get(c as usize)?.addr
                };
                backend.peer_addr().ok().or_else(chosen).map(|addr| {
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
            let serial = conn.serial;
            self.set_deadline(Timer {
                when,
                entry: i as u32,
                serial,
                kind: TimerKind::Idle,
            });
        }
        self.debug(format_args!("connect to group {g} channel {c} successful"));
        if let Some(e) = reset {
            self.debug(format_args!(
                "group {g} channel {c} reset the connection at once: {e}"
            ));
            if !self.abort(i, true, e) {
                return;
            }
        }
        self.relay(i);
    }

    /// Moves bytes both ways as far as the sockets allow. When one side fails (a reset, a
    /// write that finds it gone), what it sent before is still delivered to the other side,
    /// which is then told with a reset: as a direct connection would have it.
    fn relay(&mut self, i: usize) {
        // A failure turns the connection to aborting and pumps again, once: a second
        // failure (the survivor's) closes it.
        for _ in 0..2 {
            match self.pump_both(i) {
                Some((backend, error)) => {
                    if !self.abort(i, backend, error) {
                        return;
                    }
                }
                None => break,
            }
        }
        self.schedule_abort_check(i);
    }

    /// For an aborting connection still open without a check due: the next look, soon
    /// while its survivor's acknowledgement is awaited, else when it would have stalled.
    fn schedule_abort_check(&mut self, i: usize) {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(abort) = conn.abort.as_mut().filter(|a| a.check.is_none()) else {
            return;
        };
        let when = if abort.all_written() {
            self.now + ABORT_POLL
        } else {
            conn.last_activity + ABORT_STALL
        };
        abort.check = Some(when);
        let serial = conn.serial;
        self.set_deadline(Timer {
            when,
            entry: i as u32,
            serial,
            kind: TimerKind::Stall,
        });
    }

    /// One round of [`Self::relay`]: the failed side (true: the backend) and its error, if a
    /// side failed.
    fn pump_both(&mut self, i: usize) -> Option<(bool, io::Error)> {
        let conn = self.conns.get_mut(i)?.as_mut()?;
        if !matches!(conn.phase, Phase::Relaying(_)) {
            return None;
        }
        let (Some(backend), Some((g, c))) = (conn.backend.as_ref(), conn.slot) else {
            return None;
        };
        let ch = self.table.counters(g as usize, c as usize)?;
        let flagged = relay::take_error(End {
            socket: &conn.client,
            ready: &mut conn.client_ready,
        })
        .map(|e| (false, e))
        .or_else(|| {
            relay::take_error(End {
                socket: backend,
                ready: &mut conn.backend_ready,
            })
            .map(|e| (true, e))
        });
        if flagged.is_some() {
            return flagged;
        }
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
        )
        .map_err(|f| (f.side == Side::Destination, f.error));
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
            .map_err(|f| (f.side == Side::Source, f.error))
        });
        let (up, down) = match down {
            Ok(both) => both,
            Err(failed) => return Some(failed),
        };
        if up.moved || down.moved {
            conn.last_activity = self.now;
        }
        if conn.up.is_done() && conn.down.is_done() {
            let Some(abort) = &mut conn.abort else {
                self.close(i, Ending::Closed);
                return None;
            };
            // All the survivor was owed is written. The reset that passes the failure on
            // would drop what its kernel still holds: close once the peer acknowledged it
            // all (the stall timer looks again until then).
            let survivor = if abort.backend { &conn.client } else { backend };
            let left = relay::unacknowledged(survivor);
            if left == 0 {
                self.close(i, Ending::Aborted);
            } else if left < abort.unacknowledged {
                if !abort.all_written() {
                    // From now on polled: the stall check armed so far no longer applies.
                    abort.check = None;
                }
                abort.unacknowledged = left;
                conn.last_activity = self.now;
            }
            return None;
        }
        if up.state == State::Busy || down.state == State::Busy {
            let serial = conn.serial;
            self.busy.push(Busy::Conn(i, serial));
        }
        // One direction has ended (passed on as a half-close): the peer that has not ended
        // its own gets `--half-close-timeout` of silence, counted from that end (an end of
        // stream after a long silence is news, not more silence).
        let ended_one = conn.up.is_done() != conn.down.is_done();
        if let (true, false, None, Some(limit)) = (
            ended_one,
            conn.half_closed,
            &conn.abort,
            self.half_close_timeout,
        ) {
            conn.half_closed = true;
            conn.last_activity = self.now;
            if let Some(when) = conn.last_activity.checked_add(limit) {
                let serial = conn.serial;
                self.set_deadline(Timer {
                    when,
                    entry: i as u32,
                    serial,
                    kind: TimerKind::HalfClosed,
                });
            }
        }
        None
    }

    /// One side of a relayed connection failed (true: the backend): the direction towards
    /// it is given up (what the survivor sends for it is dropped), and the other goes on
    /// until what the failed side sent is delivered (or the survivor takes nothing for
    /// [`ABORT_STALL`]); the close then resets the survivor. False when the connection is
    /// closed instead: the survivor failed too.
    fn abort(&mut self, i: usize, backend: bool, error: io::Error) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return false;
        };
        if conn.abort.is_some() {
            self.close(i, Ending::Aborted);
            return false;
        }
        // Its error taken (by the look or the call that failed), the failed socket reads
        // what its peer sent before failing, then end of stream.
        let (towards, from) = if backend {
            (&mut conn.up, &mut conn.down)
        } else {
            (&mut conn.down, &mut conn.up)
        };
        towards.abandon();
        from.source_failed();
        conn.abort = Some(Box::new(Abort {
            backend,
            error,
            unacknowledged: usize::MAX,
            since: self.now,
            check: None,
        }));
        conn.last_activity = self.now;
        true
    }

    /// Ends the deadlines that have passed: connect timeouts fail over, idle connections
    /// close.
    pub(super) fn fire_timers(&mut self) {
        while let Some(timer) = self.timers.pop_due(self.now) {
            if !deadline_applies(&self.conns, &timer) {
                continue;
            }
            let i = timer.entry as usize;
            match timer.kind {
                TimerKind::Connect => {
                    let reason = format!("timeout after {}s", self.connect_timeout.as_secs());
                    self.connect_failed(i, &reason);
                }
                TimerKind::Idle | TimerKind::HalfClosed => {
                    let (limit, ending) = match timer.kind {
                        TimerKind::Idle => (self.idle_timeout, Ending::IdleTimeout),
                        _ => (self.half_close_timeout, Ending::HalfCloseTimeout),
                    };
                    let now = self.now;
                    let last = self.conns[i].as_ref().map(|c| {
                        // A half-closed connection whose open direction holds data for a
                        // reader that has paused is waiting on the reader, not on a silent
                        // peer: for up to HALF_CLOSE_PATIENCE timeouts without progress. A
                        // reader that takes nothing for that long must not hold the
                        // connection, and its place under maxc, for ever.
                        let open = if c.up.is_done() { &c.down } else { &c.up };
                        let patient = limit
                            .and_then(|d| d.checked_mul(HALF_CLOSE_PATIENCE))
                            .and_then(|d| c.last_activity.checked_add(d))
                            .is_none_or(|until| now < until);
                        match timer.kind {
                            TimerKind::HalfClosed if open.has_pending() && patient => now,
                            _ => c.last_activity,
                        }
                    });
                    let due = last.zip(limit).and_then(|(l, d)| l.checked_add(d));
                    match due {
                        Some(due) if due <= self.now => self.close(i, ending),
                        Some(due) => self.set_deadline(Timer { when: due, ..timer }),
                        None => {}
                    }
                }
                TimerKind::Stall => {
                    let Some(Some(conn)) = self.conns.get_mut(i) else {
                        continue;
                    };
                    let Some(abort) = conn.abort.as_mut() else {
                        continue;
                    };
                    if conn.last_activity + ABORT_STALL <= self.now
                        || abort.since + ABORT_LIMIT <= self.now
                    {
                        self.close(i, Ending::Aborted);
                        continue;
                    }
                    // Look again (and arm the next check).
                    abort.check = None;
                    self.relay(i);
                }
            }
        }
    }

    fn set_deadline(&mut self, timer: Timer) {
        let conns = &self.conns;
        self.timers
            .push(timer, self.live, |t| deadline_applies(conns, t));
    }

    /// Gives back the place on the channel the connection holds, if any.
    fn release(&mut self, i: usize) {
        if let Some(Some(conn)) = self.conns.get_mut(i) {
            if let Some((g, c)) = conn.slot.take() {
                self.table.release(self.row, g as usize, c as usize);
            }
        }
    }

    /// The serial of the connection in entry `i`, if any.
    pub(super) fn serial_of(&self, i: usize) -> Option<u64> {
        self.conns.get(i)?.as_ref().map(|c| c.serial)
    }

    /// Closes both sockets, gives the place back and logs what `-d`/`--log-connections` ask.
    fn close(&mut self, i: usize, ending: Ending) {
        let Some(conn) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        if let Some(abort) = &conn.abort {
            // The failure is passed on: the survivor's close sends a reset.
            match (abort.backend, &conn.backend) {
                (true, _) => relay::reset_on_close(&conn.client),
                (false, Some(backend)) => relay::reset_on_close(backend),
                (false, None) => {}
            }
        } else if matches!(ending, Ending::HalfCloseTimeout) {
            // Cut short, not finished: a reset says so to both (a FIN would make what
            // the silent side never sent look like a complete answer).
            relay::reset_on_close(&conn.client);
            if let Some(backend) = &conn.backend {
                relay::reset_on_close(backend);
            }
        }
        if let Some((g, c)) = conn.slot {
            self.table.release(self.row, g as usize, c as usize);
        }
        self.live -= 1;
        self.free.closed(i);
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
            Ending::HalfCloseTimeout => format!(
                "half-closed and idle for {} seconds",
                self.config.half_close_timeout_secs.unwrap_or(0)
            ),
            Ending::Error(e) => format!("ended: {e}"),
            Ending::Aborted => match &conn.abort {
                Some(abort) => {
                    let side = if abort.backend { "backend" } else { "client" };
                    format!("ended: {side}: {}", abort.error)
                }
                None => "ended".to_string(),
            },
        };
        let peer = conn.peer;
        self.debug(format_args!("connection from {peer} {how}"));
        if !self.config.log_connections {
            return;
        }
        let (Some((g, c)), Phase::Relaying(Some(logged))) = (conn.slot, &conn.phase) else {
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
}

/// Whether a deadline still applies: its connection is open and in the phase the deadline
/// was set for (for a connect deadline, the same attempt).
fn deadline_applies(conns: &[Option<Conn>], t: &Timer) -> bool {
    let Some(Some(conn)) = conns.get(t.entry as usize) else {
        return false;
    };
    conn.serial == t.serial
        && match (&conn.phase, t.kind) {
            (Phase::Connecting(c), TimerKind::Connect) => c.deadline == Some(t.when),
            (Phase::Relaying(_), TimerKind::Idle) => true,
            // Once a side has failed, the abort's own deadlines apply.
            (Phase::Relaying(_), TimerKind::HalfClosed) => conn.abort.is_none(),
            (Phase::Relaying(_), TimerKind::Stall) => {
                conn.abort.as_ref().is_some_and(|a| a.check == Some(t.when))
            }
            _ => false,
        }
}

/// Starts a non-blocking connect; the result comes as an event.
///
/// With a source address (`-B`) of the channel's family, the socket is bound to it first,
/// with `IP_BIND_ADDRESS_NO_PORT`: the source port is then chosen at connect time for this
/// destination, so the source address does not cap the connections to all channels
/// together at one range of ports. A source that cannot be bound (not an address of this
/// host, say: a floating address not here yet) is left out, as the original did, and the
/// error returned next to the stream so that the caller can say so.
fn start_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<(TcpStream, Option<Errno>)> {
    use nix::sys::socket::{socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    // An IPv4-mapped channel (::ffff:a.b.c.d) is the IPv4 address it maps, as the source
    // is (made canonical at start-up): the source then goes with it, and is never bound to
    // a socket for a real IPv6 channel, whose every connect it would fail.
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
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
    let mut unbound = None;
    if let Some(src) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) {
        let _ = nix::sys::socket::setsockopt(&fd, sockopt::IpBindAddressNoPort, &true);
        let to = SockaddrStorage::from(SocketAddr::new(src, 0));
        unbound = nix::sys::socket::bind(fd.as_raw_fd(), &to).err();
    }
    match nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((TcpStream::from_std(std::net::TcpStream::from(fd)), unbound))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle connection costs in the worker, besides its two sockets in the kernel
    /// and one deadline (README: "about 200 bytes"; the bench measures the whole process).
    #[test]
    fn an_idle_connection_is_a_small_plain_struct() {
        assert!(
            std::mem::size_of::<Option<Conn>>() <= 256,
            "a connection entry grew to {} bytes",
            std::mem::size_of::<Option<Conn>>()
        );
        assert!(std::mem::size_of::<Timer>() <= 32);
    }
}
