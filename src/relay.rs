//! The only place bytes move between a client and its backend.
//!
//! Each direction is pumped independently (a client that keeps uploading while the backend
//! sends a large reply never stalls either side: the original's relay could deadlock there),
//! half-close is passed on (EOF from one side becomes `shutdown(SHUT_WR)` towards the other,
//! and the reverse direction keeps flowing), bytes are counted per chunk with relaxed atomics,
//! and an optional idle timeout ends a connection on which nothing moved in either direction.
//! A direction's buffer is allocated only once data first arrives on it.
//!
//! With `-p`, every read is also written to stdout in the original's packet-dump format.

use std::cell::Cell;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

const CHUNK: usize = 32 * 1024;

/// Direction of a relayed chunk, as the dump labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend (`->`).
    Up,
    /// Backend → client (`-<`).
    Down,
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both sides closed their sending direction.
    Closed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// A read or write failed (reset, broken pipe…).
    Error(io::Error),
}

/// What one relayed connection did.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// Bytes client → backend.
    pub up: u64,
    /// Bytes backend → client.
    pub down: u64,
}

/// Relays until both directions are done, one fails, or the idle timeout expires.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    sent: &AtomicU64,
    received: &AtomicU64,
    idle: Option<Duration>,
    dump: bool,
) -> Outcome {
    let activity = Cell::new(Instant::now());
    let (up_bytes, down_bytes) = (Cell::new(0u64), Cell::new(0u64));
    let up = pump(
        client,
        backend,
        (sent, &up_bytes),
        &activity,
        dump.then_some(Direction::Up),
    );
    let down = pump(
        backend,
        client,
        (received, &down_bytes),
        &activity,
        dump.then_some(Direction::Down),
    );
    let both = async { tokio::try_join!(up, down) };
    let finished = async {
        match both.await {
            Ok(_) => Ending::Closed,
            Err(e) => Ending::Error(e),
        }
    };
    let ending = match idle {
        None => finished.await,
        Some(limit) => {
            tokio::select! {
                ending = finished => ending,
                () = idle_expiry(&activity, limit) => Ending::IdleTimeout,
            }
        }
    };
    Outcome {
        ending,
        up: up_bytes.get(),
        down: down_bytes.get(),
    }
}

/// Completes once `limit` has passed since the last recorded activity.
async fn idle_expiry(activity: &Cell<Instant>, limit: Duration) {
    loop {
        let deadline = activity.get() + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Copies one direction until EOF (then half-closes `dst`) or an error.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (counter, local): (&AtomicU64, &Cell<u64>),
    activity: &Cell<Instant>,
    dump: Option<Direction>,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0; CHUNK];
        }
        let n = match src.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                if let Some(dir) = dump {
                    write_dump(dir, None);
                }
                return Err(e);
            }
        };
        if let Some(dir) = dump {
            write_dump(dir, Some(&buf[..n]));
        }
        if n == 0 {
            // Half-close: the peer may still answer on the other direction.
            let _ = nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(());
        }
        write_all(dst, &buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        local.set(local.get() + n as u64);
        activity.set(Instant::now());
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_dump(dir: Direction, data: Option<&[u8]>) {
    let block = format_dump(dir, data);
    let mut out = io::stdout().lock();
    let _ = out.write_all(block.as_bytes());
    let _ = out.flush();
}

/// One read in the original's `-p` format: a header `-> N` / `-< N` (N = -1 for an error),
/// then the bytes with printable ASCII as is, `\` doubled, anything else as `\XX`; a line
/// break after each `\0A` and whenever the line grows past 80 columns; then a newline.
pub fn format_dump(dir: Direction, data: Option<&[u8]>) -> String {
    let arrow = match dir {
        Direction::Up => "->",
        Direction::Down => "-<",
    };
    let len = data.map_or(-1, |d| d.len() as i64);
    let mut out = format!("{arrow} {len}\n");
    let mut col = 0usize;
    for &b in data.unwrap_or(&[]) {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:02X}")),
        }
        col += match b {
            b'\\' => 2,
            0x20..=0x7e => 1,
            _ => 3,
        };
        if b == b'\n' || col > 80 {
            out.push('\n');
            col = 0;
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_matches_the_original() {
        let data = b"hello\tworld\\ \x01\xff\x7f~\r\nline2\n";
        assert_eq!(
            format_dump(Direction::Up, Some(data)),
            "-> 25\nhello\\09world\\\\ \\01\\FF\\7F~\\0D\\0A\nline2\\0A\n\n"
        );
        assert_eq!(format_dump(Direction::Up, Some(b"")), "-> 0\n\n");
        assert_eq!(format_dump(Direction::Down, None), "-< -1\n\n");
    }

    #[test]
    fn dump_wraps_long_lines_after_81_columns() {
        let mut data = vec![b'A'; 100];
        data.push(b'\n');
        data.extend(0u8..=0x27);
        let expected = format!(
            "-> 141\n{}\n{}\\0A\n{}\\0A\n{} !\"#$%&'\n",
            "A".repeat(81),
            "A".repeat(19),
            (0..10).map(|b| format!("\\{b:02X}")).collect::<String>(),
            (0x0b..0x20)
                .map(|b| format!("\\{b:02X}"))
                .collect::<String>(),
        );
        assert_eq!(format_dump(Direction::Up, Some(&data)), expected);
    }
}
