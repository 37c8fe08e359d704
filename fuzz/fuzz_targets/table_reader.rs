//! Hostile table bytes → `Table::open`, `snapshot` and `select::candidates`: never a panic,
//! and never a candidate that is not a validated channel of the table.
//!
//! One table per process, mapped once; each input rewrites its header and channels.
#![no_main]

use std::sync::OnceLock;

use balance_fuzz::TableFixture;
use libfuzzer_sys::fuzz_target;

static FIXTURE: OnceLock<TableFixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    balance_fuzz::check_table_bytes(FIXTURE.get_or_init(TableFixture::new), data);
});
