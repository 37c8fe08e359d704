//! Hostile input, on stable Rust: the properties the fuzz targets check (`fuzz/src/lib.rs`,
//! included here so they are written once), driven by a small deterministic PRNG with a
//! bounded number of rounds; the checked-in fuzz seeds and every crash the fuzzers found,
//! replayed; and table files of the wrong size, magic or layout version, refused by
//! `Table::open` and by `balance -c show` with a clear message.

mod common;
#[path = "../fuzz/src/lib.rs"]
mod properties;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::OutputWithin;

use balance::ipc::{self, Message, Priority, WorkerConfig};
use balance::table::{
    GroupKind, Header, InitialGroup, Table, TableError, LAYOUT_VERSION, TABLE_SIZE,
};
use properties::TableFixture;

/// xorshift64*: deterministic, so a failing round can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Changes a few bytes of `data`: flips, replacements, insertions, deletions, truncation.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(5) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 if at < data.len() => data[at] = rng.pick(&[0, 1, 0x7f, 0x80, 0xff]),
            2 => data.insert(at, rng.next() as u8),
            3 if at < data.len() => {
                data.remove(at);
            }
            _ => data.truncate(at),
        }
    }
}

const ARG_WORDS: &[&str] = &[
    "8000",
    "smtp",
    "www",
    "0",
    "65535",
    "65536",
    "-1",
    "abc",
    "",
    "!",
    "%",
    "--",
    "-",
    "-f",
    "-fd",
    "-ad",
    "-H6",
    "-M",
    "-p",
    "-t",
    "-t0",
    "-t5",
    "-T",
    "-T0",
    "-B",
    "-b",
    "-c",
    "-i",
    "-h",
    "-V",
    "--help",
    "--version",
    "--json",
    "--workers",
    "--workers=33",
    "--user=",
    "--pidfile",
    "--run-dir=/tmp/x",
    "--control-group",
    "--syslog-socket",
    "--log-connections",
    "--bogus",
    "--json=1",
    "127.0.0.1",
    "127.0.0.1:8001",
    "h::5",
    "h:0",
    "h:x",
    "h:1:2:3",
    "[::1]",
    "[::1]:81:3",
    "[::1",
    "[]",
    "::1",
    "2001:db8::5",
    "fe80::1%eth0",
    ":81",
    "h::4294967296",
    "a/b",
    "show",
    "mrtg-bytes 0 0",
    "h\u{e9}",
    "\u{0}",
];

/// An argv of dictionary words, sometimes mutated at the byte level.
fn random_argv(rng: &mut Rng) -> Vec<OsString> {
    let mut argv = vec![OsString::from("balance")];
    for _ in 0..rng.below(12) {
        let mut word = rng.pick(ARG_WORDS).as_bytes().to_vec();
        if rng.chance(4) {
            mutate(rng, &mut word);
        }
        argv.push(std::os::unix::ffi::OsStringExt::from_vec(word));
    }
    argv
}

#[test]
fn command_lines_never_panic_and_stay_within_limits() {
    let mut rng = Rng::new(0x0c11);
    for _ in 0..20_000 {
        properties::check_argv(random_argv(&mut rng));
    }
    let mut raw = Rng::new(0x0c12);
    for _ in 0..5_000 {
        let n = raw.below(64);
        properties::check_cli_args(&raw.bytes(n));
    }
}

#[test]
fn the_largest_command_line_is_accepted_and_one_more_is_not() {
    let mut args = vec!["80".to_owned()];
    for g in 0..balance::table::MAX_GROUPS {
        args.extend((0..balance::table::MAX_CHANNELS).map(|c| format!("10.{g}.0.{c}:{}", c + 1)));
        args.push("!".into());
    }
    properties::check_cli_args(args.join("\0").as_bytes());
    args.push("10.99.0.1".into());
    properties::check_cli_args(args.join("\0").as_bytes());
}

const CONTROL_WORDS: &[&str] = &[
    "q",
    "s",
    "show",
    "json",
    "h",
    "help",
    "?",
    "k",
    "kill",
    "d",
    "disable",
    "g",
    "group",
    "r",
    "reset",
    "e",
    "enable",
    "c",
    "create",
    "a",
    "assign",
    "m",
    "maxc",
    "mrtg-bytes",
    "mrtg-c",
    "v",
    "hash",
    "rr",
    "0",
    "1",
    "-1",
    "31",
    "32",
    "2147483648",
    "-2147483649",
    "9223372036854775808",
    "+5",
    "h:80",
    "[::1]:81",
    "::1",
    "[::1",
    "smtp",
    "x",
    "",
];

#[test]
fn control_lines_never_panic() {
    let mut rng = Rng::new(0xc0de);
    let spaces = [" ", "  ", "\t", "\u{a0}", "\u{3000}", "\n"];
    for _ in 0..50_000 {
        let mut line = String::new();
        for _ in 0..rng.below(5) {
            line.push_str(rng.pick(&spaces));
            line.push_str(rng.pick(CONTROL_WORDS));
        }
        if rng.chance(3) {
            let mut bytes = line.into_bytes();
            mutate(&mut rng, &mut bytes);
            line = String::from_utf8_lossy(&bytes).into_owned();
        }
        properties::check_control_line(&line);
    }
}

fn random_string(rng: &mut Rng) -> String {
    let n = rng.below(20);
    (0..n)
        .map(|_| char::from_u32(rng.next() as u32 % 0x3000).unwrap_or('?'))
        .collect()
}

fn random_message(rng: &mut Rng) -> Message {
    let priorities = [
        Priority::Error,
        Priority::Warning,
        Priority::Notice,
        Priority::Info,
        Priority::Debug,
    ];
    let notices = [
        ipc::Notice::Full,
        ipc::Notice::Failed,
        ipc::Notice::Shortage,
        ipc::Notice::Saturated,
        ipc::Notice::Source,
        ipc::Notice::NoChannel,
    ];
    match rng.below(8) {
        0 => Message::Start(WorkerConfig {
            row: rng.next() as u32,
            listeners: rng.below(3) as u32,
            connect_timeout_secs: rng.next() >> rng.below(64),
            idle_timeout_secs: rng.chance(2).then(|| rng.next()),
            half_close_timeout_secs: rng.chance(2).then(|| rng.next()),
            autodisable: rng.chance(2),
            hash_failover: rng.chance(2),
            source: match rng.below(3) {
                0 => None,
                1 => Some(std::net::Ipv4Addr::from(rng.next() as u32).into()),
                _ => Some(std::net::Ipv6Addr::from(u128::from(rng.next()) << 64).into()),
            },
            debug: rng.chance(2),
            dump: rng.chance(2),
            log_connections: rng.chance(2),
            connect_ports: (0..rng.below(6)).map(|_| rng.next() as u16).collect(),
        }),
        1 => Message::Drain,
        2 => Message::Ready {
            landlock: rng.chance(2).then(|| random_string(rng)),
        },
        3 => Message::Disable {
            group: rng.next() as u32 >> rng.below(32),
            channel: rng.next() as u32 >> rng.below(32),
            addr: std::net::SocketAddr::new(
                std::net::Ipv4Addr::from(rng.next() as u32).into(),
                rng.next() as u16,
            ),
        },
        4 => Message::StoppedAccepting,
        5 => Message::Accept,
        6 => Message::Log {
            priority: rng.pick(&priorities),
            text: random_string(rng),
        },
        _ => Message::Notice {
            text: random_string(rng),
            line: ipc::NoticeLine {
                kind: rng.pick(&notices),
                channel: rng
                    .chance(2)
                    .then(|| (rng.next() as u16, rng.next() as u16)),
                held: rng.next() as u32 >> rng.below(32),
            },
        },
    }
}

#[test]
fn worker_messages_round_trip_and_damaged_ones_never_panic() {
    let mut rng = Rng::new(0x1bc);
    for _ in 0..20_000 {
        let msg = random_message(&mut rng);
        let mut bytes = ipc::encode(&msg).expect("encode");
        assert_eq!(ipc::decode(&bytes).expect("decode"), msg);
        properties::check_ipc_bytes(&bytes);
        mutate(&mut rng, &mut bytes);
        properties::check_ipc_bytes(&bytes);
    }
    for _ in 0..5_000 {
        let n = rng.below(48);
        properties::check_ipc_bytes(&rng.bytes(n));
    }
}

/// A table input (see `properties::check_table_bytes`): groups and channels whose fields
/// take the values a hostile writer would try (the limits, families, ports just out of
/// range) or noise, with an occasional header word changed.
fn random_table_input(rng: &mut Rng) -> Vec<u8> {
    let mut input = Vec::new();
    input.extend((rng.next() as u32).to_le_bytes());
    input.extend((rng.next() as u32).to_le_bytes());
    input.push(rng.next() as u8 & if rng.chance(8) { 0xff } else { 0xfd });
    input.push(rng.below(16) as u8);
    input.extend(pick_word(rng, &[0, 1, 2, 3, 0x4154_4c42]).to_le_bytes());
    let groups = rng.below(4);
    for g in 0..balance::table::MAX_GROUPS {
        let n = if g < groups {
            pick_word(rng, &[1, 2, 3, 64, 65, u32::MAX])
        } else {
            pick_word(rng, &[0, 0, 0, 1])
        };
        let kind = pick_word(rng, &[0, 1, 2]);
        let cursor = pick_word(rng, &[0, 1, 2, 63, u32::MAX]);
        for w in [n, kind, cursor, 0] {
            input.extend(w.to_le_bytes());
        }
    }
    for _ in 0..groups * balance::table::MAX_CHANNELS {
        let status = pick_word(rng, &[0, 1, 1, 1, 2]);
        let port = pick_word(rng, &[0, 1, 80, 65535, 65535, 65536]);
        let family = pick_word(rng, &[4, 4, 6, 6, 0, 5]);
        let maxc = pick_word(rng, &[0, 0, 1, u32::MAX, 0x7fff_ffff, 0x8000_0000]);
        let addr: [u32; 4] = std::array::from_fn(|_| pick_word(rng, &[0, 0x7f00_0001]));
        let scope = pick_word(rng, &[0, 2]);
        for w in [status, port, family, maxc].into_iter().chain(addr) {
            input.extend(w.to_le_bytes());
        }
        input.extend(scope.to_le_bytes());
        input.extend(rng.bytes(28));
    }
    input
}

/// One of `usual`, or now and then any word.
fn pick_word(rng: &mut Rng, usual: &[u32]) -> u32 {
    if rng.chance(10) {
        rng.next() as u32
    } else {
        rng.pick(usual)
    }
}

#[test]
fn hostile_tables_never_panic_or_offer_an_unvalidated_channel() {
    let fixture = TableFixture::new();
    let mut rng = Rng::new(0x7ab1e);
    let mut offered = 0;
    for _ in 0..1_500 {
        offered += properties::check_table_bytes(&fixture, &random_table_input(&mut rng));
    }
    assert!(offered > 1_000, "only {offered} candidates in all rounds");
}

fn replay(target: &str, check: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("seed directory") {
        let path = entry.expect("seed entry").path();
        check(&std::fs::read(&path).expect("read seed"));
        n += 1;
    }
    n
}

/// The checked-in seeds pass (so each fuzzing run starts from inputs that work), and the
/// message seeds still decode: when `ipc::Message` changes, rerun `fuzz/seeds/make.py`.
#[test]
fn fuzz_seeds_replay_cleanly() {
    assert!(replay("cli_args", properties::check_cli_args) > 0);
    assert!(
        replay("control_command", |b| {
            properties::check_control_line(std::str::from_utf8(b).expect("UTF-8 seed"))
        }) > 0
    );
    assert!(
        replay("ipc_message", |b| {
            ipc::decode(b).expect("message seed no longer decodes: rerun fuzz/seeds/make.py");
            properties::check_ipc_bytes(b);
        }) > 0
    );
    let fixture = TableFixture::new();
    assert!(
        replay("table_reader", |b| {
            properties::check_table_bytes(&fixture, b);
        }) > 0
    );
}

/// A fresh, valid table in `dir/name`, mode 0640, for tests that then spoil it.
fn valid_table(dir: &Path, name: &str) -> (PathBuf, File) {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create table file");
    file.set_permissions(std::fs::Permissions::from_mode(0o640))
        .expect("chmod table file");
    let groups = [InitialGroup {
        kind: GroupKind::RoundRobin,
        channels: vec![("127.0.0.1:9".parse().expect("address"), 0)],
    }];
    drop(Table::initialise(&file, &groups).expect("initialise"));
    (path, file)
}

/// One way a table file can be foreign, as `Table::open` must see it.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    Empty,
    Truncated,
    Magic,
    Version,
    /// Another layout version with another size: a table of another release, not a
    /// foreign file.
    VersionAndSize,
    Geometry,
}

impl Spoil {
    const ALL: [Spoil; 6] = [
        Spoil::Empty,
        Spoil::Truncated,
        Spoil::Magic,
        Spoil::Version,
        Spoil::VersionAndSize,
        Spoil::Geometry,
    ];

    fn apply(self, file: &File) {
        let put = |offset: usize, value: u32| {
            file.write_all_at(&value.to_le_bytes(), offset as u64)
                .expect("spoil table");
        };
        match self {
            Spoil::Empty => file.set_len(0).expect("truncate"),
            Spoil::Truncated => file.set_len(TABLE_SIZE as u64 - 1).expect("truncate"),
            Spoil::Magic => file.write_all_at(b"NOTATABL", 0).expect("spoil magic"),
            Spoil::Version => put(
                std::mem::offset_of!(Header, layout_version),
                LAYOUT_VERSION + 1,
            ),
            Spoil::VersionAndSize => {
                put(
                    std::mem::offset_of!(Header, layout_version),
                    LAYOUT_VERSION + 1,
                );
                file.set_len(TABLE_SIZE as u64 + 65536).expect("extend");
            }
            Spoil::Geometry => put(std::mem::offset_of!(Header, max_channels), 128),
        }
    }

    /// Whether `err` is the error this spoiling must give.
    fn is_reported_by(self, err: &TableError) -> bool {
        match self {
            Spoil::Empty => matches!(err, TableError::WrongSize { size: 0 }),
            Spoil::Truncated => {
                matches!(err, TableError::WrongSize { size } if *size == TABLE_SIZE as u64 - 1)
            }
            Spoil::Magic => matches!(err, TableError::WrongMagic),
            Spoil::Version | Spoil::VersionAndSize => matches!(
                err,
                TableError::Incompatible { version, release: Some(r) }
                    if *version == LAYOUT_VERSION + 1 && *r == balance::VERSION_PARTS
            ),
            Spoil::Geometry => {
                matches!(err, TableError::Incompatible { version, .. } if *version == LAYOUT_VERSION)
            }
        }
    }

    /// What the error's message must say.
    fn message(self) -> String {
        let size = format!("expected {TABLE_SIZE}: not a balance table");
        match self {
            Spoil::Empty => format!("table file has 0 bytes, {size}"),
            Spoil::Truncated => format!("table file has {} bytes, {size}", TABLE_SIZE - 1),
            Spoil::Magic => "not a balance table (wrong magic number)".into(),
            Spoil::Version | Spoil::VersionAndSize => format!(
                "incompatible table layout version {}, made by balance {} (this balance, {}, \
                 understands version {LAYOUT_VERSION})",
                LAYOUT_VERSION + 1,
                balance::VERSION,
                balance::VERSION
            ),
            Spoil::Geometry => "incompatible table layout".into(),
        }
    }
}

#[test]
fn foreign_table_files_are_refused_with_a_clear_message() {
    let dir = common::temp_dir("hostile-open");
    for (i, spoil) in Spoil::ALL.into_iter().enumerate() {
        let (_path, file) = valid_table(&dir, &format!("table-{i}"));
        spoil.apply(&file);
        for writable in [false, true] {
            let err = match Table::open(&file, writable) {
                Ok(_) => panic!("{spoil:?} table opened (writable: {writable})"),
                Err(e) => e,
            };
            assert!(spoil.is_reported_by(&err), "{spoil:?}: got {err:?}");
            assert!(
                err.to_string().contains(&spoil.message()),
                "{spoil:?}: {err}"
            );
        }
    }
    let (_path, file) = valid_table(&dir, "not-ready");
    file.write_all_at(
        &0u32.to_le_bytes(),
        std::mem::offset_of!(Header, ready) as u64,
    )
    .expect("clear ready");
    assert!(matches!(
        Table::open(&file, false),
        Err(TableError::NotReady)
    ));
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// The issue asks for tables of the wrong size to be refused; one with bytes past the
/// layout is a wrong size as much as a short one.
#[test]
fn oversized_table_file_is_refused() {
    let dir = common::temp_dir("hostile-oversized");
    let (_path, file) = valid_table(&dir, "table");
    file.set_len(TABLE_SIZE as u64 + 4096).expect("extend");
    let result = Table::open(&file, false);
    std::fs::remove_dir_all(&dir).expect("clean up");
    let err = match result {
        Ok(_) => panic!("a table file of {} bytes was opened", TABLE_SIZE + 4096),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains(&(TABLE_SIZE + 4096).to_string()),
        "{err}"
    );
}

/// `balance -c show` against a spoiled table whose master seems alive (this test holds the
/// exclusive lock a supervisor would): exit 65 (EX_DATAERR) and the reason on stderr.
#[test]
fn control_shell_refuses_foreign_tables() {
    let port = 19_999;
    for spoil in Spoil::ALL {
        let dir = common::temp_dir("hostile-shell");
        let run = dir.join("run");
        std::fs::create_dir(&run).expect("run dir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750))
            .expect("chmod run dir");
        let name = balance::cli::table_file_name(port, Some("127.0.0.1"));
        let (path, file) = valid_table(&run, &name);
        spoil.apply(&file);
        assert!(
            balance::sys::try_flock(file.as_fd(), true).expect("flock"),
            "lock the table as a master would"
        );
        let out = Command::new(common::BIN)
            .arg("--run-dir")
            .arg(&run)
            .args(["-b", "127.0.0.1", "-c", "show", &port.to_string()])
            .output_within(common::COMMAND_LIMIT)
            .expect("run balance");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(65),
            "{spoil:?}: stdout {stdout:?} stderr {stderr:?}"
        );
        assert!(stdout.is_empty(), "{spoil:?}: stdout {stdout:?}");
        assert!(
            stderr.starts_with(&format!("balance: {}: ", path.display())),
            "{spoil:?}: {stderr:?}"
        );
        assert!(stderr.contains(&spoil.message()), "{spoil:?}: {stderr:?}");
        if matches!(spoil, Spoil::Magic | Spoil::Version | Spoil::Geometry) {
            assert!(
                stderr.contains("is this the balance that started the daemon?"),
                "{spoil:?}: {stderr:?}"
            );
        }
        drop(file);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
