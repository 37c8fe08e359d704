//! Logging to syslog: the daemon's events (LOG_DAEMON) and the audit trail (LOG_AUTHPRIV).
//!
//! In the daemon only the supervisor talks to syslog; workers send it `Log` messages. The
//! control shell logs its own audit lines. The `syslog` crate does not reconnect by itself:
//! after the syslog daemon restarts, a send on the old connection fails for good. So a failed
//! send drops the connection, opens a new one and tries once more; a message that still
//! cannot be delivered is dropped (logging never blocks or stops balance). When no syslog
//! socket exists, balance says so once on stderr and keeps running. Nothing here ever writes
//! to a client connection.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use syslog::{Facility, Formatter3164, Logger as SysLogger, LoggerBackend};

use crate::ipc::Priority;

type Conn = SysLogger<LoggerBackend, Formatter3164>;

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
    daemon: Option<Conn>,
    audit: Option<Conn>,
    /// Copy daemon messages to stderr (foreground mode).
    stderr: bool,
    /// Also pass Info/Debug to stderr (`-d`).
    verbose: bool,
    warned_unavailable: bool,
    /// When a connection was last attempted without one (daemon, audit).
    retried: (Option<Instant>, Option<Instant>),
    /// Lines that could not be delivered since the last one that was, per channel (daemon,
    /// audit): said on that channel once syslog takes lines again, so that a gap in each
    /// record is visible in that record.
    dropped: [u64; 2],
}

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
            daemon: None,
            audit: None,
            stderr,
            verbose,
            warned_unavailable: false,
            retried: (None, None),
            dropped: [0; 2],
        };
        logger.daemon = logger.connect(Channel::Daemon);
        logger.audit = logger.connect(Channel::Audit);
        logger
    }

    /// The control shell's audit logger: it never complains on stderr about a missing
    /// syslog (scripts read the shell's output), and connects only when it has something
    /// to say.
    pub fn for_shell(socket: Option<PathBuf>) -> Logger {
        Logger {
            socket,
            daemon: None,
            audit: None,
            stderr: false,
            verbose: false,
            warned_unavailable: true,
            retried: (None, None),
            dropped: [0; 2],
        }
    }

    /// Stops copying to stderr (once the daemon has detached from the terminal).
    pub fn detach(&mut self) {
        self.stderr = false;
    }

    /// Drops the connections; the next message opens new ones (reload), without waiting
    /// for the retry interval.
    pub fn reconnect(&mut self) {
        self.daemon = None;
        self.audit = None;
        self.retried = (None, None);
    }

    fn connect(&mut self, channel: Channel) -> Option<Conn> {
        let formatter = Formatter3164 {
            facility: match channel {
                Channel::Daemon => Facility::LOG_DAEMON,
                Channel::Audit => Facility::LOG_AUTHPRIV,
            },
            hostname: None,
            process: SYSLOG_IDENT.into(),
            pid: std::process::id(),
        };
        let path = self
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        match connect_without_waiting(&path) {
            Ok(backend) => Some(SysLogger::new(backend, formatter)),
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

    /// Sends one line: on an existing connection, or a new one when there is none (at most
    /// one attempt a second) or the existing one just failed (syslogd restarted).
    fn send(&mut self, channel: Channel, priority: Priority, text: &str) {
        let slot = channel as usize;
        if !self.deliver(channel, priority, text) {
            self.dropped[slot] += 1;
        } else if self.dropped[slot] > 0 {
            let gap = format!(
                "{} log line(s) could not be delivered to syslog before this one",
                std::mem::take(&mut self.dropped[slot])
            );
            if !self.deliver(channel, Priority::Warning, &gap) {
                self.dropped[slot] += 1;
            }
        }
    }

    /// One line, on this channel's connection (opened or reopened as needed); whether it
    /// was delivered.
    fn deliver(&mut self, channel: Channel, priority: Priority, text: &str) -> bool {
        for attempt in 0..2 {
            if attempt > 0 || self.slot(channel).is_none() {
                if attempt == 0 && !self.may_retry(channel) {
                    return false;
                }
                let conn = self.connect(channel);
                if conn.is_some() {
                    // The interval spaces out failed attempts only.
                    *self.retry_mark(channel) = None;
                }
                *self.slot(channel) = conn;
            }
            let Some(conn) = self.slot(channel).as_mut() else {
                return false;
            };
            let sent = match priority {
                Priority::Critical => conn.crit(text),
                Priority::Error => conn.err(text),
                Priority::Warning => conn.warning(text),
                Priority::Notice => conn.notice(text),
                Priority::Info => conn.info(text),
                Priority::Debug => conn.debug(text),
            };
            if sent.is_ok() {
                return true;
            }
        }
        false
    }

    fn slot(&mut self, channel: Channel) -> &mut Option<Conn> {
        match channel {
            Channel::Daemon => &mut self.daemon,
            Channel::Audit => &mut self.audit,
        }
    }

    fn retry_mark(&mut self, channel: Channel) -> &mut Option<Instant> {
        match channel {
            Channel::Daemon => &mut self.retried.0,
            Channel::Audit => &mut self.retried.1,
        }
    }

    /// Without a connection, tries to open one at most once a second.
    fn may_retry(&mut self, channel: Channel) -> bool {
        let now = Instant::now();
        let last = self.retry_mark(channel);
        if last.is_some_and(|t| now.duration_since(t) < RETRY_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Connects to the syslog socket at `path` as the `syslog` crate would (datagram, else
/// stream), but never waits: a syslog daemon that stops reading must not stop balance. A
/// stream socket whose daemon stopped accepting has a full backlog, where a blocking
/// connect would hold the supervisor (and with it every signal and worker restart); such a
/// connect fails at once instead, like a missing socket. Sends never wait either: a
/// datagram socket is non-blocking (a full queue drops the line, which is counted), a
/// stream one gives up after [`STREAM_SEND_TIMEOUT`] (non-blocking, it could leave half a
/// line behind).
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
    use std::io::Write;
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
        let dir = std::env::temp_dir().join(format!("balance-log-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("log");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut logger = Logger::new(Some(path), false, false);
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
}
