//! `balance` command: dispatches to the proxy (supervisor), a worker, or the control shell,
//! and is the one place where errors become messages and exit codes.

use std::io::Write;
use std::process::ExitCode;

use balance::cli::{self, Command, Services};
use balance::exitcode::{EX_IOERR, EX_SOFTWARE};
use balance::{say, supervisor, worker};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "--worker") {
        return match worker::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("balance: {e}");
                ExitCode::from(EX_SOFTWARE)
            }
        };
    }
    match cli::parse(args, &Services::system()) {
        Err(e) => {
            say!("{e}");
            ExitCode::from(e.code)
        }
        Ok(Command::Help(text)) | Ok(Command::Version(text)) => {
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                // A reader that went away (`balance --help | head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    say!("balance: cannot write the output: {e}");
                    ExitCode::from(EX_IOERR)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Ok(Command::Proxy(args)) => match supervisor::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if e.untold() {
                    say!("{e}");
                }
                ExitCode::from(e.code)
            }
        },
        Ok(Command::Shell(args)) => balance::control::run(args),
    }
}
