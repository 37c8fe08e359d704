//! `balance` command: dispatches to the proxy (supervisor), a worker, or the control shell,
//! and is the one place where errors become messages and exit codes.

use std::process::ExitCode;

use balance::cli::{self, Command, Services};
use balance::exitcode::EX_SOFTWARE;
use balance::{supervisor, worker};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "--worker") {
        return match worker::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("balance: {e}");
                ExitCode::from(EX_SOFTWARE)
            }
        };
    }
    match cli::parse(args, &Services::system()) {
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.code)
        }
        Ok(Command::Help(text)) | Ok(Command::Version(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Command::Proxy(args)) => match supervisor::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(e.code)
            }
        },
        Ok(Command::Shell(args)) => balance::control::run(args),
    }
}
