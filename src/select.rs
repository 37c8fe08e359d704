//! Channel choice: which channels a new connection tries, in which order.
//!
//! The rules are the original's (reference §3), with its bugs fixed:
//! - groups are tried in order, group 0 first; a later group only when every candidate of
//!   the earlier ones was unusable or failed;
//! - a round-robin group starts at its cursor and goes round the whole group once;
//! - a hash group starts at `hash(client address) mod n`; only that channel is tried unless
//!   hash failover (`-H`) is on, then the rest of the group follows in order;
//! - a channel is a candidate only while it is usable: enabled, with a valid address and a
//!   non-negative maxc (admission against maxc itself happens atomically when the worker
//!   reserves the slot). The original also fell through to disabled channels of later groups
//!   and hashed stack garbage there; here every group is judged by the same rule.
//!
//! This module is pure: it reads a snapshot and the cursors, and returns the candidate list.

use std::net::IpAddr;

use crate::table::{ChannelConfig, GroupKind, Snapshot};

/// One candidate channel: (group index, channel index).
pub type Candidate = (usize, usize);

/// The original's hash, applied to the client's address in IPv6 form (IPv4 as v4-mapped),
/// followed by the 12 zero bytes the original's dual-stack listener hashed as well: so
/// wherever the original hashed real addresses, the same client lands on the same channel.
pub fn client_hash(ip: IpAddr) -> u32 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_ipv6_mapped(),
            None => v6,
        },
    };
    v6.octets()
        .iter()
        .chain([0u8; 12].iter())
        // The original folded signed chars: bytes ≥ 0x80 count negative.
        .fold(0u32, |h, &b| {
            h.wrapping_mul(31).wrapping_add(b as i8 as i32 as u32)
        })
}

/// Whether a channel may be tried at all (admission against maxc comes later, atomically).
pub fn usable(ch: &ChannelConfig) -> bool {
    ch.enabled && ch.addr.is_some() && ch.maxc >= 0
}

/// The ordered candidates for a new connection from a client whose address hashes to `hash`.
/// `cursor(g)` gives group g's round-robin start.
pub fn candidates(
    snap: &Snapshot,
    hash: u32,
    hash_failover: bool,
    cursor: impl Fn(usize) -> u32,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (g, group) in snap.groups.iter().enumerate() {
        let n = group.channels.len();
        if n == 0 {
            continue;
        }
        let (start, whole_group) = match group.kind {
            GroupKind::RoundRobin => (cursor(g) as usize % n, true),
            GroupKind::Hash => (hash as usize % n, hash_failover),
        };
        let span = if whole_group { n } else { 1 };
        out.extend(
            (0..span)
                .map(|i| (start + i) % n)
                .filter(|&c| usable(&group.channels[c]))
                .map(|c| (g, c)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::GroupConfig;
    use std::net::SocketAddr;

    fn ch(enabled: bool, maxc: i32) -> ChannelConfig {
        ChannelConfig {
            enabled,
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
            maxc,
        }
    }

    fn snap(groups: Vec<(GroupKind, Vec<ChannelConfig>)>) -> Snapshot {
        Snapshot {
            seq: 0,
            groups: groups
                .into_iter()
                .map(|(kind, channels)| GroupConfig { kind, channels })
                .collect(),
        }
    }

    #[test]
    fn hash_matches_the_originals_dual_stack_values() {
        // Reference §3.3, observed on the original with -6.
        let cases = [
            ("127.0.0.1", 3231995906u32),
            ("127.0.0.2", 2938592899),
            ("127.0.0.3", 2645189892),
            ("127.0.0.4", 2351786885),
            ("127.0.0.5", 2058383878),
            ("127.1.2.3", 3141624451),
            ("127.255.255.254", 3110211743),
            ("::1", 4001564289),
        ];
        for (ip, h) in cases {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(client_hash(ip), h, "{ip}");
        }
        assert_eq!(client_hash("127.0.0.1".parse().unwrap()) % 3, 2);
        // A v4 client seen on a dual-stack socket hashes like the plain v4 address.
        assert_eq!(
            client_hash("::ffff:127.0.0.2".parse().unwrap()),
            client_hash("127.0.0.2".parse().unwrap())
        );
    }

    #[test]
    fn round_robin_starts_at_cursor_and_skips_unusable() {
        let s = snap(vec![(
            GroupKind::RoundRobin,
            vec![ch(true, 0), ch(false, 0), ch(true, -1), ch(true, 2)],
        )]);
        assert_eq!(candidates(&s, 0, false, |_| 0), vec![(0, 0), (0, 3)]);
        assert_eq!(candidates(&s, 0, false, |_| 2), vec![(0, 3), (0, 0)]);
        assert_eq!(candidates(&s, 0, false, |_| 9), vec![(0, 3), (0, 0)]);
        assert_eq!(candidates(&s, 0, false, |_| 4), vec![(0, 0), (0, 3)]);
    }

    #[test]
    fn hash_group_tries_one_channel_unless_failover() {
        let s = snap(vec![
            (GroupKind::Hash, vec![ch(true, 0), ch(true, 0), ch(true, 0)]),
            (GroupKind::RoundRobin, vec![ch(true, 0)]),
        ]);
        assert_eq!(candidates(&s, 4, false, |_| 0), vec![(0, 1), (1, 0)]);
        assert_eq!(
            candidates(&s, 4, true, |_| 0),
            vec![(0, 1), (0, 2), (0, 0), (1, 0)]
        );
        let dead = snap(vec![
            (GroupKind::Hash, vec![ch(true, 0), ch(false, 0)]),
            (GroupKind::RoundRobin, vec![ch(true, 0)]),
        ]);
        assert_eq!(candidates(&dead, 1, false, |_| 0), vec![(1, 0)]);
        assert_eq!(candidates(&dead, 1, true, |_| 0), vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn empty_and_disabled_groups_never_crash_or_leak_through() {
        // The original divided by zero on an empty hash group and used disabled channels of
        // later groups on fall-through.
        let s = snap(vec![
            (GroupKind::Hash, vec![]),
            (GroupKind::RoundRobin, vec![ch(false, 0), ch(true, 0)]),
        ]);
        assert_eq!(candidates(&s, 12345, true, |_| 0), vec![(1, 1)]);
        let none = snap(vec![(GroupKind::RoundRobin, vec![ch(false, 0)])]);
        assert!(candidates(&none, 0, false, |_| 0).is_empty());
    }
}
