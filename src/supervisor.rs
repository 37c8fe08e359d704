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

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::cli::ProxyArgs;
use crate::exitcode::{EX_OSERR, EX_SOFTWARE};
use crate::ipc::{self, IpcError, Message, Priority, WorkerConfig};
use crate::log::Logger;
use crate::table::{MAX_GROUPS, MAX_WORKERS};

pub use bootstrap::{lookup_host, Fatal};

/// A worker that dies sooner than this after its start counts against the crash budget.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive early deaths after which a worker slot is given up.
const CRASH_BUDGET: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long start-up waits for every worker to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for workers to exit before killing them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the table's `shutdown` flag.
const KILL_POLL: Duration = Duration::from_millis(200);

/// Runs balance in proxy mode; returns when it has shut down.
pub fn run(args: ProxyArgs) -> Result<(), Fatal> {
    let boot = bootstrap::prepare(&args)?;
    let launcher = if args.foreground {
        None
    } else {
        Some(bootstrap::detach()?)
    };
    let result = supervise(args, boot, launcher.as_ref());
    if let (Err(e), Some(pipe)) = (&result, &launcher) {
        bootstrap::report(pipe, Err(e));
    }
    result
}

/// Shared state of the supervisor's tasks.
struct Supervisor {
    boot: bootstrap::Boot,
    template: WorkerConfig,
    autodisable: bool,
    /// Detached daemon: workers get /dev/null as stdout and stderr, never the launcher's
    /// terminal or pipe.
    detached: bool,
    logger: RefCell<Logger>,
    stopping: Cell<bool>,
    /// Worker pid per slot, while one runs.
    pids: RefCell<Vec<Option<u32>>>,
    /// Slots given up after exhausting the crash budget.
    dead_slots: Cell<usize>,
    wake: tokio::sync::Notify,
}

fn supervise(
    args: ProxyArgs,
    boot: bootstrap::Boot,
    launcher: Option<&OwnedFd>,
) -> Result<(), Fatal> {
    if let Some(path) = &args.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            Fatal::new(
                EX_OSERR,
                format!("cannot write pid file {}: {e}", path.display()),
            )
        })?;
    }
    boot.table
        .header()
        .supervisor_pid
        .store(std::process::id(), Ordering::Relaxed);
    let mut logger = Logger::new(args.syslog_socket.clone(), true, args.common.debug);
    match &boot.account {
        Some(account) => {
            crate::sandbox::drop_privileges(account).map_err(|e| {
                Fatal::new(
                    EX_OSERR,
                    format!("cannot drop privileges to {}: {e}", account.name),
                )
            })?;
            logger.log(
                Priority::Info,
                &format!(
                    "privileges dropped to user {} (uid {}, gid {})",
                    account.name, account.uid, account.gid
                ),
            );
        }
        None => logger.log(
            Priority::Warning,
            &format!(
                "balance: not started as root: running as uid {} without privilege separation",
                nix::unistd::getuid()
            ),
        ),
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, MAX_WORKERS);
    let sup = Rc::new(Supervisor {
        template: WorkerConfig {
            slot: 0,
            listeners: boot.listeners.len() as u32,
            connect_timeout_secs: args.connect_timeout,
            idle_timeout_secs: args.idle_timeout,
            autodisable: args.autodisable,
            hash_failover: args.hash_failover,
            source: boot.source,
            debug: args.common.debug,
            dump: args.dump,
        },
        autodisable: args.autodisable,
        detached: launcher.is_some(),
        boot,
        logger: RefCell::new(logger),
        stopping: Cell::new(false),
        pids: RefCell::new(vec![None; workers]),
        dead_slots: Cell::new(0),
        wake: tokio::sync::Notify::new(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::new(EX_OSERR, format!("cannot start the event loop: {e}")))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let mut slots = Vec::new();
        let mut ready = Vec::new();
        for slot in 0..workers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ready.push(rx);
            slots.push(tokio::task::spawn_local(run_slot(
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
            sup.boot.remove_table();
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
                "balance {} started: listening on {}, {workers} workers",
                crate::VERSION,
                sup.boot.listen_description
            ),
        );
        let reason = wait_for_stop(&sup).await;
        sup.log(Priority::Notice, format!("shutting down ({reason})"));
        stop_workers(&sup, slots).await;
        sup.boot.remove_table();
        if let Some(path) = &args.pidfile {
            let _ = std::fs::remove_file(path);
        }
        if sup.dead_slots.get() >= workers {
            return Err(Fatal::new(
                EX_SOFTWARE,
                "balance: no worker could run".to_string(),
            ));
        }
        Ok(())
    })
}

/// Waits for SIGTERM, SIGINT, a `kill` through the table, or every slot having given up.
async fn wait_for_stop(sup: &Supervisor) -> &'static str {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return "cannot install signal handlers";
    };
    let mut poll = tokio::time::interval(KILL_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = poll.tick() => {
                if sup.boot.table.header().shutdown.load(Ordering::Acquire) != 0 {
                    return "kill command";
                }
            }
            () = sup.wake.notified() => {
                if sup.dead_slots.get() >= sup.pids.borrow().len() {
                    return "no worker could run";
                }
            }
        }
    }
}

async fn stop_workers(sup: &Supervisor, slots: Vec<tokio::task::JoinHandle<()>>) {
    sup.stopping.set(true);
    sup.wake.notify_waiters();
    signal_workers(sup, nix::sys::signal::Signal::SIGTERM);
    let all = futures_join(slots);
    if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
        signal_workers(sup, nix::sys::signal::Signal::SIGKILL);
    }
}

async fn futures_join(slots: Vec<tokio::task::JoinHandle<()>>) {
    for s in slots {
        let _ = s.await;
    }
}

/// Signals our own, not yet reaped children (their pids cannot have been reused).
fn signal_workers(sup: &Supervisor, sig: nix::sys::signal::Signal) {
    for pid in sup.pids.borrow().iter().flatten() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), sig);
    }
}

/// Keeps one worker slot filled: spawn, serve its messages, reap, restart with backoff.
async fn run_slot(
    sup: Rc<Supervisor>,
    slot: usize,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut backoff = FIRST_BACKOFF;
    let mut early_deaths = 0;
    while !sup.stopping.get() {
        let started = Instant::now();
        match spawn_worker(&sup, slot).await {
            Ok((child, channel)) => {
                let status = serve_worker(&sup, slot, child, &channel, &mut ready).await;
                sup.pids.borrow_mut()[slot] = None;
                sup.boot.table.fold_worker(slot);
                if sup.stopping.get() {
                    return;
                }
                sup.log(
                    Priority::Error,
                    format!("worker {slot} {}", describe_exit(status)),
                );
            }
            Err(e) => sup.log(Priority::Error, format!("cannot start worker {slot}: {e}")),
        }
        if started.elapsed() >= HEALTHY_UPTIME {
            backoff = FIRST_BACKOFF;
            early_deaths = 0;
        } else {
            early_deaths += 1;
        }
        if early_deaths >= CRASH_BUDGET {
            sup.log(
                Priority::Error,
                format!("worker {slot} died {early_deaths} times in a row; not restarting it"),
            );
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err(format!("worker {slot} keeps dying at start-up")));
            }
            sup.dead_slots.set(sup.dead_slots.get() + 1);
            sup.wake.notify_waiters();
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = sup.wake.notified() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if !sup.stopping.get() {
            sup.log(Priority::Notice, format!("restarting worker {slot}"));
        }
    }
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Forks and execs a worker from our own image, and sends it its start message.
async fn spawn_worker(
    sup: &Supervisor,
    slot: usize,
) -> Result<(tokio::process::Child, UnixDatagram), IpcError> {
    let (ours, theirs) = ipc::socketpair()?;
    let mut cmd = std::process::Command::new(format!("/proc/self/fd/{}", sup.boot.exe.as_raw_fd()));
    cmd.arg0("balance")
        .arg("--worker")
        .arg(slot.to_string())
        .env_clear()
        .stdin(std::process::Stdio::null());
    if sup.detached {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    crate::sys::worker_child_setup(&mut cmd, theirs.as_raw_fd());
    let child = tokio::process::Command::from(cmd).spawn()?;
    drop(theirs);
    sup.pids.borrow_mut()[slot] = child.id();
    let std_sock = std::os::unix::net::UnixDatagram::from(ours);
    std_sock.set_nonblocking(true)?;
    let channel = UnixDatagram::from_std(std_sock)?;
    let mut fds: Vec<i32> = sup.boot.listeners.iter().map(|l| l.as_raw_fd()).collect();
    fds.push(sup.boot.table_file.as_raw_fd());
    let config = WorkerConfig {
        slot: slot as u32,
        ..sup.template.clone()
    };
    ipc::send(&channel, &Message::Start(config), &fds).await?;
    Ok((child, channel))
}

/// Handles a worker's messages until it exits; returns its exit status.
async fn serve_worker(
    sup: &Supervisor,
    slot: usize,
    mut child: tokio::process::Child,
    channel: &UnixDatagram,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> std::io::Result<std::process::ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return status,
            msg = ipc::recv(channel) => match msg {
                Ok((msg, _fds)) => {
                    if !handle_message(sup, slot, msg, ready) {
                        let _ = child.start_kill();
                        return child.wait().await;
                    }
                }
                Err(IpcError::Closed) => return child.wait().await,
                Err(e) => {
                    sup.log(Priority::Error, format!("worker {slot} sent a bad message ({e}); stopping it"));
                    let _ = child.start_kill();
                    return child.wait().await;
                }
            },
        }
    }
}

/// Checks and applies one request from a worker. Returns false when the worker misbehaved.
fn handle_message(
    sup: &Supervisor,
    slot: usize,
    msg: Message,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> bool {
    match msg {
        Message::Ready => {
            if let Some(tx) = ready.take() {
                let _ = tx.send(Ok(()));
            }
            true
        }
        Message::Log { priority, text } => {
            sup.log(priority, text);
            true
        }
        Message::Disable { group, channel } => {
            if !sup.autodisable || group as usize >= MAX_GROUPS {
                sup.log(
                    Priority::Error,
                    format!(
                        "worker {slot} asked to disable group {group} channel {channel} without -a"
                    ),
                );
                return false;
            }
            disable_channel(sup, group as usize, channel as usize);
            true
        }
        Message::Start(_) => {
            sup.log(
                Priority::Error,
                format!("worker {slot} sent a start message"),
            );
            false
        }
    }
}

/// `-a`: disables a channel whose connect failed, under the table lock.
fn disable_channel(sup: &Supervisor, group: usize, channel: usize) {
    match sup
        .boot
        .table
        .update(|w| w.set_enabled(group, channel, false))
    {
        Ok(Some(true)) => {
            let addr = sup
                .boot
                .table
                .snapshot()
                .and_then(|s| s.groups.get(group)?.channels.get(channel)?.addr)
                .map_or_else(|| "?".to_string(), |a| a.to_string());
            sup.log(
                Priority::Notice,
                format!(
                    "channel {channel} of group {group} ({addr}) disabled after a failed connect; enable it again with balance -i once the problem is solved"
                ),
            );
        }
        Ok(_) => {}
        Err(e) => sup.log(
            Priority::Error,
            format!("cannot disable group {group} channel {channel}: {e}"),
        ),
    }
}

impl Supervisor {
    fn log(&self, priority: Priority, text: String) {
        self.logger.borrow_mut().log(priority, &text);
    }
}
