//! The properties the fuzz targets check, written once.
//!
//! Each `check_*` function takes one hostile input and panics when balance mishandles it:
//! a panic inside balance, or a result that breaks the rule the input's parser promises.
//! The cargo-fuzz targets in `fuzz_targets/` call them with libFuzzer's inputs; the stable
//! tests in `tests/hostile.rs` include this file (`#[path]`) and call them with inputs from
//! a small PRNG and with every crash the fuzzers found, so plain `cargo test` checks the
//! same rules. Only `balance` and `std` may be used here, for that reason.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use balance::cli::{self, Command as CliCommand, Services};
use balance::control::{Command as ControlCommand, ParseError};
use balance::ipc::{self, IpcError, Message, MAX_MESSAGE};
use balance::select;
use balance::table::{
    self, AuditRing, Channel, GroupKind, Header, InitialGroup, Layout, Snapshot, Table, TableError,
    AUDIT_SLOTS, AUDIT_TEXT, MAX_CHANNELS, MAX_GROUPS, MAX_POOL, MAX_WORKERS, TABLE_SIZE,
};

/// A services(5) table with names, aliases and entries the parser must skip.
const SERVICES: &str = "smtp 25/tcp mail\nhttp 80/tcp www\nimap 143/tcp imap2\n\
                        zero 0/tcp\nbig 70000/tcp\nudponly 53/udp\n";

/// Fuzz bytes as a command line: `balance`, then the bytes split on NUL (not valid UTF-8
/// is allowed, as the kernel allows it). `cli::parse` must return, and what it accepts must
/// be within the limits the table can hold.
pub fn check_cli_args(data: &[u8]) {
    let argv: Vec<OsString> = std::iter::once(OsString::from("balance"))
        .chain(
            data.split(|&b| b == 0)
                .map(|a| OsString::from_vec(a.to_vec())),
        )
        .collect();
    check_argv(argv);
}

/// [`check_cli_args`] for an argv already split (`argv[0]` included).
pub fn check_argv(argv: Vec<OsString>) {
    let services = Services::parse(SERVICES);
    match cli::parse(argv.clone(), &services) {
        Ok(CliCommand::Proxy(p)) => {
            check_listen(&p.common.listen, &argv);
            assert!(
                p.groups.len() <= MAX_GROUPS,
                "{} groups: {argv:?}",
                p.groups.len()
            );
            for g in &p.groups {
                let n = g.channels.len();
                assert!((1..=MAX_CHANNELS).contains(&n), "{n} channels: {argv:?}");
                for ch in &g.channels {
                    assert_ne!(ch.port, 0, "channel port 0: {argv:?}");
                    assert!(!ch.host.is_empty(), "empty channel host: {argv:?}");
                }
            }
            assert!(p.connect_timeout >= 1, "-t 0 accepted: {argv:?}");
            assert_ne!(p.idle_timeout, Some(0), "-T 0 kept: {argv:?}");
            if let Some(w) = p.workers {
                assert!((1..=MAX_POOL).contains(&w), "--workers {w}: {argv:?}");
            }
        }
        Ok(CliCommand::Shell(s)) => check_listen(&s.common.listen, &argv),
        Ok(CliCommand::Help(text) | CliCommand::Version(text)) => {
            assert!(text.ends_with('\n'), "help/version text: {argv:?}")
        }
        Err(e) => {
            assert!(
                matches!(e.code, 64 | 65 | 69),
                "exit code {} for {argv:?}",
                e.code
            );
            assert!(!e.message.is_empty() && !e.message.ends_with('\n'));
        }
    }
}

fn check_listen(listen: &cli::Listen, argv: &[OsString]) {
    assert_ne!(listen.port, 0, "listen port 0: {argv:?}");
    if let Some(bind) = &listen.bind {
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        assert!(
            !bind.is_empty() && bind.chars().all(safe),
            "-b {bind:?} would escape the run directory: {argv:?}"
        );
    }
}

/// One control-shell line: `Command::parse` must return, and what it accepts must be the
/// command its first word abbreviates, with in-range arguments.
pub fn check_control_line(line: &str) {
    let first = line.split_whitespace().next();
    match ControlCommand::parse(line) {
        Ok(None) => assert!(first.is_none(), "{line:?} parsed as blank"),
        Ok(Some(cmd)) => {
            let word = first.unwrap_or_else(|| panic!("blank {line:?} parsed as {cmd:?}"));
            let name = cmd.name();
            assert!(
                name.starts_with(word) || (name == "help" && "?".starts_with(word)),
                "{word:?} is not an abbreviation of {name}"
            );
            if let ControlCommand::Group(g) = cmd {
                assert!(g < MAX_GROUPS, "group {g} accepted");
            }
        }
        Err(ParseError::Syntax | ParseError::OutOfRange) => {}
    }
}

/// A received supervisor↔worker packet: `ipc::decode` must return, and a message it
/// accepts must survive encoding and decoding unchanged.
pub fn check_ipc_bytes(bytes: &[u8]) {
    let Ok(msg) = ipc::decode(bytes) else {
        return;
    };
    let encoded = match ipc::encode(&msg) {
        Ok(encoded) => encoded,
        Err(IpcError::Malformed("message too long")) if bytes.len() > MAX_MESSAGE => return,
        Err(e) => panic!("decoded {msg:?} but cannot encode it: {e}"),
    };
    let again: Message = ipc::decode(&encoded)
        .unwrap_or_else(|e| panic!("{msg:?} does not decode after encoding: {e}"));
    assert_eq!(again, msg, "round trip changed the message");
}

/// Bytes of the table that `check_table_bytes` rewrites: the configuration (header, every
/// group and channel). The third word of each group in the input, a reserved word in the
/// table, is also stored as the group's round-robin cursor (in the counters part).
const REGION: usize = offset_of!(Layout, padding);
const HEADER_WORDS: usize = size_of::<Header>() / 4;
/// Fixed bytes at the start of a table input: hash (4), cursor seed (4), flags (1), header
/// word index (1), header word value (4).
const PREFIX: usize = 14;

/// A valid table in an unlinked temporary file, kept mapped, to be rewritten per input.
pub struct TableFixture {
    file: File,
    /// The mapping `Table::initialise` made; it sees every rewrite of the file.
    table: Table,
    /// The first `REGION` bytes as initialised.
    pristine: Vec<u8>,
    /// How many bytes of the file the last input changed.
    dirty: AtomicUsize,
}

impl TableFixture {
    /// Initialises a table with round-robin, hash, IPv6 and limited channels.
    pub fn new() -> TableFixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "balance-fuzz-table-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create the temporary table");
        std::fs::remove_file(&path).expect("unlink the temporary table");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("fixture address");
        let groups = [
            InitialGroup {
                kind: GroupKind::RoundRobin,
                channels: vec![
                    (addr("127.0.0.1:8001"), 0),
                    (addr("127.0.0.2:8002"), 5),
                    (addr("[::1]:8003"), 0),
                ],
            },
            InitialGroup {
                kind: GroupKind::Hash,
                channels: vec![(addr("10.0.0.1:25"), 1), (addr("[fe80::1%2]:25"), 0)],
            },
            InitialGroup {
                kind: GroupKind::RoundRobin,
                channels: vec![(addr("192.0.2.9:65535"), i32::MAX)],
            },
        ];
        let table = Table::initialise(&file, &groups).expect("initialise the table");
        let mut pristine = vec![0; REGION];
        file.read_exact_at(&mut pristine, 0)
            .expect("read the table back");
        TableFixture {
            file,
            table,
            pristine,
            dirty: AtomicUsize::new(REGION),
        }
    }

    fn write(&self, bytes: &[u8], at: usize) {
        self.file
            .write_all_at(bytes, at as u64)
            .expect("rewrite the temporary table");
    }
}

impl Default for TableFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// A hostile table, as a worker or the control shell would meet it: the fixture's header
/// with at most one word changed, and the input's bytes over the groups and channels.
///
/// Input: hash u32, cursor seed u32, flags (bit 0 hash failover, bit 1 change the header
/// word, bit 2 take cursors from the seed rather than the table), header word index, header
/// word value, then the bytes written from the first group on.
///
/// `Table::open` must refuse exactly the headers it should, with the right error; a
/// snapshot must exist exactly when the seqlock is even and hold what the table holds,
/// validated; every candidate `select::candidates` returns must be a usable channel in
/// range whose address is the one stored, with a port; round-robin groups must offer every
/// usable channel once and hash groups one (all with failover). Returns how many
/// candidates were offered.
pub fn check_table_bytes(fixture: &TableFixture, data: &[u8]) -> usize {
    let Some((prefix, body)) = data.split_first_chunk::<PREFIX>() else {
        return 0;
    };
    let word =
        |i: usize| u32::from_le_bytes([prefix[i], prefix[i + 1], prefix[i + 2], prefix[i + 3]]);
    let (hash, seed, flags) = (word(0), word(4), prefix[8]);
    let header_word = (usize::from(prefix[9]) % HEADER_WORDS, word(10));

    let body = &body[..body.len().min(REGION - size_of::<Header>())];
    let dirty = fixture
        .dirty
        .swap(size_of::<Header>() + body.len(), Ordering::Relaxed);
    fixture.write(&fixture.pristine[..dirty], 0);
    fixture.write(body, size_of::<Header>());
    if flags & 2 != 0 {
        fixture.write(&header_word.1.to_le_bytes(), 4 * header_word.0);
    }
    // The audit ring lies far into the table: the same bytes go there too when asked.
    let ring_at = offset_of!(Layout, audit);
    if flags & 8 != 0 {
        let ring = &body[..body.len().min(size_of::<AuditRing>())];
        fixture.write(ring, ring_at);
        let end = ring_at + ring.len();
        fixture.dirty.fetch_max(end, Ordering::Relaxed);
    }
    check_audit(&fixture.table, u64::from(seed));
    let l = fixture.table.layout();
    for (cursor, group) in l.cursors.iter().zip(&l.groups) {
        cursor.store(group.reserved[0].load(Ordering::Relaxed), Ordering::Relaxed);
    }

    let header = fixture.table.header();
    let expected = expected_open(header);
    let table = match (Table::open(&fixture.file, false), expected) {
        (Ok(table), Expected::Ok) => table,
        (Err(TableError::WrongMagic), Expected::WrongMagic) => return 0,
        (Err(TableError::Incompatible { version, .. }), Expected::Incompatible(v))
            if version == v =>
        {
            return 0
        }
        (Err(TableError::NotReady), Expected::NotReady) => return 0,
        (got, want) => panic!(
            "Table::open gave {:?}, expected {want:?}",
            got.map(|_| "a table")
        ),
    };
    let seq = header.seq.load(Ordering::Relaxed);
    let Some(snap) = table.snapshot() else {
        assert_eq!(seq & 1, 1, "no snapshot with an even seqlock");
        return 0;
    };
    assert_eq!(seq & 1, 0, "snapshot taken with an odd seqlock");
    assert_eq!(snap.seq, seq);
    check_snapshot(&table, &snap);

    let hash_failover = flags & 1 != 0;
    let from_table = |g: usize| table.layout().cursors[g].load(Ordering::Relaxed);
    let from_seed = |g: usize| seed.rotate_left(g as u32).wrapping_mul(g as u32 + 1);
    let chosen = if flags & 4 != 0 {
        select::candidates(&snap, hash, hash_failover, from_seed)
    } else {
        select::candidates(&snap, hash, hash_failover, from_table)
    };
    check_candidates(&table, &snap, &chosen, hash_failover);
    chosen.len()
}

/// Reading the audit ring from any point, whatever it holds, returns at most a ringful of
/// bounded lines and goes on from where the ring says it is.
fn check_audit(table: &Table, from: u64) {
    let batch = table.read_audit(from);
    assert!(batch.lines.len() <= AUDIT_SLOTS);
    assert_eq!(batch.next, table.audit_next());
    for line in &batch.lines {
        // Lossy decoding can turn each byte into a three-byte replacement character.
        assert!(line.len() <= 3 * AUDIT_TEXT, "{} bytes", line.len());
    }
}

/// What `Table::open` must answer for `header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Ok,
    WrongMagic,
    Incompatible(u32),
    NotReady,
}

fn expected_open(h: &Header) -> Expected {
    let version = h.layout_version.load(Ordering::Relaxed);
    if h.magic.load(Ordering::Relaxed) != table::MAGIC {
        Expected::WrongMagic
    } else if version != table::LAYOUT_VERSION
        || h.total_size.load(Ordering::Relaxed) as usize != TABLE_SIZE
        || h.max_groups.load(Ordering::Relaxed) as usize != MAX_GROUPS
        || h.max_channels.load(Ordering::Relaxed) as usize != MAX_CHANNELS
        || h.max_workers.load(Ordering::Relaxed) as usize != MAX_WORKERS
    {
        Expected::Incompatible(version)
    } else if h.ready.load(Ordering::Relaxed) != 1 {
        Expected::NotReady
    } else {
        Expected::Ok
    }
}

/// The snapshot holds every group, each with its stored channel count (capped), kind,
/// status, limit and address as [`stored_addr`] reads them.
fn check_snapshot(table: &Table, snap: &Snapshot) {
    let l = table.layout();
    assert_eq!(snap.groups.len(), MAX_GROUPS);
    for (g, group) in snap.groups.iter().enumerate() {
        let n = (l.groups[g].nchannels.load(Ordering::Relaxed) as usize).min(MAX_CHANNELS);
        assert_eq!(group.channels.len(), n, "group {g}");
        let kind = match l.groups[g].kind.load(Ordering::Relaxed) {
            1 => GroupKind::Hash,
            _ => GroupKind::RoundRobin,
        };
        assert_eq!(group.kind, kind, "group {g}");
        for (c, ch) in group.channels.iter().enumerate() {
            let raw = &l.channels[g][c];
            assert_eq!(ch.enabled, raw.status.load(Ordering::Relaxed) == 1);
            assert_eq!(ch.maxc, raw.maxc.load(Ordering::Relaxed));
            assert_eq!(ch.addr, stored_addr(raw), "group {g} channel {c}");
        }
    }
}

/// The address a channel's raw words describe, decoded independently of `table`: family
/// 4 or 6, a port in 1..=65535 and an address a channel can have (not unspecified,
/// multicast or broadcast), else none.
fn stored_addr(ch: &Channel) -> Option<SocketAddr> {
    let addr = stored_raw_addr(ch)?;
    let ip = addr.ip();
    let unusable =
        ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST);
    (!unusable).then_some(addr)
}

fn stored_raw_addr(ch: &Channel) -> Option<SocketAddr> {
    let port = ch.port.load(Ordering::Relaxed);
    if port == 0 || port > u32::from(u16::MAX) {
        return None;
    }
    let port = port as u16;
    let words = ch.addr.each_ref().map(|w| w.load(Ordering::Relaxed));
    match ch.family.load(Ordering::Relaxed) {
        4 => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(words[0])), port)),
        6 => {
            let ip = (u128::from(words[0]) << 96)
                | (u128::from(words[1]) << 64)
                | (u128::from(words[2]) << 32)
                | u128::from(words[3]);
            let scope = ch.scope_id.load(Ordering::Relaxed);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                0,
                scope,
            )))
        }
        _ => None,
    }
}

fn check_candidates(table: &Table, snap: &Snapshot, chosen: &[select::Candidate], failover: bool) {
    let mut last_group = 0;
    for (i, &(g, c)) in chosen.iter().enumerate() {
        let group = snap
            .groups
            .get(g)
            .unwrap_or_else(|| panic!("group {g} out of range"));
        let ch = group
            .channels
            .get(c)
            .unwrap_or_else(|| panic!("channel {c} of group {g} out of range"));
        assert!(
            select::usable(ch),
            "unusable channel ({g}, {c}) chosen: {ch:?}"
        );
        let addr = ch
            .addr
            .unwrap_or_else(|| panic!("({g}, {c}) has no address"));
        assert_ne!(addr.port(), 0, "({g}, {c}) has port 0");
        let raw = table.channel(g, c).expect("candidate inside the layout");
        assert_eq!(
            Some(addr),
            stored_addr(raw),
            "({g}, {c}) is not what the table holds"
        );
        assert!(g >= last_group, "groups out of order: {chosen:?}");
        assert!(!chosen[..i].contains(&(g, c)), "({g}, {c}) offered twice");
        last_group = g;
    }
    for (g, group) in snap.groups.iter().enumerate() {
        let offered = chosen.iter().filter(|&&(cg, _)| cg == g).count();
        let usable = group
            .channels
            .iter()
            .filter(|ch| select::usable(ch))
            .count();
        match group.kind {
            GroupKind::RoundRobin => assert_eq!(offered, usable, "round-robin group {g}"),
            GroupKind::Hash if failover => assert_eq!(offered, usable, "hash group {g}"),
            GroupKind::Hash => assert!(offered <= 1, "hash group {g} offered {offered}"),
        }
    }
}
