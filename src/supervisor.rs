//! The supervisor: root bootstrap, then an unprivileged process that keeps the workers alive.
//!
//! [`run`] reads top to bottom like the daemon's life:
//! 1. **bootstrap, as root**: resolve every channel and the `-B` source (workers never resolve
//!    names), bind the listener, prepare the run directory and publish the table, open our own
//!    executable for re-exec; every failure here is reported before the launch returns;
//! 2. **detach** (unless `-f`): fork, `setsid`, and let the launching process wait on a pipe
//!    until the daemon is serving or has failed, so the launch's exit status tells the truth;
//! 3. **drop privileges** to the `balance` user with no capabilities (`sandbox`);
//! 4. **supervise**: spawn the workers (fork + exec of our own image through the fd opened in
//!    step 1), hand them the listener and the table, restart crashed ones with backoff within
//!    a crash budget, apply their `Disable` requests under the table lock, and log for them;
//! 5. **shut down** on SIGTERM/SIGINT or a `kill` from the control shell: stop the workers,
//!    remove the table file.
//!
//! The supervisor never touches client bytes.

mod bootstrap;
mod notices;
mod pool;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};

use crate::cli::ProxyArgs;
use crate::exitcode::{EX_OSERR, EX_SOFTWARE};
use crate::ipc::{Priority, WorkerConfig};
use crate::log::Logger;
use crate::table::MAX_POOL;

pub use bootstrap::{lookup_host, Fatal};

/// How long start-up waits for every worker to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutdown waits for the workers, all sent SIGKILL, to be reaped (one still
/// being started is killed again at the end).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the table's `shutdown` flag.
const KILL_POLL: Duration = Duration::from_millis(200);
/// How soon lines that found syslog's queue full are sent again, and how far that backs
/// off while syslog takes none (as often as the table is looked at: a line waits at most
/// that long once syslog reads again).
const FLUSH_MIN: Duration = Duration::from_millis(2);
const FLUSH_MAX: Duration = KILL_POLL;
/// How long the stopped supervisor waits for syslog to take the lines still waiting.
const LOG_DRAIN: Duration = Duration::from_secs(1);

/// Runs balance in proxy mode; returns when it has shut down.
pub fn run(args: ProxyArgs) -> Result<(), Fatal> {
    // Held until the event loop's handlers are in place (see `supervise`): a stop or reload
    // signal that comes during start-up then waits for them instead of killing the process
    // half started (table and pid file left behind). The launcher unblocks them again.
    stop_signals(SigmaskHow::SIG_BLOCK);
    let _ = crate::sys::ignore_liveness_probe();
    let boot = bootstrap::prepare(&args)?;
    let launcher = if args.foreground {
        None
    } else {
        match bootstrap::detach() {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                // The table is published already: a start that fails here leaves nothing.
                let _ = boot.remove_files(None);
                return Err(e);
            }
        }
    };
    let result = supervise(args, boot, launcher.as_ref());
    match (result, &launcher) {
        (Err(e), Some(pipe)) => {
            // The launching process tells the user; the daemon says nothing more.
            bootstrap::report(pipe, Err(&e));
            Err(Fatal::told(e.code))
        }
        (result, _) => result,
    }
}

/// Blocks or unblocks SIGTERM, SIGINT and SIGHUP for this thread.
pub fn stop_signals(how: SigmaskHow) {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    let _ = nix::sys::signal::sigprocmask(how, Some(&set), None);
}

/// Shared state of the supervisor's tasks.
struct Supervisor {
    boot: bootstrap::Boot,
    template: WorkerConfig,
    /// Detached daemon: workers get /dev/null as stdout and stderr, never the launcher's
    /// terminal or pipe.
    detached: bool,
    logger: RefCell<Logger>,
    stopping: Cell<bool>,
    pool: pool::Pool,
    /// Channel ports new workers may connect to (landlock); grows when channels appear.
    ports: RefCell<BTreeSet<u16>>,
    /// Counts the times `ports` grew.
    ports_version: Cell<u64>,
    /// Table generation last looked at, and the configuration seen then.
    seen_generation: Cell<u32>,
    last_seen: RefCell<crate::table::Snapshot>,
    /// The next audit record of the table's ring to log.
    audit_next: Cell<u64>,
    landlock_warned: Cell<bool>,
    /// The workers' throttled notices, throttled again across workers.
    notices: RefCell<notices::Gate>,
    /// `-a` requests that found the table locked, retried at each tick: one per channel,
    /// the latest failure's address and time.
    pending_disables: RefCell<Vec<PendingDisable>>,
    /// When the wait for the lock was last logged.
    disables_said: Cell<Option<std::time::Instant>>,
    /// Wakes slot tasks out of their restart backoff at shutdown.
    wake: tokio::sync::Notify,
    /// Wakes the log flusher: lines wait for room in syslog's queue.
    log_waiting: tokio::sync::Notify,
}

/// An `-a` request waiting for the table's lock.
#[derive(Clone, Copy)]
struct PendingDisable {
    group: usize,
    channel: usize,
    addr: std::net::SocketAddr,
    /// When the connect failed.
    failed: std::time::Instant,
}

/// How long an `-a` request waits for the table's lock: a failure much older than that
/// says little about the channel now.
const DISABLE_WAIT: Duration = Duration::from_secs(10);

/// Writes our pid to `path`, still as root, and often in a directory the service user owns:
/// a symbolic link, a second hard link or anything but a plain file there is refused rather
/// than written through (it would let that user have root overwrite any file).
fn write_pid_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let refused = |why: &str| std::io::Error::other(why.to_string());
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("it is a symbolic link"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused("not a plain file"));
    }
    if meta.nlink() != 1 {
        return Err(refused("it has other hard links"));
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())
}

fn supervise(
    args: ProxyArgs,
    boot: bootstrap::Boot,
    launcher: Option<&OwnedFd>,
) -> Result<(), Fatal> {
    // A start that fails must leave neither the table nor (once written) the pid file.
    if let Some(path) = &args.pidfile {
        write_pid_file(path)
            .map_err(|e| {
                Fatal::new(
                    EX_OSERR,
                    format!("cannot write pid file {}: {e}", path.display()),
                )
            })
            .inspect_err(|_| {
                let _ = boot.remove_files(None);
            })?;
    }
    let pidfile = args.pidfile.as_deref();
    let abandon = |e: Fatal| {
        let _ = boot.remove_files(pidfile);
        e
    };
    boot.table
        .header()
        .supervisor_pid
        .store(std::process::id(), Ordering::Relaxed);
    let mut logger = Logger::new(
        args.syslog_socket.clone(),
        args.foreground,
        args.common.debug,
    );
    for warning in &boot.warnings {
        logger.log(Priority::Warning, warning);
    }
    match &boot.account {
        Some(account) => {
            crate::sandbox::drop_privileges(account).map_err(|e| {
                abandon(Fatal::new(
                    EX_OSERR,
                    format!("cannot drop privileges to {}: {e}", account.name),
                ))
            })?;
            logger.log(
                Priority::Notice,
                &format!(
                    "privileges dropped to user {} (uid {}, gid {})",
                    account.name, account.uid, account.gid
                ),
            );
        }
        None => {
            let warning = format!(
                "balance: not started as root: running as uid {} without privilege separation",
                nix::unistd::getuid()
            );
            if !args.foreground {
                // The log copies to stderr only in the foreground; say it on the terminal.
                crate::say!("{warning}");
            }
            logger.log(Priority::Warning, &warning);
        }
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, MAX_POOL);
    let last_seen = boot.table.snapshot().ok_or_else(|| {
        abandon(Fatal::new(
            EX_SOFTWARE,
            "balance: the new table is inconsistent",
        ))
    })?;
    let ports = channel_ports(&last_seen);
    let generation = boot.table.header().generation.load(Ordering::Relaxed);
    let sup = Rc::new(Supervisor {
        template: WorkerConfig {
            row: 0,
            listeners: boot.listeners.len() as u32,
            connect_ports: Vec::new(),
            connect_timeout_secs: args.connect_timeout,
            idle_timeout_secs: args.idle_timeout,
            half_close_timeout_secs: args.half_close_timeout,
            autodisable: args.autodisable,
            hash_failover: args.hash_failover,
            source: boot.source,
            debug: args.common.debug,
            dump: args.dump,
            log_connections: args.log_connections,
        },
        detached: launcher.is_some(),
        boot,
        logger: RefCell::new(logger),
        stopping: Cell::new(false),
        pool: pool::Pool::new(workers),
        ports: RefCell::new(ports),
        ports_version: Cell::new(0),
        seen_generation: Cell::new(generation),
        last_seen: RefCell::new(last_seen),
        audit_next: Cell::new(0),
        landlock_warned: Cell::new(false),
        notices: RefCell::new(notices::Gate::default()),
        pending_disables: RefCell::new(Vec::new()),
        disables_said: Cell::new(None),
        wake: tokio::sync::Notify::new(),
        log_waiting: tokio::sync::Notify::new(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::new(EX_OSERR, format!("cannot start the event loop: {e}")))
        .inspect_err(|_| {
            let _ = sup.boot.remove_files(pidfile);
        })?;
    let local = tokio::task::LocalSet::new();
    let last_words = Rc::clone(&sup);
    let result = local.block_on(&runtime, async move {
        tokio::task::spawn_local(flush_log(Rc::clone(&sup)));
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        // The handlers are in place: what came meanwhile is delivered to them now.
        stop_signals(SigmaskHow::SIG_UNBLOCK);
        let mut slots = Vec::new();
        let mut ready = Vec::new();
        for slot in 0..workers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ready.push(rx);
            slots.push(tokio::task::spawn_local(pool::run_slot(
                Rc::clone(&sup),
                slot,
                tx,
            )));
        }
        let started = tokio::time::timeout(START_TIMEOUT, async {
            for rx in ready {
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err("a worker slot ended during start-up".to_string()),
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err("workers did not become ready in time".into()));
        if let Err(e) = started {
            stop_workers(&sup, slots).await;
            let _ = sup.boot.remove_files(pidfile);
            return Err(Fatal::new(EX_SOFTWARE, format!("balance: {e}")));
        }
        if let Some(pipe) = launcher {
            bootstrap::report(pipe, Ok(()));
            let _ = crate::sys::stdio_to_devnull();
            sup.logger.borrow_mut().detach();
        }
        sup.log(
            Priority::Notice,
            format!(
                "balance {} started: listening on {}, {workers} worker{}",
                crate::VERSION,
                sup.boot.listen_description,
                if workers == 1 { "" } else { "s" }
            ),
        );
        let reason = match signals {
            (Ok(term), Ok(int), Ok(hup)) => wait_for_stop(&sup, term, int, hup).await,
            _ => "cannot install signal handlers",
        };
        // No change is made from here on (a shell refuses one once the instance is marked
        // stopping, under the lock): the last look at the audit ring sees every change.
        sup.boot.table.stop_changes(std::process::id());
        log_audit_records(&sup);
        sup.log(Priority::Notice, format!("shutting down ({reason})"));
        stop_workers(&sup, slots).await;
        for left in sup.boot.remove_files(pidfile) {
            // The service user must be able to write where they are (the run directory
            // is theirs; a pid file elsewhere may not be).
            sup.log(Priority::Warning, format!("cannot remove {left}"));
        }
        if sup.pool.dead_slots() >= workers {
            sup.log(
                Priority::Critical,
                "stopped: no worker could run".to_string(),
            );
            return Err(Fatal::new(
                EX_SOFTWARE,
                "balance: no worker could run".to_string(),
            ));
        }
        sup.log(Priority::Notice, "stopped".to_string());
        Ok(())
    });
    // The last lines (the workers' last words, "stopped") may still wait for room.
    last_words.logger.borrow_mut().drain_for(LOG_DRAIN);
    result
}

/// Sends the lines that found syslog's queue full as soon as it has room: soon after a
/// burst, then backing off while the syslog daemon takes nothing (a stopped daemon costs a
/// wake-up every [`FLUSH_MAX`], not a busy loop).
async fn flush_log(sup: Rc<Supervisor>) {
    let mut delay = FLUSH_MIN;
    loop {
        if !sup.logger.borrow().pending() {
            sup.log_waiting.notified().await;
            delay = FLUSH_MIN;
            continue;
        }
        tokio::time::sleep(delay).await;
        let sent = sup.logger.borrow_mut().flush();
        delay = match sent {
            0 => (delay * 2).min(FLUSH_MAX),
            _ => FLUSH_MIN,
        };
    }
}

/// Waits for SIGTERM, SIGINT, a `kill` through the table, or every slot having given up.
/// SIGHUP (reload) replaces the workers one by one and reconnects the log.
async fn wait_for_stop(
    sup: &Rc<Supervisor>,
    mut term: SignalStream,
    mut int: SignalStream,
    mut hup: SignalStream,
) -> &'static str {
    let mut poll = tokio::time::interval(KILL_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => {
                sup.log(Priority::Notice, "reload (SIGHUP): replacing workers".to_string());
                sup.logger.borrow_mut().reconnect();
                let revived = pool::revive_given_up(sup);
                if revived > 0 {
                    sup.log(
                        Priority::Notice,
                        format!("reload (SIGHUP): starting {revived} worker slot(s) given up earlier"),
                    );
                }
                pool::request_round(sup, pool::Scope::All);
            }
            _ = poll.tick() => {
                log_audit_records(sup);
                let due = sup.notices.borrow_mut().due(std::time::Instant::now());
                for (kind, line) in due {
                    sup.log(kind.priority(), line);
                }
                if sup.boot.table.header().shutdown.load(Ordering::Acquire) != 0 {
                    return "kill command";
                }
                observe_table(sup);
                sup.retry_disables();
                pool::retry_stale(sup);
            }
            () = sup.pool.changed.notified() => {
                if sup.pool.dead_slots() >= sup.pool.size {
                    return "no worker could run";
                }
            }
        }
    }
}

/// Logs what the control shell put on record in the table's audit ring since the last look
/// (the shell's own words, on the audit facility), and says when records were overwritten
/// before they could be logged. Then it marks them read, which frees their slots for shells
/// waiting to make a change.
fn log_audit_records(sup: &Supervisor) {
    let table = &sup.boot.table;
    if table.audit_next() != sup.audit_next.get() {
        let batch = table.read_audit(sup.audit_next.get());
        sup.audit_next.set(batch.next);
        if batch.lost > 0 {
            sup.audit(
                Priority::Warning,
                &format!(
                    "{} audit record(s) of the control shell were overwritten before they could be logged",
                    batch.lost
                ),
            );
        }
        for line in &batch.lines {
            sup.audit(Priority::Notice, line);
        }
    }
    // Stored at every look: the mark is the supervisor's alone, whatever a hand left there.
    table.audit_read_up_to(sup.audit_next.get());
}

/// Looks at the table after a change: every change goes to the audit trail (so a writer
/// that skips its own logging still leaves a record), and a channel port the workers'
/// sandbox does not cover makes the supervisor replace them (one by one, connections drain)
/// with ones that admit it.
fn observe_table(sup: &Rc<Supervisor>) {
    // A writer that died mid-update left the count odd (and the generation where it was):
    // an empty update repairs it, and records it, at once, so that read-only monitoring is
    // not left without a consistent copy until the next root shell. A live writer's lock
    // is not waited for.
    if sup.boot.table.header().seq.load(Ordering::Acquire) & 1 == 1 {
        let _ = sup.boot.table.update_within(Duration::ZERO, |_| ());
    }
    let generation = sup.boot.table.header().generation.load(Ordering::Relaxed);
    if generation == sup.seen_generation.replace(generation) {
        return;
    }
    let Some(snapshot) = sup.boot.table.snapshot() else {
        // Mid-update: look again at the next tick.
        sup.seen_generation.set(generation.wrapping_sub(1));
        return;
    };
    for change in snapshot.changes_since(&sup.last_seen.borrow()) {
        sup.audit(
            Priority::Notice,
            &format!("table change observed: {change}"),
        );
    }
    // The ports of this very copy: a second read could find the next writer mid-update.
    let now = channel_ports(&snapshot);
    *sup.last_seen.borrow_mut() = snapshot;
    let new: Vec<u16> = now.difference(&sup.ports.borrow()).copied().collect();
    if new.is_empty() {
        return;
    }
    sup.ports.borrow_mut().extend(new.iter().copied());
    sup.ports_version.set(sup.ports_version.get() + 1);
    sup.log(
        Priority::Notice,
        format!("new channel port(s) {new:?}: replacing workers so their sandbox admits them"),
    );
    pool::request_round(sup, pool::Scope::Stale);
}

/// Every port of every channel in a copy of the table.
fn channel_ports(snapshot: &crate::table::Snapshot) -> BTreeSet<u16> {
    snapshot
        .groups
        .iter()
        .flat_map(|g| g.channels.iter().filter_map(|c| c.addr.map(|a| a.port())))
        .collect()
}

/// Ends every worker (draining ones too) with SIGKILL, the only stop signal they take
/// (they ignore SIGTERM, SIGINT and SIGHUP, which a process-group or cgroup-wide signal
/// would otherwise deliver to them as well), and waits (bounded) until all are reaped.
/// A worker being started meanwhile is ended by `pool::launch`, which sees `stopping`.
async fn stop_workers(sup: &Supervisor, slots: Vec<tokio::task::JoinHandle<()>>) {
    sup.stopping.set(true);
    sup.wake.notify_waiters();
    let kill_all = || {
        sup.pool
            .live_pids()
            .into_iter()
            .for_each(|p| pool::signal(p, Signal::SIGKILL));
    };
    kill_all();
    let all_gone = async {
        while !sup.pool.live_pids().is_empty() {
            let changed = sup.pool.changed.notified();
            if sup.pool.live_pids().is_empty() {
                break;
            }
            changed.await;
        }
    };
    if tokio::time::timeout(STOP_TIMEOUT, all_gone).await.is_err() {
        // Any still here: one that was being started and has not reported ready yet.
        kill_all();
    }
    let revived = std::mem::take(&mut *sup.pool.revived.borrow_mut());
    for slot in slots.into_iter().chain(revived) {
        let _ = slot.await;
    }
}

impl Supervisor {
    fn log(&self, priority: Priority, text: String) {
        self.logger.borrow_mut().log(priority, &text);
        self.wake_flusher();
    }

    /// An audit line (LOG_AUTHPRIV).
    fn audit(&self, priority: Priority, text: &str) {
        self.logger.borrow_mut().audit(priority, text);
        self.wake_flusher();
    }

    fn wake_flusher(&self) {
        if self.logger.borrow().pending() {
            self.log_waiting.notify_one();
        }
    }

    /// `-a`: disables a channel whose connect to `addr` failed, unless the channel has been
    /// given another address meanwhile (an operator's `assign` after `disable` must not be
    /// undone by an attempt that started before it).
    ///
    /// The supervisor's one thread must not wait for the lock (a shell stopped while holding
    /// it would hold up signals and restarts, two seconds per request): a request that
    /// finds it taken waits in `pending_disables` for the next tick, merged with others for
    /// the same channel, for at most [`DISABLE_WAIT`]. One for a channel already disabled
    /// takes no lock at all.
    fn disable_channel(&self, group: usize, channel: usize, addr: std::net::SocketAddr) {
        self.try_disable(PendingDisable {
            group,
            channel,
            addr,
            failed: std::time::Instant::now(),
        });
    }

    fn try_disable(&self, request: PendingDisable) {
        let PendingDisable {
            group,
            channel,
            addr,
            ..
        } = request;
        let settled = self.boot.table.snapshot().is_some_and(|snap| {
            snap.groups
                .get(group)
                .and_then(|g| g.channels.get(channel))
                .is_some_and(|c| !c.enabled && c.addr == Some(addr))
        });
        if settled {
            return;
        }
        let done = self.boot.table.update_within(Duration::ZERO, |w| {
            let now = w.config(group, channel)?.addr;
            if now != Some(addr) {
                return Some(Err(now));
            }
            w.set_enabled(group, channel, false).map(Ok)
        });
        match done {
            Ok(Some(Err(now))) => {
                let now = now.map_or_else(|| "none".to_string(), |a| a.to_string());
                self.log(
                    Priority::Notice,
                    format!(
                        "channel {channel} of group {group}: a connect to {addr} failed, but the channel is now {now}: left as it is"
                    ),
                );
            }
            Ok(Some(Ok(true))) => {
                self.log(
                    Priority::Notice,
                    format!(
                        // The original's words first: log watchers look for them.
                        "{addr} needs to be enabled manually using balance -i after the problem is solved (channel {channel} of group {group}, disabled after a failed connect)"
                    ),
                );
            }
            Ok(_) => {}
            Err(crate::table::TableError::Lock(crate::futex::LockError::Timeout { .. }))
                if request.failed.elapsed() < DISABLE_WAIT =>
            {
                let mut pending = self.pending_disables.borrow_mut();
                match pending
                    .iter_mut()
                    .find(|p| (p.group, p.channel) == (group, channel))
                {
                    Some(older) if older.failed <= request.failed => *older = request,
                    Some(_) => {}
                    None => pending.push(request),
                }
            }
            Err(e) => self.log(
                Priority::Error,
                format!("cannot disable group {group} channel {channel}: {e}"),
            ),
        }
    }

    /// Tries the `-a` requests that found the table locked again (a request older than
    /// [`DISABLE_WAIT`] is given up with an error line). A holder stopped for good is said
    /// once a minute at most.
    fn retry_disables(&self) {
        let pending = std::mem::take(&mut *self.pending_disables.borrow_mut());
        for request in pending {
            self.try_disable(request);
        }
        let waiting = self.pending_disables.borrow().len();
        if waiting > 0 {
            let now = std::time::Instant::now();
            let due = self
                .disables_said
                .get()
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60));
            if due {
                self.disables_said.set(Some(now));
                self.log(
                    Priority::Warning,
                    format!(
                        "{waiting} channel(s) to disable after failed connects wait for the table's lock, which another process holds"
                    ),
                );
            }
        }
    }
}
