//! argv (the input split on NUL, after `balance`) → `cli::parse`: never a panic, and a
//! proxy command line within the table's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| balance_fuzz::check_cli_args(data));
