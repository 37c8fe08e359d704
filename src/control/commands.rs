//! The shell's commands: parsing one line into a [`Command`], and running it on the table.

use std::net::SocketAddr;
use std::num::IntErrorKind;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{access, format, AuditEvent, Failure, Reply, Session};
use crate::cli::{self, Services};
use crate::futex::LockError;
use crate::table::{
    ChannelConfig, GroupKind, Snapshot, TableError, Writer, MAX_CHANNELS, MAX_GROUPS,
};

/// How long `kill` waits for the master to let go of the table. The supervisor notices the
/// flag within 200 ms, kills its workers and waits up to 5 s for them to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(8);
const KILL_POLL: Duration = Duration::from_millis(50);
/// How long a change waits for room in the audit ring: the supervisor reads it every
/// 200 ms, so only a supervisor that is stopped or stuck makes a shell wait this long.
pub(super) const AUDIT_WAIT: Duration = Duration::from_secs(5);
const AUDIT_POLL: Duration = Duration::from_millis(10);
/// How long a shell waits for a consistent read of the configuration.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);
const SNAPSHOT_POLL: Duration = Duration::from_millis(1);

/// Command names in the original's matching order: a typed word selects the first name it
/// is a prefix of, so `k` is kill and `r` is reset, as users of the original expect.
const NAMES: [&str; 18] = [
    "quit",
    "show",
    "help",
    "?",
    "kill",
    "disable",
    "group",
    "reset",
    "enable",
    "create",
    "assign",
    "maxc",
    "mrtg-bytes",
    "mrtg-conns",
    "version",
    "hash",
    "rr",
    // Ours, last, so that no abbreviation of the original's commands changes meaning.
    "stats",
];

/// One parsed command line. Channel and group numbers stay as typed (signed) until they are
/// checked against the table, so messages can quote them (`no such channel -1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    Show {
        json: bool,
    },
    Help,
    Kill,
    Disable(i64),
    Group(usize),
    Reset(i64),
    Enable(i64),
    Create {
        host: String,
        port: Option<String>,
    },
    Assign {
        channel: i64,
        host: String,
        port: Option<String>,
    },
    Maxc {
        channel: i64,
        maxc: i32,
    },
    MrtgBytes {
        group: i64,
        channel: i64,
    },
    MrtgConns {
        group: i64,
        channel: i64,
    },
    Version,
    Hash,
    RoundRobin,
    Stats {
        json: bool,
    },
}

/// Why a line is not a command; the text is what the original printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Syntax,
    OutOfRange,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::Syntax => "syntax error",
            ParseError::OutOfRange => "value out of range",
        })
    }
}

impl Command {
    /// Parses one line; `Ok(None)` for a blank line.
    ///
    /// Deviations from the original, on purpose: numbers must be numbers (the original's
    /// `atoi` made `disable x` mean channel 0 and `group 256` mean group 0), and words left
    /// over after a command's arguments are a syntax error rather than ignored, so a typo
    /// like `disable 1 2` cannot silently do half of what was meant.
    pub fn parse(line: &str) -> Result<Option<Command>, ParseError> {
        let mut words = line.split_whitespace();
        let Some(word) = words.next() else {
            return Ok(None);
        };
        let name = NAMES
            .iter()
            .find(|n| n.starts_with(word))
            .ok_or(ParseError::Syntax)?;
        let args: Vec<&str> = words.collect();
        let cmd = match (*name, args.as_slice()) {
            ("quit", []) => Command::Quit,
            ("show", []) => Command::Show { json: false },
            ("show", ["json"]) => Command::Show { json: true },
            ("stats", []) => Command::Stats { json: false },
            ("stats", ["json"]) => Command::Stats { json: true },
            ("help" | "?", []) => Command::Help,
            ("kill", []) => Command::Kill,
            ("disable", [n]) => Command::Disable(number(n)?),
            ("enable", [n]) => Command::Enable(number(n)?),
            ("reset", [n]) => Command::Reset(number(n)?),
            ("group", [g]) => Command::Group(
                usize::try_from(number(g)?)
                    .ok()
                    .filter(|&g| g < MAX_GROUPS)
                    .ok_or(ParseError::OutOfRange)?,
            ),
            ("create", [host]) if split_host_port(host).1.is_some() => Command::Create {
                host: host.to_string(),
                port: None,
            },
            ("create", [host, port]) => Command::Create {
                host: host.to_string(),
                port: Some(port.to_string()),
            },
            ("assign", [n, host]) if split_host_port(host).1.is_some() => Command::Assign {
                channel: number(n)?,
                host: host.to_string(),
                port: None,
            },
            ("assign", [n, host, port]) => Command::Assign {
                channel: number(n)?,
                host: host.to_string(),
                port: Some(port.to_string()),
            },
            ("maxc", [n, m]) => Command::Maxc {
                channel: number(n)?,
                maxc: i32::try_from(number(m)?).map_err(|_| ParseError::OutOfRange)?,
            },
            ("mrtg-bytes", [g, c]) => Command::MrtgBytes {
                group: number(g)?,
                channel: number(c)?,
            },
            ("mrtg-conns", [g, c]) => Command::MrtgConns {
                group: number(g)?,
                channel: number(c)?,
            },
            ("version", []) => Command::Version,
            ("hash", []) => Command::Hash,
            ("rr", []) => Command::RoundRobin,
            _ => return Err(ParseError::Syntax),
        };
        Ok(Some(cmd))
    }

    /// The full command name, for messages and the audit trail.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Quit => "quit",
            Command::Show { .. } => "show",
            Command::Help => "help",
            Command::Kill => "kill",
            Command::Disable(_) => "disable",
            Command::Group(_) => "group",
            Command::Reset(_) => "reset",
            Command::Enable(_) => "enable",
            Command::Create { .. } => "create",
            Command::Assign { .. } => "assign",
            Command::Maxc { .. } => "maxc",
            Command::MrtgBytes { .. } => "mrtg-bytes",
            Command::MrtgConns { .. } => "mrtg-conns",
            Command::Version => "version",
            Command::Hash => "hash",
            Command::RoundRobin => "rr",
            Command::Stats { .. } => "stats",
        }
    }

    /// Whether the command writes the table (and so needs a read-write open).
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Command::Kill
                | Command::Disable(_)
                | Command::Reset(_)
                | Command::Enable(_)
                | Command::Create { .. }
                | Command::Assign { .. }
                | Command::Maxc { .. }
                | Command::Hash
                | Command::RoundRobin
        )
    }
}

/// A signed decimal number; anything else is a syntax error, too large a value out of range.
fn number(text: &str) -> Result<i64, ParseError> {
    text.parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => ParseError::OutOfRange,
            _ => ParseError::Syntax,
        })
}

/// Splits `host:port` and `[v6]:port`; a bare IPv6 literal (several colons) has no port.
fn split_host_port(text: &str) -> (&str, Option<&str>) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => (text, None),
            };
        }
    }
    match text.split_once(':') {
        Some((host, port)) if !port.contains(':') => (host, Some(port)),
        _ => (text, None),
    }
}

/// Resolves `create`/`assign` arguments; a port inside HOST wins over PORT, as in the
/// original. The first address found is used, as at start-up. The error is the shell's
/// answer: `invalid port` (the original stored port 0 for `abc`), or `invalid address`.
pub fn resolve(
    host: &str,
    port: Option<&str>,
    services: &Services,
) -> Result<SocketAddr, &'static str> {
    let (host, inline_port) = split_host_port(host);
    let port = inline_port
        .or(port)
        .and_then(|p| cli::parse_port(p, services))
        .ok_or("invalid port")?;
    if host.is_empty() {
        return Err("invalid address");
    }
    crate::supervisor::lookup_host(host, port).ok_or("invalid address")
}

/// What a change's closure decided under the lock ([`Session::change`]).
pub(super) enum Step<R> {
    /// The answer: the change made and on record, or nothing changed (a refusal, or
    /// nothing to do).
    Done(R),
    /// A change to make, left unmade: the audit ring has no room for its record yet.
    Wait,
}

fn rejected(text: impl Into<String>) -> Failure {
    Failure::Rejected(text.into())
}

impl Session<'_> {
    /// Runs one parsed command against the table.
    pub(super) fn execute(&mut self, cmd: &Command) -> Result<Reply, Failure> {
        if cmd.is_mutating() && !self.table.is_writable() {
            return Err(Failure::ReadOnly(cmd.name()));
        }
        let g = self.group;
        match *cmd {
            Command::Quit => Ok(Reply::quit(String::new())),
            Command::Help => Ok(Reply::text(format::HELP)),
            Command::Version => Ok(Reply::text(format::version())),
            Command::Stats { json } => {
                let snap = self.snapshot()?;
                Ok(Reply::text(if json || self.json {
                    format::stats_json(self.table, &snap)
                } else {
                    format::stats(self.table, &snap)
                }))
            }
            Command::Show { json } => {
                let snap = self.snapshot()?;
                Ok(Reply::text(if json || self.json {
                    format::show_json(self.table, &snap)
                } else {
                    format::show(self.table, &snap)
                }))
            }
            Command::Group(group) => {
                self.group = group;
                Ok(Reply::text(""))
            }
            Command::Enable(n) => self.set_enabled(n, true),
            Command::Disable(n) => self.set_enabled(n, false),
            Command::Reset(n) => {
                let event = self
                    .change(|w, room| {
                        let Some((c, _)) = channel_at(w, g, n) else {
                            return Step::Done(None);
                        };
                        if !room {
                            return Step::Wait;
                        }
                        let (t, s, r) = w.reset_counters(g, c).unwrap_or_default();
                        let old = format!("totalc {t} sent {s} rcvd {r}");
                        Step::Done(Some(recorded(w, self.event(cmd, Some(n), old, "0"))))
                    })?
                    .ok_or_else(|| rejected(format!("no such channel {n}")))?;
                Ok(Reply::changed(
                    format!("channel {n} counters reset\n"),
                    event,
                ))
            }
            Command::Maxc { channel, maxc } => {
                let event = self
                    .change(|w, room| {
                        let Some((c, ch)) = channel_at(w, g, channel) else {
                            return Step::Done(None);
                        };
                        if !room {
                            return Step::Wait;
                        }
                        w.set_maxc(g, c, maxc);
                        let event =
                            self.event(cmd, Some(channel), ch.maxc.to_string(), maxc.to_string());
                        Step::Done(Some(recorded(w, event)))
                    })?
                    .ok_or_else(|| rejected("unknown channel"))?;
                Ok(Reply::changed(
                    format!("maxc of channel {channel} changed to {maxc}\n"),
                    event,
                ))
            }
            Command::Hash => self.set_kind(cmd, GroupKind::Hash),
            Command::RoundRobin => self.set_kind(cmd, GroupKind::RoundRobin),
            Command::Create { ref host, ref port } => self.create(cmd, host, port.as_deref()),
            Command::Assign {
                channel,
                ref host,
                ref port,
            } => self.assign(cmd, channel, host, port.as_deref()),
            Command::MrtgBytes { group, channel } => {
                let (g, c) = self.mrtg_target(group, channel)?;
                Ok(Reply::text(format::mrtg_bytes(self.table, g, c)))
            }
            Command::MrtgConns { group, channel } => {
                let (g, c) = self.mrtg_target(group, channel)?;
                Ok(Reply::text(format::mrtg_conns(self.table, g, c)))
            }
            Command::Kill => self.kill(cmd),
        }
    }

    /// A consistent read of the configuration. A writer killed mid-update leaves the seqlock
    /// odd until the next writer repairs it; with write access, an empty update does that
    /// repair here (and reports a live holder as [`Failure::Locked`]). Without, the shell
    /// waits up to [`SNAPSHOT_WAIT`] for a moment without a write: writers keep the count
    /// odd for microseconds, and the supervisor repairs a dead one's within 200 ms. (A
    /// read-only `show` against a stream of changes failed at once, after a budget of
    /// spins that lasts microseconds.)
    fn snapshot(&self) -> Result<Snapshot, Failure> {
        if let Some(snap) = self.table.snapshot() {
            return Ok(snap);
        }
        if self.table.is_writable() {
            self.write(|_| ())?;
        }
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        loop {
            if let Some(snap) = self.table.snapshot() {
                return Ok(snap);
            }
            if Instant::now() >= deadline {
                return Err(Failure::Busy);
            }
            std::thread::sleep(SNAPSHOT_POLL);
        }
    }

    /// Runs `f` as the table's writer, turning lock trouble into a [`Failure`]. A change
    /// goes on record in the same update ([`recorded`]): a shell killed right after it
    /// cannot leave it without its record.
    fn write<R>(&self, f: impl FnOnce(&Writer<'_>) -> R) -> Result<R, Failure> {
        // The caller's name (an NSS lookup: perhaps LDAP) is looked up now, not under the
        // lock, where the record is made.
        self.who();
        self.table.update(f).map_err(|e| match e {
            TableError::Lock(LockError::Timeout { holder }) => Failure::Locked { holder },
            other => Failure::Table(other),
        })
    }

    /// [`Self::write`] for a change: refused as [`Failure::NoMaster`] once the instance is
    /// stopping (the supervisor reads the audit ring a last time after it marks it so,
    /// under the lock: a change it would not log is not made). Made only while the audit
    /// ring has room for its record: `f` checks the command first and answers at once
    /// when it changes nothing (a refusal, or a channel in the state asked for); a change
    /// whose record has no room yet it leaves unmade ([`Step::Wait`]), and the shell
    /// waits, without the lock, for the supervisor to read the ring. After [`AUDIT_WAIT`]
    /// the change is refused as [`Failure::AuditFull`] rather than overwrite records
    /// nobody has logged. `f` gets the writer and whether the ring has room.
    pub(super) fn change<R>(
        &self,
        f: impl FnMut(&Writer<'_>, bool) -> Step<R>,
    ) -> Result<R, Failure> {
        self.change_waiting(AUDIT_WAIT, f)
    }

    /// [`Self::change`], waiting at most `wait` for room in the audit ring (none: one try).
    pub(super) fn change_waiting<R>(
        &self,
        wait: Duration,
        mut f: impl FnMut(&Writer<'_>, bool) -> Step<R>,
    ) -> Result<R, Failure> {
        let deadline = Instant::now() + wait;
        // The first try takes the lock even when the ring looks full, to check the command.
        let mut first = true;
        loop {
            // Then a look without the lock first: an empty update per poll would move the
            // generation on, and make every worker and the supervisor read the table anew.
            if first || self.table.audit_room() {
                first = false;
                let step = self.write(|w| {
                    if w.stopping() {
                        return Err(Failure::NoMaster);
                    }
                    // Read once, and handed to `f`: the supervisor moves its read mark
                    // without the lock, so a second look could find room the first did not.
                    let (room, written) = (w.audit_room(), w.audit_written());
                    let step = f(w, room);
                    // A closure that wrote a record without room would overwrite one.
                    debug_assert!(room || w.audit_written() == written);
                    Ok(step)
                })??;
                if let Step::Done(r) = step {
                    return Ok(r);
                }
            }
            // A master that died meanwhile will never read the ring.
            if !access::master_alive(self.file).map_err(|e| Failure::Table(e.into()))? {
                return Err(Failure::NoMaster);
            }
            if Instant::now() >= deadline {
                return Err(Failure::AuditFull);
            }
            std::thread::sleep(AUDIT_POLL);
        }
    }

    /// Who runs this shell, for audit records ([`super::caller`]), looked up once.
    pub(super) fn who(&self) -> &str {
        self.who.get_or_init(super::caller)
    }

    fn event(
        &self,
        cmd: &Command,
        channel: Option<i64>,
        old: impl Into<String>,
        new: impl Into<String>,
    ) -> AuditEvent {
        AuditEvent {
            who: self.who().to_string(),
            command: cmd.name(),
            group: Some(self.group),
            channel: channel.and_then(index),
            old: old.into(),
            new: new.into(),
        }
    }

    /// An event about the whole instance (`kill`), not the group the shell is in.
    fn instance_event(&self, cmd: &Command, old: &str, new: &str) -> AuditEvent {
        AuditEvent {
            group: None,
            ..self.event(cmd, None, old, new)
        }
    }

    fn set_enabled(&self, n: i64, on: bool) -> Result<Reply, Failure> {
        let g = self.group;
        let word = if on { "enabled" } else { "disabled" };
        let cmd = if on {
            Command::Enable(n)
        } else {
            Command::Disable(n)
        };
        let old = if on { "disabled" } else { "enabled" };
        let event = self.event(&cmd, Some(n), old, word);
        let was = self
            .change(|w, room| {
                let Some((c, ch)) = channel_at(w, g, n) else {
                    return Step::Done(None);
                };
                if ch.enabled == on {
                    return Step::Done(Some(on));
                }
                if !room {
                    return Step::Wait;
                }
                w.set_enabled(g, c, on);
                w.append_audit(&event.to_string());
                Step::Done(Some(!on))
            })?
            .ok_or_else(|| rejected(format!("no such channel {n}")))?;
        if was == on {
            return Ok(Reply::text(format!("channel {n} already {word}\n")));
        }
        Ok(Reply::changed(format!("channel {n} {word}\n"), event))
    }

    fn set_kind(&self, cmd: &Command, kind: GroupKind) -> Result<Reply, Failure> {
        let g = self.group;
        let name = |k| match k {
            GroupKind::RoundRobin => "round robin",
            GroupKind::Hash => "hash",
        };
        let event = self
            .change(|w, room| {
                if w.channels(g).is_none() {
                    return Step::Done(None);
                }
                if !room {
                    return Step::Wait;
                }
                let old = w.set_kind(g, kind).unwrap_or(kind);
                Step::Done(Some(recorded(
                    w,
                    self.event(cmd, None, name(old), name(kind)),
                )))
            })?
            .ok_or_else(|| rejected("value out of range"))?;
        Ok(Reply::changed(
            format!("group {g} set to {}\n", name(kind)),
            event,
        ))
    }

    /// Resolves before taking the lock (a name lookup can be slow), so a bad host changes
    /// nothing.
    fn create(&self, cmd: &Command, host: &str, port: Option<&str>) -> Result<Reply, Failure> {
        let addr = resolve(host, port, &self.services).map_err(rejected)?;
        let g = self.group;
        let event = self
            .change(|w, room| {
                if w.channels(g).is_none_or(|n| n >= MAX_CHANNELS) {
                    return Step::Done(None);
                }
                if !room {
                    return Step::Wait;
                }
                let Some(c) = w.create_channel(g, addr) else {
                    return Step::Done(None);
                };
                let mut event = self.event(cmd, None, "-", addr.to_string());
                event.channel = Some(c);
                Step::Done(Some(recorded(w, event)))
            })?
            .ok_or_else(|| rejected("no channel slots available"))?;
        Ok(Reply::changed("channel created\n", event).awaiting(addr.port()))
    }

    /// Checks in the original's order: the channel exists, the address resolves, the channel
    /// is disabled. Nothing is written unless all three hold (the original wrote first).
    fn assign(
        &self,
        cmd: &Command,
        n: i64,
        host: &str,
        port: Option<&str>,
    ) -> Result<Reply, Failure> {
        let g = self.group;
        let exists = |snap: &Snapshot| index(n).is_some_and(|c| c < snap.groups[g].channels.len());
        if !exists(&self.snapshot()?) {
            return Err(rejected("unknown channel"));
        }
        let addr = resolve(host, port, &self.services).map_err(rejected)?;
        let event = self.change(|w, room| {
            let Some((c, ch)) = channel_at(w, g, n) else {
                return Step::Done(Err("unknown channel"));
            };
            if ch.enabled {
                return Step::Done(Err("channel must be disabled to assign new address"));
            }
            if !room {
                return Step::Wait;
            }
            let old = w.assign(g, c, addr).flatten();
            let old = old.map_or_else(|| "-".to_string(), |a| a.to_string());
            let event = self.event(cmd, Some(n), old, addr.to_string());
            Step::Done(Ok(recorded(w, event)))
        })?;
        let event = event.map_err(rejected)?;
        Ok(Reply::changed("channel reassigned\n", event).awaiting(addr.port()))
    }

    /// Checks `mrtg-*` arguments against the named group (the original checked the channel
    /// against the current group, with an off-by-one).
    fn mrtg_target(&self, group: i64, channel: i64) -> Result<(usize, usize), Failure> {
        let g = usize::try_from(group)
            .ok()
            .filter(|&g| g < MAX_GROUPS)
            .ok_or_else(|| rejected("unknown group"))?;
        let snap = self.snapshot()?;
        let c = index(channel)
            .filter(|&c| c < snap.groups[g].channels.len())
            .ok_or_else(|| rejected("unknown channel"))?;
        Ok((g, c))
    }

    /// Asks the supervisor to shut down (a flag it polls; no signal, no pid) and waits until
    /// it has let go of the table. The flag is an atomic in the header, outside the seqlock,
    /// so it is set without the writer lock: a stuck writer cannot prevent a shutdown. The record
    /// goes first (the supervisor logs the ring before it stops); it takes the lock, so a
    /// stuck writer delays the shutdown by the lock's timeout (then the record goes
    /// straight to syslog).
    fn kill(&self, cmd: &Command) -> Result<Reply, Failure> {
        // Stopping already (another kill, or a signal): nothing to ask, nor to record.
        self.record(&self.instance_event(cmd, "running", "shutting down"))?;
        // The request is this shell's pid (never 0), so that withdrawing it below cannot
        // take back another shell's.
        let mine = std::process::id().max(1);
        self.table.header().shutdown.store(mine, Ordering::Release);
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            match access::master_alive(self.file) {
                Ok(false) => break,
                Ok(true) if Instant::now() < deadline => std::thread::sleep(KILL_POLL),
                Ok(true) => {
                    // Withdrawn, so that "failed" holds: a supervisor that was stopped
                    // (SIGSTOP) would otherwise shut down whenever it runs again. One that
                    // has seen the request already goes on regardless.
                    let withdrawn = self
                        .table
                        .header()
                        .shutdown
                        .compare_exchange(mine, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok();
                    if withdrawn {
                        let _ = self.record(&self.instance_event(
                            cmd,
                            "shutting down",
                            "running (no shutdown within the wait: request withdrawn)",
                        ));
                    }
                    return Err(Failure::ShutdownFailed);
                }
                Err(e) => return Err(Failure::Table(TableError::Io(e))),
            }
        }
        Ok(Reply {
            text: "shutdown complete, exiting.\n".to_string(),
            audit: None,
            quit: true,
            port: None,
        })
    }
}

/// A channel number as an index, or None when negative.
fn index(n: i64) -> Option<usize> {
    usize::try_from(n).ok()
}

/// Channel `n` of group `g` as it is under the lock: its index and configuration, or None
/// when the group has no such channel.
fn channel_at(w: &Writer<'_>, g: usize, n: i64) -> Option<(usize, ChannelConfig)> {
    let c = index(n)?;
    Some((c, w.config(g, c)?))
}

/// Puts `event` on record in the table's audit ring, within the update that made the
/// change: the supervisor (owner of the daemon's syslog connection) logs it within 200 ms,
/// so that the record depends neither on this shell reaching syslog nor on it living past
/// the change.
fn recorded(w: &Writer<'_>, event: AuditEvent) -> AuditEvent {
    w.append_audit(&event.to_string());
    event
}
