//! Messages between the supervisor and its workers, over a `SOCK_SEQPACKET` socketpair.
//!
//! All messages are one enum, encoded with postcard; descriptors travel beside them as
//! `SCM_RIGHTS`. Workers exec the supervisor's own image, so both ends always agree on the
//! enum and no version handshake is needed. Decoding is strict: a message that filled the
//! receive buffer (SEQPACKET would have truncated it silently) or that leaves bytes after the
//! postcard value is rejected, and so is an unexpected number of descriptors.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

/// Largest encoded message; receive buffers are one byte larger to detect truncation.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors one message may carry (listeners + the table).
pub const MAX_FDS: usize = 8;

/// What a worker needs to run, sent once at start with its descriptors: the listening
/// socket(s) first, the table last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// This worker's row in the table's per-worker counts (unique among live workers).
    pub row: u32,
    pub listeners: u32,
    pub connect_timeout_secs: u64,
    pub idle_timeout_secs: Option<u64>,
    pub half_close_timeout_secs: Option<u64>,
    pub autodisable: bool,
    pub hash_failover: bool,
    /// `-B`, already resolved by the bootstrap (workers never resolve names).
    pub source: Option<IpAddr>,
    pub debug: bool,
    pub dump: bool,
    /// `--log-connections`: one log line per relayed connection.
    pub log_connections: bool,
    /// Ports the sandbox lets the worker connect to: every channel's port when it started.
    pub connect_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // supervisor → worker
    /// Carries the listeners and the table as descriptors.
    Start(WorkerConfig),
    /// Stop accepting, finish the connections in progress, then exit (a replacement runs).
    Drain,

    // worker → supervisor
    /// The worker is locked down and accepting. `landlock` says what the kernel could not
    /// enforce (None: everything).
    Ready { landlock: Option<String> },
    /// `-a`: a connect to this channel, at this address, failed; the supervisor disables it
    /// in the table unless it has been given another address since.
    Disable {
        group: u32,
        channel: u32,
        addr: SocketAddr,
    },
    /// A line for the log (syslog, or stderr in the foreground).
    Log { priority: Priority, text: String },
    /// The worker has stopped accepting (out of descriptors, or draining). Connections
    /// queued on the listeners may have woken only this worker: the others should take them.
    StoppedAccepting,

    // supervisor → worker
    /// Another worker stopped accepting: accept what is queued on the listeners.
    Accept,

    // worker → supervisor (last, so that the variants before keep their numbers)
    /// A log line that could come once per connection, which the supervisor throttles
    /// across workers; logged at its kind's priority.
    Notice { text: String, line: NoticeLine },
}

/// The notices that are throttled: at most one a second per kind and channel, in each
/// worker and again in the supervisor across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Notice {
    /// The channel reached maxc.
    Full,
    /// A connect to the channel failed.
    Failed,
    /// No socket could be opened for the channel: the worker is out of descriptors.
    Shortage,
    /// The worker stopped accepting: it is out of descriptors (not about a channel).
    Saturated,
    /// The `-B` source address could not be bound (not about a channel).
    Source,
    /// No channel could take a client: every one is disabled, full or failing.
    NoChannel,
}

impl Notice {
    pub fn priority(self) -> Priority {
        match self {
            Notice::NoChannel => Priority::Warning,
            _ => Priority::Notice,
        }
    }

    /// News about one worker (its own descriptors), throttled per worker; the others are
    /// about a channel or the instance, whichever worker meets them.
    pub fn per_worker(self) -> bool {
        matches!(self, Notice::Shortage | Notice::Saturated)
    }
}

/// What makes a log line a throttled notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeLine {
    pub kind: Notice,
    /// The channel (group, index) it is about, if any.
    pub channel: Option<(u16, u16)>,
    /// How many like it this worker held back since it last sent one.
    pub held: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Priority {
    Critical,
    Error,
    Warning,
    Notice,
    Info,
    Debug,
}

#[derive(Debug)]
pub enum IpcError {
    Io(io::Error),
    /// The peer closed its end.
    Closed,
    Malformed(&'static str),
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpcError::Io(e) => write!(f, "{e}"),
            IpcError::Closed => write!(f, "peer closed the channel"),
            IpcError::Malformed(why) => write!(f, "malformed message: {why}"),
        }
    }
}

impl std::error::Error for IpcError {}

impl From<io::Error> for IpcError {
    fn from(e: io::Error) -> Self {
        IpcError::Io(e)
    }
}

pub fn encode(msg: &Message) -> Result<Vec<u8>, IpcError> {
    let bytes = postcard::to_stdvec(msg).map_err(|_| IpcError::Malformed("unencodable"))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(IpcError::Malformed("message too long"));
    }
    Ok(bytes)
}

/// Decodes exactly one message; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Message, IpcError> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(bytes)
        .map_err(|_| IpcError::Malformed("undecodable"))?;
    if !rest.is_empty() {
        return Err(IpcError::Malformed("trailing bytes"));
    }
    Ok(msg)
}

/// Checks a received packet: not truncated, decodable, and its descriptors set close-on-exec.
fn accept_packet(buf: &[u8], n: usize, raw: &[RawFd]) -> Result<(Message, Vec<OwnedFd>), IpcError> {
    let fds = crate::sys::own_received_fds(raw);
    for fd in &fds {
        use std::os::fd::AsFd;
        crate::sys::set_cloexec(fd.as_fd())?;
    }
    if n == 0 {
        return Err(IpcError::Closed);
    }
    if n >= buf.len() {
        return Err(IpcError::Malformed(
            "message filled the buffer (truncated?)",
        ));
    }
    Ok((decode(&buf[..n])?, fds))
}

/// Blocking send on a std socket (used before a runtime exists).
pub fn send_blocking(
    sock: &std::os::unix::net::UnixDatagram,
    msg: &Message,
    fds: &[RawFd],
) -> Result<(), IpcError> {
    sock.send_with_fd(&encode(msg)?, fds)?;
    Ok(())
}

/// Blocking receive on a std socket.
pub fn recv_blocking(
    sock: &std::os::unix::net::UnixDatagram,
) -> Result<(Message, Vec<OwnedFd>), IpcError> {
    loop {
        if let Some(received) = recv_packet(sock)? {
            return Ok(received);
        }
    }
}

/// Receives one message from a non-blocking std socket; None when none is waiting.
pub fn try_recv(
    sock: &std::os::unix::net::UnixDatagram,
) -> Result<Option<(Message, Vec<OwnedFd>)>, IpcError> {
    recv_packet(sock)
}

/// Receives and checks one packet; None when none was waiting or the call was interrupted.
fn recv_packet(sock: &impl RecvWithFd) -> Result<Option<(Message, Vec<OwnedFd>)>, IpcError> {
    let mut buf = [0u8; MAX_MESSAGE + 1];
    let mut raw = [0 as RawFd; MAX_FDS];
    match sock.recv_with_fd(&mut buf, &mut raw) {
        Ok((n, nfds)) => accept_packet(&buf, n, &raw[..nfds]).map(Some),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        // The peer closed its end before reading what was sent to it: closed all the same.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(IpcError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Sends on a tokio socket if there is room now; a full socket drops the message.
pub fn try_send(sock: &tokio::net::UnixDatagram, msg: &Message) -> Result<(), IpcError> {
    sock.try_send(&encode(msg)?)?;
    Ok(())
}

/// Sends on a tokio socket, waiting for room.
pub async fn send(
    sock: &tokio::net::UnixDatagram,
    msg: &Message,
    fds: &[RawFd],
) -> Result<(), IpcError> {
    let bytes = encode(msg)?;
    loop {
        sock.writable().await?;
        match sock.send_with_fd(&bytes, fds) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message from a tokio socket.
pub async fn recv(sock: &tokio::net::UnixDatagram) -> Result<(Message, Vec<OwnedFd>), IpcError> {
    loop {
        sock.readable().await?;
        if let Some(received) = recv_packet(sock)? {
            return Ok(received);
        }
    }
}

/// A connected `SOCK_SEQPACKET` pair, close-on-exec, as std datagram sockets.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair as sp, AddressFamily, SockFlag, SockType};
    let (a, b) = sp(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn round_trip_and_strictness() {
        let msg = Message::Disable {
            group: 3,
            channel: 63,
            addr: "[::1]:25".parse().expect("addr"),
        };
        let bytes = encode(&msg).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), msg);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(IpcError::Malformed(_))));
        assert!(matches!(decode(&bytes[..1]), Err(IpcError::Malformed(_))));
        assert!(matches!(decode(&[0xff; 8]), Err(IpcError::Malformed(_))));
    }

    #[test]
    fn descriptors_and_messages_cross_a_socketpair() {
        let (a, b) = socketpair().expect("socketpair");
        let a = std::os::unix::net::UnixDatagram::from(a);
        let b = std::os::unix::net::UnixDatagram::from(b);
        let file = std::fs::File::open("/dev/null").expect("open");
        let ready = Message::Ready { landlock: None };
        send_blocking(&a, &ready, &[file.as_raw_fd()]).expect("send");
        let (msg, fds) = recv_blocking(&b).expect("recv");
        assert_eq!(msg, ready);
        assert_eq!(fds.len(), 1);
        // Oversized packets are refused rather than silently truncated.
        a.send(&[0u8; MAX_MESSAGE + 10]).expect("send big");
        assert!(matches!(recv_blocking(&b), Err(IpcError::Malformed(_))));
        drop(a);
        assert!(matches!(recv_blocking(&b), Err(IpcError::Closed)));
    }

    #[test]
    fn a_peer_gone_with_messages_unread_is_closed_not_an_error() {
        let (a, b) = socketpair().expect("socketpair");
        let a = std::os::unix::net::UnixDatagram::from(a);
        let b = std::os::unix::net::UnixDatagram::from(b);
        send_blocking(&a, &Message::Accept, &[]).expect("send");
        drop(b);
        assert!(matches!(recv_blocking(&a), Err(IpcError::Closed)));
    }
}
