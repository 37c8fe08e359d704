//! balance: a privilege-separated TCP load balancer, compatible with Inlab balance 3.5x.
//!
//! # Layout
//! - `cli`: argv in the original's syntax → a typed [`cli::Command`].
//! - `table`: the shared channel table, the only definition of its layout.
//! - `futex`: the robust writer lock inside the table.
//! - `select`: channel choice (round robin, hash, failover order), pure logic.
//! - `supervisor`: root bootstrap, privilege drop, worker pool, shutdown.
//! - `control`: `balance -i` / `-c`, the operator's shell on the table.
//! - `log`: the supervisor's syslog connection.
//! - `worker`: one sandboxed worker process and its event loop; `worker::conn`: one
//!   connection, accept → pick → connect → relay → account, top to bottom.
//! - `relay`: the only place bytes move between client and backend.
//! - `ipc`: the messages between supervisor and workers, and their strict decoding.
//! - `sandbox`: privilege dropping and process hardening.
//! - `sys`: every `unsafe` block and raw system call.

pub mod cli;
pub mod control;
pub mod futex;
pub mod ipc;
pub mod log;
pub mod relay;
pub mod sandbox;
pub mod select;
pub mod supervisor;
pub mod sys;
pub mod table;
pub mod worker;

/// `eprintln!` that cannot panic: a line that stderr cannot take (closed, full) is lost, and
/// the exit code still tells what happened. One `write` per line ([`log::stderr_line`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::log::stderr_line(format_args!($($arg)*))
    };
}

/// Exit codes (sysexits.h), as the original used them.
pub mod exitcode {
    pub const EX_USAGE: u8 = 64;
    pub const EX_DATAERR: u8 = 65;
    pub const EX_NOUSER: u8 = 67;
    pub const EX_UNAVAILABLE: u8 = 69;
    pub const EX_SOFTWARE: u8 = 70;
    pub const EX_OSERR: u8 = 71;
    pub const EX_IOERR: u8 = 74;
    pub const EX_TEMPFAIL: u8 = 75;
    pub const EX_NOPERM: u8 = 77;
}

/// The daemon's version, as written into the table header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const VERSION_PARTS: [u32; 3] = [
    parse_u32(env!("CARGO_PKG_VERSION_MAJOR")),
    parse_u32(env!("CARGO_PKG_VERSION_MINOR")),
    parse_u32(env!("CARGO_PKG_VERSION_PATCH")),
];

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0u32;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}
