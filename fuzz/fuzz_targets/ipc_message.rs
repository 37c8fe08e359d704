//! A supervisor↔worker packet → `ipc::decode`: never a panic, and what decodes re-encodes
//! to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| balance_fuzz::check_ipc_bytes(data));
