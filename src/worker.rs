//! A worker process: the code that touches client bytes.
//!
//! Started by the supervisor as `balance --worker` (its own image, exec'd fresh) with the
//! supervisor channel on fd 3, a worker runs in three steps, like every balance process:
//! 1. receive what it needs: a `Start` message carrying its settings, the listening
//!    socket(s) and the table;
//! 2. lock itself down (`sandbox::lock_down_worker`) before it reads a single client byte;
//! 3. run a single-threaded event loop: accept → pick a channel → connect with failover →
//!    relay → account (see [`serve`], which reads top to bottom).
//!
//! A worker never resolves names, opens files or takes the table lock: it reads the
//! configuration through the seqlock, admits against maxc with atomics, and asks the
//! supervisor to disable a failed channel (`-a`). It exits when the supervisor's channel closes.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram as StdDatagram;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixDatagram};

use crate::ipc::{self, Message, Priority, WorkerConfig};
use crate::relay::{self, Ending};
use crate::select;
use crate::table::{GroupKind, Snapshot, Table};

/// The supervisor channel's descriptor number in a worker.
pub const CHANNEL_FD: i32 = 3;

#[derive(Debug)]
pub struct WorkerError(pub String);

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker: {}", self.0)
    }
}

impl std::error::Error for WorkerError {}

fn fail(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError(format!("{what}: {e}"))
}

/// Everything a connection needs, shared by the worker's tasks.
struct Context {
    config: WorkerConfig,
    /// This worker's row in the table's per-worker counts.
    row: usize,
    /// Connections being served; a draining worker exits when it reaches zero.
    active: std::cell::Cell<usize>,
    idle: tokio::sync::Notify,
    table: Table,
    channel: UnixDatagram,
    cache: std::cell::RefCell<Option<Rc<Snapshot>>>,
    /// Spare pipes and the scratch buffer of the relay.
    spares: relay::Spares,
    /// When "maxc reached" was last logged, per channel.
    full_logged:
        std::cell::RefCell<std::collections::HashMap<(usize, usize), tokio::time::Instant>>,
}

const FULL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The worker's entry point; returns only on a start-up error.
pub fn run() -> Result<(), WorkerError> {
    let channel = crate::sys::take_inherited_fd(CHANNEL_FD)
        .map_err(|e| fail("supervisor channel missing", e))?;
    let channel = StdDatagram::from(channel);
    let (config, listeners, table_fd) = receive_start(&channel)?;
    let table = Table::open(&File::from(table_fd), true).map_err(|e| fail("table", e))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("runtime", e))?;
    channel
        .set_nonblocking(true)
        .map_err(|e| fail("channel", e))?;
    for l in &listeners {
        l.set_nonblocking(true).map_err(|e| fail("listener", e))?;
    }

    let filter = crate::sandbox::worker_filter(config.source.is_some())
        .map_err(|e| fail("seccomp policy", e))?;
    let landlock = crate::sandbox::lock_down_worker(&config.connect_ports, &filter)
        .map_err(|e| fail("lockdown", e))?;
    let landlock = match landlock {
        crate::sandbox::Landlock::Full => None,
        crate::sandbox::Landlock::Partial(what) => Some(format!("partly enforced ({what})")),
        crate::sandbox::Landlock::Unavailable => Some("not available".to_string()),
    };

    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let channel = UnixDatagram::from_std(channel).map_err(|e| fail("channel", e))?;
        let ctx = Rc::new(Context {
            row: config.row as usize,
            active: std::cell::Cell::new(0),
            idle: tokio::sync::Notify::new(),
            config,
            table,
            channel,
            cache: std::cell::RefCell::new(None),
            full_logged: std::cell::RefCell::new(std::collections::HashMap::new()),
            spares: relay::Spares::default(),
        });
        let mut accepting = Vec::new();
        for l in listeners {
            let l = TcpListener::from_std(l).map_err(|e| fail("listener", e))?;
            accepting.push(tokio::task::spawn_local(accept_loop(Rc::clone(&ctx), l)));
        }
        ipc::send(&ctx.channel, &Message::Ready { landlock }, &[])
            .await
            .map_err(|e| fail("ready", e))?;
        if watch_supervisor(&ctx).await == Watch::Drain {
            // Stop accepting (other workers share the listening socket and go on), finish
            // the connections in progress, then exit.
            for task in &accepting {
                task.abort();
            }
            while ctx.active.get() > 0 {
                let idle = ctx.idle.notified();
                tokio::select! {
                    () = idle => {}
                    Err(_) = ipc::recv(&ctx.channel) => break,
                }
            }
        }
        Ok(())
    })
}

/// Waits for the `Start` message and checks its descriptors.
fn receive_start(
    channel: &StdDatagram,
) -> Result<(WorkerConfig, Vec<std::net::TcpListener>, OwnedFd), WorkerError> {
    let (msg, mut fds) = ipc::recv_blocking(channel).map_err(|e| fail("start message", e))?;
    let Message::Start(config) = msg else {
        return Err(WorkerError("first message was not Start".into()));
    };
    if config.listeners == 0 || fds.len() != config.listeners as usize + 1 {
        return Err(WorkerError(format!(
            "expected {} listeners and the table, got {} descriptors",
            config.listeners,
            fds.len()
        )));
    }
    let table = fds
        .pop()
        .ok_or_else(|| WorkerError("no table descriptor".into()))?;
    let listeners = fds.into_iter().map(std::net::TcpListener::from).collect();
    Ok((config, listeners, table))
}

#[derive(Debug, PartialEq, Eq)]
enum Watch {
    /// The supervisor went away (its end of the channel closed): exit at once.
    Gone,
    /// The supervisor is replacing this worker.
    Drain,
}

/// Waits for the supervisor's next instruction.
async fn watch_supervisor(ctx: &Context) -> Watch {
    loop {
        match ipc::recv(&ctx.channel).await {
            Ok((Message::Drain, _)) => return Watch::Drain,
            Ok(_) => continue,
            Err(_) => return Watch::Gone,
        }
    }
}

async fn accept_loop(ctx: Rc<Context>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::task::spawn_local(serve(Rc::clone(&ctx), client, peer));
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                ctx.debug(format_args!("accept error {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection, start to end.
async fn serve(ctx: Rc<Context>, client: TcpStream, peer: SocketAddr) {
    let _active = Active::enter(&ctx);
    ctx.debug(format_args!("connect from {peer}"));
    let snap = ctx.snapshot();
    let hash = select::client_hash(peer.ip());
    let candidates = select::candidates(&snap, hash, ctx.config.hash_failover, |g| {
        ctx.table.layout().groups[g].cursor.load(Ordering::Relaxed)
    });
    let Some((slot, backend)) = connect_with_failover(&ctx, &snap, &candidates).await else {
        ctx.log(
            Priority::Warning,
            format!("no channel could take the connection from {peer}"),
        );
        return;
    };
    // Nothing of the choice is needed while the bytes flow.
    drop(candidates);
    // The client socket inherited both options from the listener (see the bootstrap).
    let _ = backend.set_nodelay(true);
    let _ = nix::sys::socket::setsockopt(&backend, nix::sys::socket::sockopt::KeepAlive, &true);
    let Some(channel) = ctx.table.channel(slot.group, slot.channel) else {
        return;
    };
    channel.total.fetch_add(1, Ordering::Relaxed);
    let (group, channel_index) = (slot.group, slot.channel);
    let idle = ctx.config.idle_timeout_secs.map(Duration::from_secs);
    let started = tokio::time::Instant::now();
    let outcome = relay::relay(
        &client,
        &backend,
        (&channel.sent, &channel.received),
        idle,
        ctx.config.dump,
        &ctx.spares,
    )
    .await;
    drop(slot);
    if !ctx.config.debug && !ctx.config.log_connections {
        return;
    }
    let how = match &outcome.ending {
        Ending::Closed => "closed".to_string(),
        Ending::IdleTimeout => format!(
            "timed out after {} seconds",
            ctx.config.idle_timeout_secs.unwrap_or(0)
        ),
        Ending::Error(e) => format!("ended: {e}"),
    };
    ctx.debug(format_args!("connection from {peer} {how}"));
    if ctx.config.log_connections {
        let addr = snap.groups[group].channels[channel_index]
            .addr
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        ctx.log(
            Priority::Info,
            format!(
                "connection from {peer} via group {} channel {} ({addr}): {} bytes up, {} bytes down, {:.3}s, {how}",
                group,
                channel_index,
                outcome.up,
                outcome.down,
                started.elapsed().as_secs_f64()
            ),
        );
    }
}

/// Counts a connection in progress for draining.
struct Active<'a>(&'a Context);

impl<'a> Active<'a> {
    fn enter(ctx: &'a Context) -> Active<'a> {
        ctx.active.set(ctx.active.get() + 1);
        Active(ctx)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let n = self.0.active.get().saturating_sub(1);
        self.0.active.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A reserved connection slot on a channel; given back when dropped.
struct Slot<'a> {
    ctx: &'a Context,
    group: usize,
    channel: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.ctx
            .table
            .release(self.ctx.row, self.group, self.channel);
    }
}

/// Tries the candidates in order until one connects.
async fn connect_with_failover<'a>(
    ctx: &'a Context,
    snap: &Snapshot,
    candidates: &[select::Candidate],
) -> Option<(Slot<'a>, TcpStream)> {
    let timeout = Duration::from_secs(ctx.config.connect_timeout_secs);
    for (i, &(g, c)) in candidates.iter().enumerate() {
        let group = &snap.groups[g];
        let ch = &group.channels[c];
        let Some(addr) = ch.addr else {
            continue;
        };
        if !ctx.table.reserve(ctx.row, g, c, ch.maxc) {
            ctx.debug(format_args!("group {g} channel {c} is full"));
            ctx.note_full(g, c, ch.maxc);
            continue;
        }
        let slot = Slot {
            ctx,
            group: g,
            channel: c,
        };
        if group.kind == GroupKind::RoundRobin {
            let next = ((c + 1) % group.channels.len()) as u32;
            ctx.table.layout().groups[g]
                .cursor
                .store(next, Ordering::Relaxed);
        }
        ctx.debug(format_args!("trying group {g} channel {c} ({addr}) ..."));
        let reason = match tokio::time::timeout(timeout, connect(addr, ctx.config.source)).await {
            Ok(Ok(stream)) => {
                ctx.debug(format_args!("connect to group {g} channel {c} successful"));
                return Some((slot, stream));
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EACCES) => {
                // A port added at run time that this worker's sandbox predates: the
                // supervisor is replacing the workers. Not the channel's fault.
                ctx.debug(format_args!(
                    "group {g} channel {c}: port {} not admitted by this worker's sandbox yet",
                    addr.port()
                ));
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timeout after {}s", timeout.as_secs()),
        };
        drop(slot);
        let next = match candidates.get(i + 1) {
            Some((ng, nc)) => format!("failing over to group {ng} channel {nc}"),
            None => "no channel left to try".to_string(),
        };
        ctx.log(
            Priority::Notice,
            format!("connection failed group {g} channel {c} ({addr}): {reason}; {next}"),
        );
        if ctx.config.autodisable {
            ctx.notify(Message::Disable {
                group: g as u32,
                channel: c as u32,
            });
        }
    }
    None
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(src) = source {
        if src.is_ipv4() == addr.is_ipv4() {
            socket.bind(SocketAddr::new(src, 0))?;
        }
    }
    socket.connect(addr).await
}

impl Context {
    /// The configuration, re-read only when the table's seqlock moved.
    fn snapshot(&self) -> Rc<Snapshot> {
        let seq = self.table.seq();
        if let Some(s) = self.cache.borrow().as_ref() {
            if s.seq == seq {
                return Rc::clone(s);
            }
        }
        match self.table.snapshot() {
            Some(s) => {
                let s = Rc::new(s);
                *self.cache.borrow_mut() = Some(Rc::clone(&s));
                s
            }
            // A writer is stuck mid-update: keep the last good copy, or (a worker started
            // meanwhile) read the table as it stands.
            None => self
                .cache
                .borrow()
                .clone()
                .unwrap_or_else(|| Rc::new(self.table.snapshot_or_torn())),
        }
    }

    /// `-d` lines go straight to our stderr (the supervisor's, in the foreground; /dev/null
    /// when detached).
    fn debug(&self, args: std::fmt::Arguments<'_>) {
        if self.config.debug {
            eprintln!("{args}");
        }
    }

    fn log(&self, priority: Priority, text: String) {
        self.notify(Message::Log { priority, text });
    }

    /// Logs that a channel turned a connection away because of maxc, at most once a second
    /// per channel (under load this would otherwise be a line per connection).
    fn note_full(&self, g: usize, c: usize, maxc: i32) {
        let now = tokio::time::Instant::now();
        let mut last = self.full_logged.borrow_mut();
        let entry = last.entry((g, c)).or_insert(now - FULL_LOG_INTERVAL);
        if now.duration_since(*entry) >= FULL_LOG_INTERVAL {
            *entry = now;
            self.log(
                Priority::Notice,
                format!("group {g} channel {c} reached maxc {maxc}; trying the next channel"),
            );
        }
    }

    /// Sends a message to the supervisor without waiting; a full channel drops it.
    fn notify(&self, msg: Message) {
        if let Ok(bytes) = ipc::encode(&msg) {
            let _ = self.channel.try_send(&bytes);
        }
    }
}
