//! The control shell: `balance -i PORT` (interactive) and `balance -c "CMD" PORT` (one command).
//!
//! A control client starts like the other roles, in one place ([`run`]): find the table file
//! of the instance (`<run-dir>/balance.<port>.<bind>`) → open it, read-write if the file's
//! permissions allow, else read-only ([`access`]) → check a master still holds it → map it →
//! run commands ([`commands`]) and print in the original's formats ([`format`]).
//!
//! Nothing here signals a process: liveness is the supervisor's `flock` on the table, and
//! `kill` is a flag in the table that the supervisor polls. Every change goes through
//! `Table::update` (robust lock, seqlock) and yields an [`AuditEvent`].
//!
//! Exit codes (sysexits). The original exited 0 after any command; `-c` now reports failure:
//! - 0: success, `quit`, end of input, `kill` done;
//! - 65 (`EX_DATAERR`): `syntax error`, `value out of range`, no such channel or group,
//!   `invalid address` or `invalid port`, group full, channel must be disabled; also a table of another
//!   layout version (the original's `release mismatch`);
//! - 69 (`EX_UNAVAILABLE`): no master serves the table; `kill` did not finish;
//! - 70 (`EX_SOFTWARE`): any other error from the table;
//! - 71 (`EX_OSERR`): the table file cannot be opened (permissions, as the original) or is
//!   not one the daemon made (wrong owner, type or mode);
//! - 74 (`EX_IOERR`): stdout or stdin failed (a closed pipe on stdout ends quietly with 0);
//! - 75 (`EX_TEMPFAIL`): the writer lock stayed held for its whole timeout, or the
//!   configuration kept changing under a reader: trying again may work;
//! - 77 (`EX_NOPERM`): a changing command with read-only access.
//!
//! In `-i` mode only "no master" and a failed `kill` end the session; other failures are
//! printed and the prompt comes back.

mod access;
mod commands;
mod format;

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{self, Services, ShellArgs};
use crate::exitcode::{EX_DATAERR, EX_OSERR, EX_SOFTWARE, EX_UNAVAILABLE};
use crate::ipc::Priority;
use crate::log::Logger;
use crate::table::{Table, TableError, Writer, AUDIT_SLOTS};

use access::AccessError;
use commands::Step;
pub use commands::{Command, ParseError};

use crate::exitcode::{EX_IOERR, EX_NOPERM, EX_TEMPFAIL};

/// One change made through the shell: what was changed, by whom, from what to what.
///
/// Every successful changing command returns one; the shell puts it in the table's audit
/// ring, which the supervisor logs (and prints it on stderr with `-d`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who ran the shell (see [`caller`]), looked up when the session started: the user
    /// name lookup (NSS: perhaps LDAP) never runs under the table's lock, where the
    /// record is written.
    pub who: String,
    /// Full command name (`disable`, not `d`).
    pub command: &'static str,
    /// None for a command on the whole instance (`kill`).
    pub group: Option<usize>,
    /// None for commands on the whole group or the instance (`hash`, `kill`).
    pub channel: Option<usize>,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.who, self.command)?;
        if let Some(g) = self.group {
            write!(f, " group {g}")?;
        }
        if let Some(c) = self.channel {
            write!(f, " channel {c}")?;
        }
        write!(f, ": {} -> {}", self.old, self.new)
    }
}

/// What a command that worked produced.
#[derive(Debug)]
pub struct Reply {
    /// For stdout, each line ending in a newline (may be empty).
    pub text: String,
    pub audit: Option<AuditEvent>,
    /// The session ends after this reply (`quit`, `kill`).
    pub quit: bool,
    /// A channel now points at this port: the reply waits until the workers admit it.
    pub port: Option<u16>,
}

impl Reply {
    fn text(text: impl Into<String>) -> Reply {
        Reply {
            text: text.into(),
            audit: None,
            quit: false,
            port: None,
        }
    }

    fn changed(text: impl Into<String>, audit: AuditEvent) -> Reply {
        Reply {
            text: text.into(),
            audit: Some(audit),
            quit: false,
            port: None,
        }
    }

    /// The same reply, waiting until the workers admit `port` (see [`Reply::port`]).
    fn awaiting(self, port: u16) -> Reply {
        Reply {
            port: Some(port),
            ..self
        }
    }

    fn quit(text: String) -> Reply {
        Reply {
            text,
            audit: None,
            quit: true,
            port: None,
        }
    }
}

/// Why a command did not work.
#[derive(Debug)]
pub enum Failure {
    /// Refused with the original's words (`syntax error`, `no such channel 5`, …), on stdout.
    Rejected(String),
    /// A changing command with a read-only table; holds the command's name.
    ReadOnly(&'static str),
    /// The writer lock stayed held by another process (`holder`, a thread id) for the
    /// whole timeout.
    Locked {
        holder: u32,
    },
    /// The configuration kept changing (or a dead writer left it mid-update): no snapshot.
    Busy,
    /// The master is gone.
    NoMaster,
    /// `kill` was sent but the master did not let go of the table in time.
    ShutdownFailed,
    /// The audit ring stayed full of records the supervisor had not read (it is stopped
    /// or stuck): the change was not made.
    AuditFull,
    Table(TableError),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Rejected(_) => EX_DATAERR,
            Failure::ReadOnly(_) => EX_NOPERM,
            Failure::Locked { .. } | Failure::Busy | Failure::AuditFull => EX_TEMPFAIL,
            Failure::NoMaster | Failure::ShutdownFailed => EX_UNAVAILABLE,
            Failure::Table(_) => EX_SOFTWARE,
        }
    }

    /// Whether `-i` stops after this failure.
    fn ends_session(&self) -> bool {
        matches!(self, Failure::NoMaster | Failure::ShutdownFailed)
    }

    /// Prints the failure: the original's messages on stdout, our own on stderr.
    fn report(&self, path: &Path, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<()> {
        match self {
            Failure::Rejected(text) => writeln!(out, "{text}"),
            Failure::NoMaster => writeln!(out, "no master process, exiting."),
            Failure::ShutdownFailed => writeln!(out, "shutdown failed."),
            Failure::ReadOnly(cmd) => writeln!(
                err,
                "balance: read-only access to {}: {cmd} needs write permission (run it as root)",
                path.display()
            ),
            Failure::Locked { holder } => writeln!(
                err,
                "balance: table is locked by another writer (thread {holder}); try again"
            ),
            Failure::Busy => writeln!(
                err,
                "balance: the table kept changing while being read; try again"
            ),
            Failure::AuditFull => writeln!(
                err,
                "balance: change not made: the master has not logged the audit records of \
                 the last {} changes for {} s (is it stopped?); try again",
                AUDIT_SLOTS - 1,
                commands::AUDIT_WAIT.as_secs()
            ),
            Failure::Table(e) => writeln!(err, "balance: {}: {e}", path.display()),
        }
    }
}

impl From<ParseError> for Failure {
    fn from(e: ParseError) -> Self {
        Failure::Rejected(e.to_string())
    }
}

/// Runs the control shell as asked; returns the process's exit code.
pub fn run(args: ShellArgs) -> ExitCode {
    let listen = &args.common.listen;
    let path = args
        .common
        .run_dir
        .join(cli::table_file_name(listen.port, listen.bind.as_deref()));
    let logger = RefCell::new(Logger::for_shell(args.syslog_socket.clone()));
    let attached = match access::attach(&path) {
        Ok(a) => a,
        Err(e) => {
            if matches!(e, AccessError::Denied | AccessError::Unsafe(_)) {
                logger.borrow_mut().audit(
                    Priority::Warning,
                    &format!(
                        "{}: refused access to {} for {}: {}",
                        caller(),
                        path.display(),
                        args.command.as_deref().map_or_else(
                            || "the interactive shell".to_string(),
                            |c| format!("'{c}'")
                        ),
                        match &e {
                            AccessError::Unsafe(why) => why.to_string(),
                            _ => "permission denied".to_string(),
                        }
                    ),
                );
            }
            let group = table_group(&path).unwrap_or_else(|| args.control_group.clone());
            return ExitCode::from(report_access(&e, &path, &group));
        }
    };
    let mut session = Session {
        table: &attached.table,
        file: &attached.file,
        path: &path,
        group: 0,
        json: args.json,
        debug: args.common.debug,
        services: Services::system(),
        logger,
        who: std::cell::OnceCell::new(),
    };
    let (stdout, stderr) = (io::stdout(), io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let code = match &args.command {
        Some(line) => session.run_one(line, &mut out, &mut err),
        None => session.interactive(&mut io::stdin().lock(), &mut out, &mut err),
    };
    ExitCode::from(code)
}

/// The group of the table file (or, when it cannot be looked at, of its directory): the
/// control group the daemon runs with, which this shell's `--control-group` need not name.
fn table_group(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .or_else(|e| path.parent().map_or(Err(e), std::fs::metadata))
        .ok()?;
    let gid = meta.gid();
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// Prints why the table could not be used; returns the exit code.
fn report_access(e: &AccessError, path: &Path, control_group: &str) -> u8 {
    let path = path.display();
    match e {
        AccessError::NoMaster(None) => {
            // On stdout, as the original had it; lost if stdout cannot take it.
            let _ = writeln!(io::stdout(), "no master process, exiting.");
            EX_UNAVAILABLE
        }
        AccessError::NoMaster(Some(pid)) => {
            let _ = writeln!(io::stdout(), "no master process with pid {pid}, exiting.");
            EX_UNAVAILABLE
        }
        AccessError::Denied => {
            crate::say!("balance: cannot open {path}: Permission denied");
            crate::say!(
                "balance: reading needs membership in group {control_group}, changes need root"
            );
            EX_OSERR
        }
        AccessError::Unsafe(why) => {
            crate::say!("balance: refusing to use {path}: {why}");
            EX_OSERR
        }
        AccessError::Io(e) => {
            crate::say!("balance: cannot open {path}: {e}");
            EX_OSERR
        }
        AccessError::Table(e @ (TableError::Incompatible { .. } | TableError::WrongMagic)) => {
            crate::say!("balance: {path}: {e}; is this the balance that started the daemon?");
            EX_DATAERR
        }
        AccessError::Table(e @ TableError::WrongSize { .. }) => {
            crate::say!("balance: {path}: {e}");
            EX_DATAERR
        }
        AccessError::Table(e) => {
            crate::say!("balance: {path}: {e}");
            EX_SOFTWARE
        }
    }
}

/// How long `create`/`assign` wait for the workers to admit a new channel port: the daemon
/// notices the change within 200 ms and replaces its workers one after the other.
const ADMIT_WAIT: Duration = Duration::from_secs(5);
const ADMIT_POLL: Duration = Duration::from_millis(10);

/// How the wait for a new channel port ended.
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    Yes,
    TimedOut,
    /// The daemon is gone: nothing will ever admit it.
    NoMaster,
}

/// A control session on one mapped table.
struct Session<'a> {
    table: &'a Table,
    /// The open table file, whose lock tells whether the master is still there.
    file: &'a File,
    path: &'a Path,
    /// The current group (`group G`; always 0 with `-c`).
    group: usize,
    /// `--json`: `show` prints JSON.
    json: bool,
    /// `-d`: audit events are printed on stderr.
    debug: bool,
    services: Services,
    /// The audit trail (LOG_AUTHPRIV).
    logger: RefCell<Logger>,
    /// Who runs this shell ([`caller`]), for the records of its changes: looked up before
    /// the first change takes the table's lock (see [`Session::who`]), and only then, so
    /// that a monitoring probe (`show`, `mrtg-*`) makes no user-name lookup.
    who: std::cell::OnceCell<String>,
}

/// Who is running this shell, for the audit trail: real uid, user name, pid.
fn caller() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| "?".to_string(), |u| u.name);
    format!("uid {uid} ({name}) pid {}", std::process::id())
}

impl Session<'_> {
    /// `-c`: runs one line and returns the exit code.
    fn run_one(&mut self, line: &str, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
        let result = self.run_line(line);
        let written = match &result {
            Ok(reply) => self.emit(reply, out, err),
            Err(f) => self.fail(f, out, err),
        };
        match (written, result) {
            (Err(e), _) => write_failure(&e),
            (Ok(()), Ok(_)) => 0,
            (Ok(()), Err(f)) => f.code(),
        }
    }

    /// `-i`: banner, then prompt and run lines until `quit`, end of input or a fatal failure.
    fn interactive(
        &mut self,
        input: &mut dyn BufRead,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> u8 {
        if let Err(e) = write!(out, "{}", format::banner(self.table, self.path)) {
            return write_failure(&e);
        }
        let mut line = Vec::new();
        loop {
            if let Err(e) = write!(out, "{}", format::prompt(self.group)).and_then(|()| out.flush())
            {
                return write_failure(&e);
            }
            let overlong = match read_line_bounded(input, &mut line) {
                Ok((0, _)) => return writeln!(out).map_or_else(|e| write_failure(&e), |()| 0),
                Ok((_, overlong)) => overlong,
                Err(e) => {
                    let _ = writeln!(err, "balance: cannot read input: {e}");
                    return EX_IOERR;
                }
            };
            let result = if overlong {
                Err(Failure::Rejected("syntax error".to_string()))
            } else {
                self.run_line(&String::from_utf8_lossy(&line))
            };
            let written = match &result {
                Ok(reply) => self.emit(reply, out, err),
                Err(f) => self.fail(f, out, err),
            };
            if let Err(e) = written.and_then(|()| out.flush()) {
                return write_failure(&e);
            }
            match result {
                Ok(reply) if reply.quit => return 0,
                Err(f) if f.ends_session() => return f.code(),
                _ => {}
            }
        }
    }

    /// Parses and runs one line, after checking the master is still there.
    fn run_line(&mut self, line: &str) -> Result<Reply, Failure> {
        let Some(cmd) = Command::parse(line)? else {
            return Ok(Reply::text(""));
        };
        if cmd != Command::Quit
            && !access::master_alive(self.file).map_err(|e| Failure::Table(e.into()))?
        {
            return Err(Failure::NoMaster);
        }
        self.execute(&cmd)
    }

    fn emit(&self, reply: &Reply, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<()> {
        // The change was put on record with it (see `recorded`).
        if let (Some(event), true) = (&reply.audit, self.debug) {
            writeln!(err, "audit: {event}")?;
        }
        let admitted = reply.port.map(|port| (port, self.await_admitted(port)));
        out.write_all(reply.text.as_bytes())?;
        match admitted {
            Some((port, Admitted::TimedOut)) => writeln!(
                err,
                "balance: warning: the workers do not admit port {port} yet; connections to \
                 this channel fail until they do (see the daemon's log)"
            ),
            Some((_, Admitted::NoMaster)) => writeln!(
                err,
                "balance: warning: the daemon stopped meanwhile; the change is in a table \
                 nothing serves"
            ),
            _ => Ok(()),
        }
    }

    /// Waits (bounded) until every serving worker's sandbox admits `port`: a channel on a
    /// port new to the daemon makes it replace its workers, and the channel should work
    /// once the command that made it returns.
    fn await_admitted(&self, port: u16) -> Admitted {
        let deadline = std::time::Instant::now() + ADMIT_WAIT;
        loop {
            if self.table.admits(port) {
                return Admitted::Yes;
            }
            if std::time::Instant::now() >= deadline {
                return Admitted::TimedOut;
            }
            if !access::master_alive(self.file).unwrap_or(false) {
                return Admitted::NoMaster;
            }
            std::thread::sleep(ADMIT_POLL);
        }
    }

    /// Puts an instance-wide action (`kill`) on record: in the table's audit ring, which the
    /// supervisor (owner of the daemon's syslog connection) logs within 200 ms, so that the
    /// record does not depend on this shell reaching syslog. Straight to syslog when the
    /// ring cannot be written (the writer lock is stuck, or the ring stays full of records
    /// the supervisor has not read for longer than one of its looks: `kill` waits for a
    /// supervisor that runs, not for a stopped one). Refused, like any change, as
    /// [`Failure::NoMaster`] once the instance is stopping.
    pub(super) fn record(&self, event: &AuditEvent) -> Result<(), Failure> {
        let text = event.to_string();
        let append = |w: &Writer<'_>, room: bool| {
            if !room {
                return Step::Wait;
            }
            w.append_audit(&text);
            Step::Done(())
        };
        match self.change_waiting(RECORD_WAIT, append) {
            Err(Failure::NoMaster) => Err(Failure::NoMaster),
            Err(_) => {
                self.logger.borrow_mut().audit(Priority::Notice, &text);
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Reports a failed command; a refused change also goes to the audit trail.
    fn fail(&self, f: &Failure, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<()> {
        let why = match f {
            Failure::ReadOnly(cmd) => Some(format!(
                "refused {cmd} on {}: read-only access",
                self.path.display()
            )),
            Failure::AuditFull => Some(format!(
                "a change on {} was not made: the audit ring stayed full of records the master \
                 had not logged",
                self.path.display()
            )),
            _ => None,
        };
        if let Some(why) = why {
            let line = format!("{}: {why}", self.who());
            self.logger.borrow_mut().audit(Priority::Warning, &line);
        }
        f.report(self.path, out, err)
    }
}

/// How long an instance-wide record waits for room in the audit ring: more than one of the
/// supervisor's looks (200 ms apart).
const RECORD_WAIT: Duration = Duration::from_millis(300);

/// The longest shell line taken in. The rest of a longer line is read and dropped, and the
/// line is a syntax error: input cannot make the shell hold more than this (the original read
/// 128 bytes at a time and ran the rest of a long line as further commands).
const MAX_LINE: usize = 4096;

/// Reads one line (up to and including its newline) into `line`, keeping at most
/// [`MAX_LINE`] bytes of it. Returns the bytes read (0 at end of input) and whether the line
/// was longer than that.
fn read_line_bounded(input: &mut dyn BufRead, line: &mut Vec<u8>) -> io::Result<(usize, bool)> {
    line.clear();
    let (mut read, mut overlong) = (0, false);
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((read, overlong));
        }
        let end = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..end.map_or(buf.len(), |i| i + 1)];
        let room = MAX_LINE.saturating_sub(line.len());
        overlong |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let taken = chunk.len();
        input.consume(taken);
        read += taken;
        if end.is_some() {
            return Ok((read, overlong));
        }
    }
}

/// Exit code after stdout/stderr failed: a reader that went away is not an error.
fn write_failure(e: &io::Error) -> u8 {
    if e.kind() == io::ErrorKind::BrokenPipe {
        0
    } else {
        EX_IOERR
    }
}

#[cfg(test)]
mod tests;
