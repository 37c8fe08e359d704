//! Logging to syslog: the daemon's events (LOG_DAEMON) and the audit trail (LOG_AUTHPRIV).
//!
//! In the daemon only the supervisor talks to syslog; workers send it `Log` messages. The
//! control shell logs its own audit lines. The `syslog` crate does not reconnect by itself:
//! after the syslog daemon restarts, a send on the old connection fails for good. So a failed
//! send drops the connection, opens a new one and tries once more; a message that still
//! cannot be delivered is dropped (logging never blocks the daemon or stops balance).
//!
//! A line that finds the syslog datagram socket's queue full (a burst of connection lines,
//! a syslog daemon busy for a moment) is not lost: it waits in memory, in order, and goes
//! out when the queue has room ([`Logger::flush`], which the supervisor calls soon after a
//! burst and then less and less often while nothing goes); lines waiting outlive a syslog
//! restart. Lines are dropped only once [`BACKLOG_LINES`] wait, and by the control shell
//! after [`SHELL_WAIT_FOR_ROOM`] (it has no later moment to send them). Every drop is
//! counted and the count logged after the next line syslog takes. When no syslog socket
//! exists, balance says so once on stderr and keeps running. Nothing here ever writes to a
//! client connection.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use syslog::{Facility, Formatter3164, LogFormat, LoggerBackend, Severity};

use crate::ipc::Priority;

/// Where a line belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Daemon events: start, stop, workers, channels, connections (LOG_DAEMON).
    Daemon,
    /// Who changed what (LOG_AUTHPRIV).
    Audit,
}

pub struct Logger {
    socket: Option<PathBuf>,
    /// Per channel, indexed by [`Channel`]: daemon, audit.
    lanes: [Lane; 2],
    /// Copy daemon messages to stderr (foreground mode).
    stderr: bool,
    /// Also pass Info/Debug to stderr (`-d`).
    verbose: bool,
    warned_unavailable: bool,
    /// How long a line that finds the queue full may wait for room before `send` returns
    /// (the control shell, which has no loop to flush later); zero in the daemon.
    wait_for_room: Duration,
}

/// One channel's connection and the lines it owes.
#[derive(Default)]
struct Lane {
    conn: Option<LoggerBackend>,
    /// When a connection was last attempted without one.
    retried: Option<Instant>,
    /// Lines that could not be delivered since the last one that was: said on this channel
    /// once syslog takes lines again, so that a gap in each record is visible in that record.
    dropped: u64,
    /// Lines, formatted when they were logged, that found the datagram socket's queue full,
    /// oldest first: sent before any newer line.
    backlog: VecDeque<Waiting>,
}

/// A line waiting for room in syslog's queue.
struct Waiting {
    line: Vec<u8>,
    /// For a warning that lines were lost, how many it reports (they count again if it is
    /// lost too); zero for any other line.
    reports: u64,
}

/// How many lines may wait per channel for room in syslog's queue: a burst of a second or
/// two of connection lines (about 200 KiB of them; a line is never longer than a worker's
/// message, 16 KiB). Past that, a syslog that is not reading costs lines, never more memory.
pub const BACKLOG_LINES: usize = 1024;
/// How long the control shell waits for syslog's queue to take one of its lines.
const SHELL_WAIT_FOR_ROOM: Duration = Duration::from_secs(1);

/// The syslog socket on Linux.
const DEFAULT_SOCKET: &str = "/dev/log";
/// The name the lines carry (`Balance[PID]:`), the original's, which log filters match.
pub const SYSLOG_IDENT: &str = "Balance";

/// How often to try to open a missing syslog connection.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

impl Logger {
    /// A logger for this process; connects at once (before a privilege drop, where that
    /// matters) and reconnects whenever a send fails.
    pub fn new(socket: Option<PathBuf>, stderr: bool, verbose: bool) -> Logger {
        let mut logger = Logger {
            socket,
            lanes: Default::default(),
            stderr,
            verbose,
            warned_unavailable: false,
            wait_for_room: Duration::ZERO,
        };
        for channel in [Channel::Daemon, Channel::Audit] {
            logger.lanes[channel as usize].conn = logger.connect();
        }
        logger
    }

    /// The control shell's audit logger: it never complains on stderr about a missing
    /// syslog (scripts read the shell's output), and connects only when it has something
    /// to say.
    pub fn for_shell(socket: Option<PathBuf>) -> Logger {
        Logger {
            socket,
            lanes: Default::default(),
            stderr: false,
            verbose: false,
            warned_unavailable: true,
            wait_for_room: SHELL_WAIT_FOR_ROOM,
        }
    }

    /// Stops copying to stderr (once the daemon has detached from the terminal).
    pub fn detach(&mut self) {
        self.stderr = false;
    }

    /// Drops the connections; the next message opens new ones (reload), without waiting
    /// for the retry interval.
    pub fn reconnect(&mut self) {
        for lane in &mut self.lanes {
            lane.conn = None;
            lane.retried = None;
        }
    }

    fn connect(&mut self) -> Option<LoggerBackend> {
        let path = self
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        match connect_without_waiting(&path) {
            Ok(backend) => Some(backend),
            Err(e) => {
                if !self.warned_unavailable {
                    self.warned_unavailable = true;
                    crate::say!(
                        "balance: cannot reach syslog at {} ({e}); not logging to syslog",
                        path.display()
                    );
                }
                None
            }
        }
    }

    /// A daemon event.
    pub fn log(&mut self, priority: Priority, text: &str) {
        let text = &*printable(text);
        let show = match priority {
            Priority::Info | Priority::Debug => self.verbose,
            _ => true,
        };
        if self.stderr && show {
            stderr_line(format_args!("{text}"));
        }
        self.send(Channel::Daemon, priority, text);
    }

    /// An audit line (LOG_AUTHPRIV).
    pub fn audit(&mut self, priority: Priority, text: &str) {
        let text = &*printable(text);
        if self.stderr && self.verbose {
            stderr_line(format_args!("audit: {text}"));
        }
        self.send(Channel::Audit, priority, text);
    }

    /// Sends one line: after the lines waiting for room, on an existing connection, or a
    /// new one when there is none (at most one attempt a second) or the existing one just
    /// failed (syslogd restarted). A line that finds the queue full waits its turn.
    fn send(&mut self, channel: Channel, priority: Priority, text: &str) {
        let line = format_line(channel, priority, text);
        self.flush_channel(channel);
        // A warning of lines lost follows the next line taken, so it needs room for both.
        let gap = self.lane(channel).dropped;
        let room = if gap > 0 { 2 } else { 1 };
        if !self.accept(channel, line, 0, room) {
            self.lane(channel).dropped += 1;
        } else if gap > 0 {
            let text =
                format!("{gap} log line(s) could not be delivered to syslog before this one");
            let warning = format_line(channel, Priority::Warning, &text);
            if self.accept(channel, warning, gap, 1) {
                self.lane(channel).dropped = 0;
            }
        }
        if !self.wait_for_room.is_zero() {
            self.drain_for(self.wait_for_room);
            // The shell has no later moment to send them: what syslog did not take within
            // the wait is lost, and counted in the shell's next line, if it has one.
            for lane in &mut self.lanes {
                lane.dropped += lane.backlog.drain(..).map(|w| w.counts()).sum::<u64>();
            }
        }
    }

    /// Sends a line, or queues it behind those waiting for room when there is room for
    /// `room` lines; whether it was taken. A line `reports` lost ones when it says so.
    fn accept(&mut self, channel: Channel, line: Vec<u8>, reports: u64, room: usize) -> bool {
        let waiting = &mut self.lane(channel).backlog;
        if !waiting.is_empty() {
            if waiting.len() + room > BACKLOG_LINES {
                return false;
            }
            waiting.push_back(Waiting { line, reports });
            return true;
        }
        match self.deliver(channel, &line) {
            Delivery::Sent => true,
            Delivery::Full => {
                self.lane(channel)
                    .backlog
                    .push_back(Waiting { line, reports });
                true
            }
            Delivery::Failed => false,
        }
    }

    /// Whether lines wait for room in syslog's queue.
    pub fn pending(&self) -> bool {
        self.lanes.iter().any(|lane| !lane.backlog.is_empty())
    }

    /// Sends what waits for room, oldest first, until the queue is full again; how many
    /// lines went out. The daemon calls it whenever [`Logger::pending`], backing off while
    /// nothing goes.
    pub fn flush(&mut self) -> usize {
        self.flush_channel(Channel::Daemon) + self.flush_channel(Channel::Audit)
    }

    fn flush_channel(&mut self, channel: Channel) -> usize {
        let mut sent = 0;
        while let Some(waiting) = self.lane(channel).backlog.pop_front() {
            match self.deliver(channel, &waiting.line) {
                Delivery::Sent => sent += 1,
                // Full, or syslog went away (restarting, say): the lines keep waiting for
                // it, and the connection is tried again at most once a second.
                Delivery::Full | Delivery::Failed => {
                    self.lane(channel).backlog.push_front(waiting);
                    break;
                }
            }
        }
        sent
    }

    /// Waits up to `limit` for what waits for room to go out (the control shell after a
    /// line, the daemon as it stops); what is left stays queued.
    pub fn drain_for(&mut self, limit: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + limit;
        loop {
            self.flush();
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.pending() || left.is_zero() {
                return;
            }
            // Room is waited for on the first channel with lines waiting (a few ms at a
            // time, so that the other is not forgotten).
            let Some(conn) = self
                .lanes
                .iter()
                .filter(|lane| !lane.backlog.is_empty())
                .find_map(|lane| match &lane.conn {
                    Some(LoggerBackend::Unix(socket)) => Some(socket),
                    _ => None,
                })
            else {
                return;
            };
            let wait = left.min(Duration::from_millis(20));
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO);
            let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut fds, timeout);
        }
    }

    /// One line, on this channel's connection (opened or reopened as needed).
    fn deliver(&mut self, channel: Channel, line: &[u8]) -> Delivery {
        for attempt in 0..2 {
            if attempt > 0 || self.lane(channel).conn.is_none() {
                if attempt == 0 && !self.may_retry(channel) {
                    return Delivery::Failed;
                }
                let conn = self.connect();
                let lane = self.lane(channel);
                if conn.is_some() {
                    // The interval spaces out failed attempts only.
                    lane.retried = None;
                }
                lane.conn = conn;
            }
            let Some(conn) = self.lane(channel).conn.as_mut() else {
                return Delivery::Failed;
            };
            match send_line(conn, line) {
                Ok(()) => return Delivery::Sent,
                // The datagram socket's queue is full: the daemon is alive, only behind.
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && matches!(conn, LoggerBackend::Unix(_)) =>
                {
                    return Delivery::Full;
                }
                Err(_) => {}
            }
        }
        Delivery::Failed
    }

    fn lane(&mut self, channel: Channel) -> &mut Lane {
        &mut self.lanes[channel as usize]
    }

    /// Without a connection, tries to open one at most once a second.
    fn may_retry(&mut self, channel: Channel) -> bool {
        let now = Instant::now();
        let last = &mut self.lane(channel).retried;
        if last.is_some_and(|t| now.duration_since(t) < RETRY_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

impl Waiting {
    /// How many lines are lost with this one.
    fn counts(&self) -> u64 {
        self.reports.max(1)
    }
}

/// Sends one formatted line as the `syslog` crate does (a datagram; or the line and a NUL
/// on a stream), but the whole line or an error, never part of it.
fn send_line(conn: &mut LoggerBackend, line: &[u8]) -> std::io::Result<()> {
    match conn {
        LoggerBackend::UnixStream(stream) => {
            stream.write_all(line)?;
            stream.write_all(&[0])?;
            stream.flush()
        }
        other => other.write(line).map(|_| ()),
    }
}

/// What became of a line sent.
enum Delivery {
    Sent,
    /// The datagram socket's queue is full; the line may go later.
    Full,
    /// No connection could take it.
    Failed,
}

/// A syslog line as the `syslog` crate formats it (RFC 3164, without hostname, as the
/// libc's `syslog` sends it to the local socket), stamped now.
fn format_line(channel: Channel, priority: Priority, text: &str) -> Vec<u8> {
    let formatter = Formatter3164 {
        facility: match channel {
            Channel::Daemon => Facility::LOG_DAEMON,
            Channel::Audit => Facility::LOG_AUTHPRIV,
        },
        hostname: None,
        process: SYSLOG_IDENT.into(),
        pid: std::process::id(),
    };
    let severity = match priority {
        Priority::Critical => Severity::LOG_CRIT,
        Priority::Error => Severity::LOG_ERR,
        Priority::Warning => Severity::LOG_WARNING,
        Priority::Notice => Severity::LOG_NOTICE,
        Priority::Info => Severity::LOG_INFO,
        Priority::Debug => Severity::LOG_DEBUG,
    };
    let mut line = Vec::with_capacity(text.len() + 40);
    let _ = formatter.format(&mut line, severity, text);
    line
}

/// Connects to the syslog socket at `path` as the `syslog` crate would (datagram, else
/// stream), but never waits: a syslog daemon that stops reading must not stop balance. A
/// stream socket whose daemon stopped accepting has a full backlog, where a blocking
/// connect would hold the supervisor (and with it every signal and worker restart); such a
/// connect fails at once instead, like a missing socket. Sends never wait either: a
/// datagram socket is non-blocking (a line that finds its queue full waits in the
/// backlog), a stream one gives up after [`STREAM_SEND_TIMEOUT`] (non-blocking, it could
/// leave half a line behind).
fn connect_without_waiting(path: &std::path::Path) -> std::io::Result<LoggerBackend> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let datagram = std::os::unix::net::UnixDatagram::unbound()?;
    datagram.set_nonblocking(true)?;
    match datagram.connect(path) {
        Ok(()) => return Ok(LoggerBackend::Unix(datagram)),
        Err(e) if e.raw_os_error() == Some(nix::libc::EPROTOTYPE) => {}
        Err(e) => return Err(e),
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    // A Unix stream connect completes at once or fails (EAGAIN: the backlog is full).
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(STREAM_SEND_TIMEOUT))?;
    Ok(LoggerBackend::UnixStream(std::io::BufWriter::new(stream)))
}

/// How long a send to a stream syslog socket may wait.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// The text with control characters escaped (`\n` as the two characters `\` `n`): a
/// line of the log stays one line, whatever a path, a host name or a worker's message
/// holds, so no one can forge a second line in it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().collect(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// Writes one line to stderr with a single `write`, so that lines of the supervisor and of
/// the workers (which share the descriptor) never interleave mid-line (`eprintln!` writes
/// piece by piece).
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    let line = format!("{args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reloads come in quick succession (a configuration tool, a second SIGHUP): each one
    /// reconnects, and no line is lost to the interval meant for a syslog that is down.
    #[test]
    fn lines_after_quick_reloads_are_delivered() {
        let (dir, rx, mut logger) = receiver("reloads");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        for text in ["first", "second", "third", "fourth"] {
            logger.log(Priority::Notice, text);
            logger.reconnect();
        }
        logger.audit(Priority::Notice, "audited");
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..5 {
            let n = rx.recv(&mut buf).expect("a line");
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        for (line, text) in got
            .iter()
            .zip(["first", "second", "third", "fourth", "audited"])
        {
            assert!(line.ends_with(text), "{line:?} for {text}");
            assert!(line.contains(&format!("{SYSLOG_IDENT}[")), "{line}");
        }
        // A line cannot carry a second, forged one.
        logger.audit(
            Priority::Warning,
            "refused x\n<85>Balance[1]: uid 0 (root): kill",
        );
        let n = rx.recv(&mut buf).expect("a line");
        let line = String::from_utf8_lossy(&buf[..n]);
        assert!(
            line.ends_with("refused x\\n<85>Balance[1]: uid 0 (root): kill"),
            "{line:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A socket bound in a directory of its own, and a logger sending to it.
    fn receiver(name: &str) -> (PathBuf, std::os::unix::net::UnixDatagram, Logger) {
        let dir = std::env::temp_dir().join(format!("balance-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let logger = Logger::new(Some(path), false, false);
        (dir, rx, logger)
    }

    /// Reads everything the logger sends while it drains what waits, and what is left in
    /// the socket's queue once it has.
    fn read_while_draining(
        rx: std::os::unix::net::UnixDatagram,
        logger: &mut Logger,
    ) -> Vec<String> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let drained = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::clone(&drained);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Bounded: 100,000 lines or a 200 ms silence after the logger is done.
            for _ in 0..100_000 {
                let finished = done.load(Ordering::Acquire);
                match rx.recv(&mut buf) {
                    Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).to_string()),
                    Err(_) if finished => break,
                    Err(_) => {}
                }
            }
            got
        });
        logger.drain_for(Duration::from_secs(10));
        drained.store(true, Ordering::Release);
        let got = reader.join().expect("reader");
        assert!(!logger.pending(), "lines still wait after 10 s");
        got
    }

    /// More lines at once than the socket's queue holds (net.unix.max_dgram_qlen, 10 by
    /// default) all arrive, in order, once the reader reads. (They were dropped.)
    #[test]
    fn a_burst_bigger_than_the_socket_queue_arrives_whole_and_in_order() {
        let (dir, rx, mut logger) = receiver("burst");
        let burst = BACKLOG_LINES / 2;
        for i in 0..burst {
            logger.log(Priority::Info, &format!("line {i}"));
        }
        let got = read_while_draining(rx, &mut logger);
        let texts: Vec<&str> = got
            .iter()
            .map(|l| l.rsplit_once("]: ").map_or("", |(_, t)| t))
            .collect();
        let want: Vec<String> = (0..burst).map(|i| format!("line {i}")).collect();
        assert_eq!(texts, want);
        // Each line was stamped and prioritised when it was logged, as the crate does.
        assert!(got[0].starts_with("<30>"), "{}", got[0]);
        assert!(got[0].contains(&format!("{SYSLOG_IDENT}[")), "{}", got[0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Past the lines that may wait, a syslog that does not read costs lines, never memory:
    /// they are counted, and the count is logged after the next line syslog takes. A line
    /// that would leave no room for that warning is counted too. (The count was lost when
    /// the backlog was full as syslog took lines again.)
    #[test]
    fn lines_past_the_backlog_are_counted_and_the_count_logged() {
        let (dir, rx, mut logger) = receiver("overflow");
        let logged = 3 * BACKLOG_LINES;
        for i in 0..logged {
            logger.log(Priority::Info, &format!("line {i}"));
        }
        assert_eq!(logger.lanes[0].backlog.len(), BACKLOG_LINES);
        // Syslog takes one line: one waiting line goes, and the next line logged meets
        // a backlog with room for itself but not for the warning after it.
        let mut buf = [0u8; 1024];
        let n = rx.recv(&mut buf).expect("a line");
        let mut got = vec![String::from_utf8_lossy(&buf[..n]).to_string()];
        logger.log(Priority::Info, "no room for its warning");
        got.extend(read_while_draining(
            rx.try_clone().expect("clone"),
            &mut logger,
        ));
        let delivered = got.len();
        assert!(delivered < logged, "the socket took all {logged}");
        logger.log(Priority::Info, "after");
        for _ in 0..2 {
            let n = rx.recv(&mut buf).expect("a line");
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert!(got[delivered].ends_with("]: after"), "{}", got[delivered]);
        let gap = &got[delivered + 1];
        assert!(gap.starts_with("<28>"), "a warning: {gap}");
        assert!(
            gap.ends_with(&format!(
                "]: {} log line(s) could not be delivered to syslog before this one",
                logged + 1 - delivered
            )),
            "{delivered} of {} delivered: {gap}",
            logged + 1
        );
        // What arrived is the oldest lines, in order: those the queue took, then those
        // that waited.
        for (i, line) in got[..delivered].iter().enumerate() {
            assert!(line.ends_with(&format!("]: line {i}")), "{i}: {line}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lines waiting for room outlive a syslog restart: they go to the new socket, in order,
    /// with those logged while it was away. (They were dropped.)
    #[test]
    fn lines_waiting_outlive_a_syslog_restart() {
        let (dir, rx, mut logger) = receiver("restart");
        let path = dir.join("log");
        let burst = BACKLOG_LINES / 2;
        for i in 0..burst {
            logger.log(Priority::Info, &format!("line {i}"));
        }
        assert!(logger.pending(), "the socket took {burst} lines at once");
        // The daemon stops (with what it had not read) and starts again on the same path.
        drop(rx);
        std::fs::remove_file(&path).expect("remove socket");
        assert_eq!(logger.flush(), 0, "sent to a stopped syslog");
        logger.log(Priority::Info, "while away");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind again");
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // A lost connection is tried again once a second.
        std::thread::sleep(RETRY_INTERVAL + Duration::from_millis(100));
        let got = read_while_draining(rx, &mut logger);
        let last = got.last().map_or("", String::as_str);
        assert!(last.ends_with("]: while away"), "{last}");
        assert_eq!(
            logger.lanes[0].dropped, 0,
            "lines counted as lost: {}",
            logger.lanes[0].dropped
        );
        // The first lines went to the old socket; every one that waited came after them.
        let first = got[0]
            .rsplit_once("]: line ")
            .and_then(|(_, i)| i.parse::<usize>().ok())
            .expect("a numbered line first");
        assert_eq!(got.len(), burst - first + 1);
        for (line, i) in got.iter().zip(first..burst) {
            assert!(line.ends_with(&format!("]: line {i}")), "{i}: {line}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
