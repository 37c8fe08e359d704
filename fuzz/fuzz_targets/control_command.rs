//! One control-shell line → `Command::parse`: never a panic, and only real abbreviations
//! with in-range arguments accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| balance_fuzz::check_control_line(line));
