//! What the shell prints. `show`, `mrtg-bytes` and `mrtg-conns` keep the original's exact
//! shapes, because scripts (MRTG among them) parse them; the prose is ours.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::table::{ChannelCounters, GroupKind, Snapshot, Table, MAX_CHANNELS, MAX_GROUPS};

/// The original's ip column is `%16s`. IPv6 addresses can be longer; the column then widens
/// to the longest address shown, so rows stay aligned and IPv4-only tables look as before.
const IP_COLUMN: usize = 16;

/// One channel's counters, read from the table's atomics (outside the seqlock).
struct Counters {
    current: u32,
    total: u64,
    sent: u64,
    received: u64,
}

fn counters(ch: Option<&ChannelCounters>) -> Counters {
    ch.map_or(
        Counters {
            current: 0,
            total: 0,
            sent: 0,
            received: 0,
        },
        |ch| Counters {
            current: ch.current.load(Ordering::Relaxed),
            total: ch.total.load(Ordering::Relaxed),
            sent: ch.sent.load(Ordering::Relaxed),
            received: ch.received.load(Ordering::Relaxed),
        },
    )
}

/// The address and port columns; a channel whose stored address is not valid shows `-`, 0.
fn address(addr: Option<SocketAddr>) -> (String, u16) {
    match addr {
        Some(SocketAddr::V4(a)) => (a.ip().to_string(), a.port()),
        Some(SocketAddr::V6(a)) if a.scope_id() != 0 => {
            (format!("{}%{}", a.ip(), a.scope_id()), a.port())
        }
        Some(SocketAddr::V6(a)) => (a.ip().to_string(), a.port()),
        None => ("-".to_string(), 0),
    }
}

fn kind_name(kind: GroupKind) -> &'static str {
    match kind {
        GroupKind::RoundRobin => "RR",
        GroupKind::Hash => "Hash",
    }
}

/// `show`: a header, then one row per channel of every group, in the original's columns.
pub fn show(table: &Table, snap: &Snapshot) -> String {
    let width = snap
        .groups
        .iter()
        .flat_map(|g| &g.channels)
        .map(|ch| address(ch.addr).0.len())
        .fold(IP_COLUMN, usize::max);
    let mut out = format!(
        "{:>3} {:>4} {:>2} {:>3} {:>width$} {:>5} {:>4} {:>11} {:>4} {:>11} {:>11}\n",
        "GRP", "Type", "#", "S", "ip-address", "port", "c", "totalc", "maxc", "sent", "rcvd"
    );
    for (g, group) in snap.groups.iter().enumerate().take(MAX_GROUPS) {
        for (c, ch) in group.channels.iter().enumerate().take(MAX_CHANNELS) {
            let (ip, port) = address(ch.addr);
            let n = counters(table.counters(g, c));
            let _ = writeln!(
                out,
                "{g:3} {:>4} {c:2} {:>3} {ip:>width$} {port:5} {:4} {:11} {:4} {:11} {:11}",
                kind_name(group.kind),
                if ch.enabled { "ENA" } else { "dis" },
                n.current,
                n.total,
                ch.maxc,
                n.sent,
                n.received,
            );
        }
    }
    out
}

/// `show json` (or `show` with `--json`): the same data as one JSON object on one line.
/// Groups without channels are left out; each group and channel carries its number.
pub fn show_json(table: &Table, snap: &Snapshot) -> String {
    let pid = table.header().supervisor_pid.load(Ordering::Relaxed);
    let mut out = format!("{{\"supervisor_pid\":{pid},\"groups\":[");
    let groups = snap
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.channels.is_empty());
    for (i, (g, group)) in groups.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let kind = match group.kind {
            GroupKind::RoundRobin => "rr",
            GroupKind::Hash => "hash",
        };
        let _ = write!(out, "{{\"group\":{g},\"type\":\"{kind}\",\"channels\":[");
        for (c, ch) in group.channels.iter().enumerate() {
            if c > 0 {
                out.push(',');
            }
            // Addresses are printed IP literals (digits, hex, `.`, `:`, `%`): nothing to escape.
            let (addr, port) = match ch.addr {
                Some(_) => {
                    let (ip, port) = address(ch.addr);
                    (format!("\"{ip}\""), port.to_string())
                }
                None => ("null".to_string(), "null".to_string()),
            };
            let n = counters(table.counters(g, c));
            let _ = write!(
                out,
                "{{\"channel\":{c},\"enabled\":{},\"address\":{addr},\"port\":{port},\
                 \"current\":{},\"total\":{},\"maxc\":{},\"sent\":{},\"received\":{}}}",
                ch.enabled, n.current, n.total, ch.maxc, n.sent, n.received
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    out
}

/// Totals over every channel, for `stats`.
struct Totals {
    groups: usize,
    channels: usize,
    enabled: usize,
    current: u64,
    total: u64,
    sent: u64,
    received: u64,
}

fn totals(table: &Table, snap: &Snapshot) -> Totals {
    let mut t = Totals {
        groups: 0,
        channels: 0,
        enabled: 0,
        current: 0,
        total: 0,
        sent: 0,
        received: 0,
    };
    for (g, group) in snap.groups.iter().enumerate() {
        if group.channels.is_empty() {
            continue;
        }
        t.groups += 1;
        for (c, ch) in group.channels.iter().enumerate() {
            let n = counters(table.counters(g, c));
            t.channels += 1;
            t.enabled += usize::from(ch.enabled);
            // Modulo 2^64, like the counters themselves (a table written by hand can hold
            // anything).
            t.current = t.current.wrapping_add(u64::from(n.current));
            t.total = t.total.wrapping_add(n.total);
            t.sent = t.sent.wrapping_add(n.sent);
            t.received = t.received.wrapping_add(n.received);
        }
    }
    t
}

/// `stats`: the whole instance at a glance.
pub fn stats(table: &Table, snap: &Snapshot) -> String {
    let t = totals(table, snap);
    let pid = table.header().supervisor_pid.load(Ordering::Relaxed);
    format!(
        "supervisor pid {pid}\n\
         groups {}, channels {} ({} enabled)\n\
         connections: {} open, {} in total\n\
         bytes: {} sent, {} received\n",
        t.groups, t.channels, t.enabled, t.current, t.total, t.sent, t.received
    )
}

/// `stats json`: the same as one JSON object on one line.
pub fn stats_json(table: &Table, snap: &Snapshot) -> String {
    let t = totals(table, snap);
    let pid = table.header().supervisor_pid.load(Ordering::Relaxed);
    format!(
        "{{\"supervisor_pid\":{pid},\"groups\":{},\"channels\":{},\"enabled\":{},\
         \"current\":{},\"total\":{},\"sent\":{},\"received\":{}}}\n",
        t.groups, t.channels, t.enabled, t.current, t.total, t.sent, t.received
    )
}

/// `mrtg-bytes`: MRTG's external-script answer: incoming (backend → client), outgoing,
/// uptime and name (the original prints UNKNOWN for uptime).
pub fn mrtg_bytes(table: &Table, g: usize, c: usize) -> String {
    let n = counters(table.counters(g, c));
    format!(
        "{}\n{}\nUNKNOWN\ngroup {g} channel {c}\n",
        n.received, n.sent
    )
}

/// `mrtg-conns`: total connections as MRTG's first value; the second is unknown.
pub fn mrtg_conns(table: &Table, g: usize, c: usize) -> String {
    let n = counters(table.counters(g, c));
    format!("{}\nUNKNOWN\nUNKNOWN\ngroup {g} channel {c}\n", n.total)
}

/// `version`. The two MAX lines keep the original's shape: scripts grep them.
pub fn version() -> String {
    format!(
        "  This is balance {}\n  MAXGROUPS={MAX_GROUPS}\n  MAXCHANNELS={MAX_CHANNELS}\n",
        crate::VERSION
    )
}

/// Printed once by `-i` before the first prompt.
pub fn banner(table: &Table, path: &Path) -> String {
    let pid = table.header().supervisor_pid.load(Ordering::Relaxed);
    let access = if table.is_writable() {
        "read-write"
    } else {
        "read-only"
    };
    format!(
        "\nbalance {} control shell; \"help\" lists the commands.\n\
         PID of master process is {pid}\n\
         Table {} ({access}).\n\n",
        crate::VERSION,
        path.display()
    )
}

pub fn prompt(group: usize) -> String {
    format!("balance[{group}] ")
}

/// `help` and `?`.
pub const HELP: &str = "\
Commands act on the current group (see `group`); <ch> is a channel number in it.
Any leading part of a command name will do; ties go to the first name in the original's
order, not this list's (so `s` is show, `k` is kill, `r` is reset, `ha` is hash).
  show [json]               every channel of every group, with state and counters
  stats [json]              totals: channels, open and total connections, bytes
  group <g>                 make <g> the current group (shown in the prompt)
  enable <ch>               give new connections to <ch> again
  disable <ch>              stop giving new connections to <ch>; open ones carry on
  maxc <ch> <n>             allow <ch> at most <n> connections (0 means no limit)
  reset <ch>                zero the totalc, sent and rcvd counters of <ch>
  create <host> <port>      add a channel (disabled until enabled) to the current group
  assign <ch> <host> <port> point the disabled channel <ch> at another backend
  hash                      current group picks channels by client address
  rr                        current group picks channels in turn (round robin)
  mrtg-bytes <g> <ch>       bytes in and out of a channel, for MRTG
  mrtg-conns <g> <ch>       connections made through a channel, for MRTG
  kill                      shut balance down and leave the shell
  version                   version and table limits
  help, ?                   this list
  quit                      leave the shell
<host> may carry the port (host:port, [v6-address]:port); then <port> can be left out.
Without write access to the table only show, stats, group, mrtg-*, version, help and
quit work.
";
