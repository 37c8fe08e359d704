//! The supervisor's log: syslog (LOG_DAEMON, ident `balance`) and, in the foreground, stderr.
//!
//! Only the supervisor talks to syslog; workers send it `Log` messages. The `syslog` crate
//! does not reconnect by itself, so a failed send drops the connection and the next message
//! tries to open a new one (a restarted syslog daemon is picked up). When no syslog socket
//! exists, balance says so once on stderr and keeps running.

use std::path::PathBuf;

use syslog::{Facility, Formatter3164, Logger as SysLogger, LoggerBackend};

use crate::ipc::Priority;

pub struct Logger {
    socket: Option<PathBuf>,
    conn: Option<SysLogger<LoggerBackend, Formatter3164>>,
    /// Copy messages to stderr (foreground mode).
    stderr: bool,
    /// Also pass Info/Debug to stderr (`-d`).
    verbose: bool,
    warned_unavailable: bool,
}

impl Logger {
    pub fn new(socket: Option<PathBuf>, stderr: bool, verbose: bool) -> Logger {
        Logger {
            socket,
            conn: None,
            stderr,
            verbose,
            warned_unavailable: false,
        }
    }

    /// Stops copying to stderr (once the daemon has detached from the terminal).
    pub fn detach(&mut self) {
        self.stderr = false;
    }

    /// Drops the syslog connection; the next message opens a new one.
    pub fn reconnect(&mut self) {
        self.conn = None;
    }

    fn connect(&mut self) -> Option<&mut SysLogger<LoggerBackend, Formatter3164>> {
        if self.conn.is_none() {
            let formatter = Formatter3164 {
                facility: Facility::LOG_DAEMON,
                hostname: None,
                process: "balance".into(),
                pid: std::process::id(),
            };
            let conn = match &self.socket {
                Some(path) => syslog::unix_custom(formatter, path),
                None => syslog::unix(formatter),
            };
            match conn {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    if !self.warned_unavailable {
                        self.warned_unavailable = true;
                        eprintln!(
                            "balance: no syslog socket available ({e}); logging to stderr only"
                        );
                    }
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    pub fn log(&mut self, priority: Priority, text: &str) {
        let show = match priority {
            Priority::Info | Priority::Debug => self.verbose,
            _ => true,
        };
        if self.stderr && show {
            eprintln!("{text}");
        }
        let sent = match self.connect() {
            Some(conn) => match priority {
                Priority::Error => conn.err(text),
                Priority::Warning => conn.warning(text),
                Priority::Notice => conn.notice(text),
                Priority::Info => conn.info(text),
                Priority::Debug => conn.debug(text),
            }
            .is_ok(),
            None => return,
        };
        if !sent {
            // Reconnect on the next message.
            self.conn = None;
        }
    }
}
