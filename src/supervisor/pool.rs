//! The worker pool: keeps `size` worker slots filled.
//!
//! Each slot task spawns a worker (fork + exec of our own image through the descriptor on
//! `/proc/self/exe`), hands it the listener and the table, and then waits: for the worker's
//! death (it is reaped, its share of the current-connection counts is subtracted, and a new
//! one is started with exponential backoff; a worker that keeps dying early exhausts the
//! crash budget and its slot is given up), or for a request to replace it. A replacement is
//! started first; once it is ready the old worker is told to drain (stop accepting, finish
//! its connections, exit), so a reload drops no connection.
//!
//! A worker's table row is separate from its slot: a draining worker keeps its row until it
//! exits, while its replacement counts in a fresh one. When draining workers hold every row
//! (long connections through many reloads: fewer, the more workers there are), a reload
//! leaves the workers it cannot replace serving, as they are, rather than cut connections
//! (it changes nothing they need: the command line is kept), and a slot it starts again
//! waits for a row. A worker that refuses a new channel port (whose channel fails until it
//! is replaced) does not wait on clients that may stay for hours: the draining worker that
//! has drained longest is stopped, connections and all, to make room. A dead worker's slot
//! needs none of that: its row is kept for it. Every request a worker sends is checked
//! before the supervisor acts on it; a worker that misbehaves is killed.
//!
//! Each slot knows which version of the channel port set its worker's sandbox admits. A
//! worker that predates a new port is replaced; one that could not be (its replacement
//! failed to start, say) is retried, and the table's admitted-ports bitmap is updated once
//! every serving worker admits every port.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Supervisor;
use crate::ipc::{self, IpcError, Message, Priority, WorkerConfig};
use crate::table::{MAX_CHANNELS, MAX_GROUPS, MAX_WORKERS};

/// A worker that dies sooner than this after its start counts against the crash budget.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive early deaths after which a worker slot is given up.
const CRASH_BUDGET: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the supervisor waits for a draining worker it stopped to make room (it is
/// SIGKILLed, so only a stuck reap can take long).
const EVICT_WAIT: Duration = Duration::from_secs(5);
/// How long a new worker may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Replacing the workers that still refuse a channel port is tried again after this long,
/// doubling up to [`STALE_RETRY`] while it keeps failing; when it failed only for want of a
/// free table row, as soon as a worker exits (which frees one), or after `STALE_RETRY`.
const STALE_BACKOFF: Duration = Duration::from_secs(1);
const STALE_RETRY: Duration = Duration::from_secs(30);

/// Which workers a round of replacements covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Those whose sandbox predates a channel port added since.
    Stale,
    /// Every one (reload).
    All,
}

/// Why no worker could be started.
enum LaunchError {
    /// Draining workers hold every table row (and none was to be stopped for this one); one
    /// frees its row when it exits.
    NoRow,
    /// The pool is being stopped.
    Stopping,
    Failed(String),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::NoRow => f.write_str(
                "no table row is free (draining workers hold them, or the last ones are \
                 kept for slots without a worker)",
            ),
            LaunchError::Stopping => f.write_str("stopping"),
            LaunchError::Failed(e) => f.write_str(e),
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;
/// The answer to a request to replace a slot's worker.
type Answer = oneshot::Sender<Result<(), LaunchError>>;

/// The versions of the channel port set (`Supervisor::ports_version`) a slot's workers were
/// started with.
#[derive(Clone, Copy, Default)]
struct SlotPorts {
    /// The serving worker's; None while the slot has none.
    serving: Option<u64>,
    /// A worker being started for the slot (not serving yet).
    starting: Option<u64>,
}

/// When the workers that still refuse a channel port are to be replaced again.
#[derive(Clone, Copy, Debug)]
struct StaleRetry {
    /// Due once `exits` differs from this (a row may be free).
    after_exit: Option<u64>,
    /// Due at this time in any case.
    at: Instant,
    /// The wait after the next failure.
    backoff: Duration,
}

impl StaleRetry {
    fn new(now: Instant) -> StaleRetry {
        StaleRetry {
            after_exit: None,
            at: now,
            backoff: STALE_BACKOFF,
        }
    }

    fn is_due(&self, exits: u64, now: Instant) -> bool {
        self.after_exit.is_some_and(|e| e != exits) || now >= self.at
    }

    /// Schedules the next try after a round that replaced `replaced` of `asked` workers;
    /// `only_rows_short`: every failure was for want of a row. `exits_before`: workers
    /// reaped when the round began.
    fn after_round(
        &mut self,
        replaced: usize,
        asked: usize,
        only_rows_short: bool,
        exits_before: u64,
        now: Instant,
    ) {
        if replaced == asked {
            self.backoff = STALE_BACKOFF;
        } else if only_rows_short {
            // Only a worker's exit frees a row.
            self.after_exit = Some(exits_before);
            self.at = now + STALE_RETRY;
        } else {
            // Replacements that fail exit too: wait, longer each time.
            self.after_exit = None;
            self.at = now + self.backoff;
            self.backoff = (self.backoff * 2).min(STALE_RETRY);
        }
    }

    /// Due at once (a worker started with a port set that was outdated by then).
    fn now(&mut self, now: Instant) {
        self.after_exit = None;
        self.at = now;
    }
}

/// Whether every serving worker, and every worker being started, admits the ports of
/// version `current`.
fn all_admit(versions: &[SlotPorts], current: u64) -> bool {
    versions
        .iter()
        .flat_map(|v| [v.serving, v.starting])
        .flatten()
        .all(|v| v == current)
}

/// A worker told to drain, still alive.
#[derive(Clone, Copy)]
struct Draining {
    pid: u32,
    row: usize,
    since: Instant,
}

pub struct Pool {
    pub size: usize,
    /// Draining workers, the one that has drained longest first.
    draining: RefCell<Vec<Draining>>,
    /// Table rows in use by live workers (draining ones included).
    rows: RefCell<[bool; MAX_WORKERS]>,
    /// Live (not yet reaped) worker pids and their channels.
    live: RefCell<HashMap<u32, Rc<UnixDatagram>>>,
    /// Pending replace requests, one per slot.
    requests: RefCell<Vec<Option<Answer>>>,
    replace: Vec<Notify>,
    /// Per slot, whether it was given up after exhausting the crash budget (a reload
    /// starts it again).
    given_up: RefCell<Vec<bool>>,
    /// The tasks of slots started again by a reload, awaited at shutdown like the first.
    pub revived: RefCell<Vec<JoinHandle<()>>>,
    /// A round of replacements is under way.
    reloading: Cell<bool>,
    /// Another was asked for meanwhile: the one under way goes round once more, over the
    /// wider of the two scopes.
    reload_again: Cell<Option<Scope>>,
    /// Per slot, which channel ports its workers admit.
    versions: RefCell<Vec<SlotPorts>>,
    /// Workers reaped so far.
    exits: Cell<u64>,
    stale_retry: Cell<StaleRetry>,
    /// Signalled when a worker exits or a slot is given up.
    pub changed: Notify,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            size,
            draining: RefCell::new(Vec::new()),
            rows: RefCell::new([false; MAX_WORKERS]),
            live: RefCell::new(HashMap::new()),
            requests: RefCell::new((0..size).map(|_| None).collect()),
            replace: (0..size).map(|_| Notify::new()).collect(),
            given_up: RefCell::new(vec![false; size]),
            revived: RefCell::new(Vec::new()),
            reloading: Cell::new(false),
            reload_again: Cell::new(None),
            versions: RefCell::new(vec![SlotPorts::default(); size]),
            exits: Cell::new(0),
            stale_retry: Cell::new(StaleRetry::new(Instant::now())),
            changed: Notify::new(),
        }
    }

    /// Pids of the workers not yet reaped (safe to signal: they cannot have been reused).
    pub fn live_pids(&self) -> Vec<u32> {
        self.live.borrow().keys().copied().collect()
    }

    /// SIGKILLs a worker unless it has been reaped (its pid may be another process's now).
    fn kill_if_live(&self, pid: u32) {
        if self.live.borrow().contains_key(&pid) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Asks every live worker but `pid` to accept what is queued on the listeners (best
    /// effort: a worker whose channel is full is busy anyway).
    fn nudge_others(&self, pid: u32) {
        for (&other, channel) in self.live.borrow().iter() {
            if other != pid {
                let _ = ipc::try_send(channel, &Message::Accept);
            }
        }
    }

    /// How many slots have been given up.
    pub fn dead_slots(&self) -> usize {
        self.given_up.borrow().iter().filter(|&&dead| dead).count()
    }

    /// A free table row for a worker of `slot`. A replacement (the slot has a serving
    /// worker still) leaves one free row for every other slot without a worker: a worker
    /// that died frees its row, and a reload's replacement must not take it from the
    /// slot that needs it to serve at all.
    fn take_row(&self, slot: usize) -> Option<usize> {
        let versions = self.versions.borrow();
        let given_up = self.given_up.borrow();
        let mut rows = self.rows.borrow_mut();
        if versions[slot].serving.is_some() {
            let without = (0..self.size)
                .filter(|&s| s != slot && !given_up[s])
                .filter(|&s| versions[s].serving.is_none() && versions[s].starting.is_none())
                .count();
            if rows.iter().filter(|used| !**used).count() <= without {
                return None;
            }
        }
        let row = rows.iter().position(|used| !used)?;
        rows[row] = true;
        Some(row)
    }

    /// Whether the slot's serving worker was started before the latest channel port
    /// appeared.
    fn is_stale(&self, slot: usize, current: u64) -> bool {
        self.versions.borrow()[slot]
            .serving
            .is_some_and(|v| v < current)
    }

    fn is_serving(&self, slot: usize) -> bool {
        self.versions.borrow()[slot].serving.is_some()
    }

    /// Makes the next round for stale workers due at once.
    fn retry_stale_now(&self) {
        let mut retry = self.stale_retry.get();
        retry.now(Instant::now());
        self.stale_retry.set(retry);
    }

    fn free_row(&self, row: usize) {
        if let Some(used) = self.rows.borrow_mut().get_mut(row) {
            *used = false;
        }
    }
}

/// A running worker as its slot sees it.
struct Worker {
    pid: u32,
    row: usize,
    channel: Rc<UnixDatagram>,
    /// Completes once the worker has been reaped and accounted for.
    done: JoinHandle<Exit>,
}

/// How a worker ended.
struct Exit {
    status: std::io::Result<std::process::ExitStatus>,
    /// This supervisor killed it for misbehaving.
    punished: bool,
}

impl Exit {
    /// The outcome of a `done` handle (a watch task that panicked ended nothing cleanly).
    fn of(done: Result<Exit, tokio::task::JoinError>) -> Exit {
        done.unwrap_or_else(|e| Exit {
            status: Err(std::io::Error::other(e)),
            punished: false,
        })
    }
}

/// Keeps one slot filled until the supervisor stops. `first_ready` learns whether the slot's
/// first worker came up.
pub async fn run_slot(sup: Rc<Supervisor>, slot: usize, first_ready: Reply) {
    let mut first_ready = Some(first_ready);
    let mut backoff = FIRST_BACKOFF;
    let mut early_deaths = 0;
    let mut waiting_for_row = false;
    while !sup.stopping.get() {
        let mut started = Instant::now();
        let mut killed = false;
        // The row a dead worker freed is kept for its slot (see `take_row`); a slot
        // started again by a reload waits for one rather than cut connections.
        match launch(&sup, slot, false).await {
            Ok(worker) => {
                waiting_for_row = false;
                if let Some(tx) = first_ready.take() {
                    let _ = tx.send(Ok(()));
                }
                publish_admitted(&sup);
                let (exit, since) = serve_slot(&sup, slot, worker).await;
                // The uptime that counts is the dead worker's: a replacement started by a
                // reload that dies at once is an early death.
                started = since;
                sup.pool.versions.borrow_mut()[slot].serving = None;
                // A replacement asked for meanwhile is done: the slot starts a fresh worker.
                if let Some(answer) = sup.pool.requests.borrow_mut()[slot].take() {
                    let _ = answer.send(Ok(()));
                }
                // Consume the wake-up that came with it, so that it does not replace the
                // fresh worker (a timeout of zero polls the wait once).
                let _ =
                    tokio::time::timeout(Duration::ZERO, sup.pool.replace[slot].notified()).await;
                if sup.stopping.get() {
                    return;
                }
                publish_admitted(&sup);
                // A SIGKILL from outside (the OOM killer, an operator) is not a worker that
                // cannot run: restarted with the backoff, but never given up. One from this
                // supervisor, for misbehaving, is a crash like any other.
                killed = !exit.punished
                    && matches!(&exit.status, Ok(s) if s.signal() == Some(libc::SIGKILL));
                sup.log(
                    Priority::Error,
                    format!("worker {slot} {}", describe_exit(exit.status)),
                );
            }
            Err(_) if sup.stopping.get() => return,
            Err(LaunchError::NoRow) => {
                // Not the worker's fault, and no backoff helps: a row frees when a worker
                // exits.
                if !waiting_for_row {
                    waiting_for_row = true;
                    sup.log(
                        Priority::Warning,
                        format!(
                            "worker {slot} waits for a free table row (all {MAX_WORKERS} are in use)"
                        ),
                    );
                }
                tokio::select! {
                    () = sup.pool.changed.notified() => {}
                    () = sup.wake.notified() => {}
                    // `changed` wakes only those already waiting: look again now and then.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            Err(e) => sup.log(Priority::Error, format!("cannot start worker {slot}: {e}")),
        }
        if started.elapsed() >= HEALTHY_UPTIME {
            backoff = FIRST_BACKOFF;
            early_deaths = 0;
        } else if !killed {
            early_deaths += 1;
        }
        if early_deaths >= CRASH_BUDGET {
            sup.log(
                Priority::Critical,
                format!("worker {slot} died {early_deaths} times in a row; not restarting it"),
            );
            if let Some(tx) = first_ready.take() {
                let _ = tx.send(Err(format!("worker {slot} keeps dying at start-up")));
            }
            sup.pool.given_up.borrow_mut()[slot] = true;
            sup.pool.changed.notify_waiters();
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

/// Waits for the slot's worker to die, replacing it whenever asked; returns the exit status
/// of the worker that died (and whether this supervisor killed it) and when it was launched.
async fn serve_slot(sup: &Rc<Supervisor>, slot: usize, mut worker: Worker) -> (Exit, Instant) {
    let mut since = Instant::now();
    loop {
        tokio::select! {
            done = &mut worker.done => return (Exit::of(done), since),
            () = sup.pool.replace[slot].notified() => {
                let answer = sup.pool.requests.borrow_mut()[slot].take();
                // A reload does not stop draining workers for room; a worker that refuses a
                // new channel port does (its channel fails until it is replaced), whichever
                // round replaces it.
                let make_room = sup.pool.is_stale(slot, sup.ports_version.get());
                let launched = Instant::now();
                let result = match launch(sup, slot, make_room).await {
                    Ok(new) => {
                        since = launched;
                        let old = std::mem::replace(&mut worker, new);
                        // The old worker's task reaps it and frees its row when it is done;
                        // its exit is logged like a start. Should the old worker's socket be
                        // full (the worker stopped), that task waits to send the drain: not
                        // this slot, which would meanwhile miss its new worker's death.
                        let queued = ipc::try_send(&old.channel, &Message::Drain).is_ok();
                        let (sup2, pid) = (Rc::clone(sup), old.pid);
                        if queued {
                            draining(sup, &old);
                        }
                        tokio::task::spawn_local(async move {
                            if !queued {
                                let _ = ipc::send(&old.channel, &Message::Drain, &[]).await;
                                draining(&sup2, &old);
                                publish_admitted(&sup2);
                            }
                            let status = Exit::of(old.done.await).status;
                            if sup2.stopping.get() {
                                return;
                            }
                            let clean = matches!(&status, Ok(s) if s.success());
                            sup2.log(
                                if clean { Priority::Info } else { Priority::Warning },
                                format!(
                                    "worker {slot}'s predecessor (pid {pid}) retired: {}",
                                    describe_exit(status)
                                ),
                            );
                        });
                        // Draining, it accepts no more: the ports are admitted now (once
                        // the drain is sent, when it had to wait).
                        if queued {
                            publish_admitted(sup);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                if let Some(answer) = answer {
                    let _ = answer.send(result);
                }
            }
        }
    }
}

/// Counts a worker told to drain among the draining ones (those that may be stopped to make
/// room: they accept no more), unless it has been reaped meanwhile.
fn draining(sup: &Supervisor, old: &Worker) {
    if !old.done.is_finished() {
        sup.pool.draining.borrow_mut().push(Draining {
            pid: old.pid,
            row: old.row,
            since: Instant::now(),
        });
    }
}

/// Starts the slots given up after too many early deaths again, with a fresh crash
/// budget (a reload: the operator may have fixed the cause). Returns how many.
pub fn revive_given_up(sup: &Rc<Supervisor>) -> usize {
    let slots: Vec<usize> = sup
        .pool
        .given_up
        .borrow_mut()
        .iter_mut()
        .enumerate()
        .filter_map(|(slot, given_up)| std::mem::take(given_up).then_some(slot))
        .collect();
    for &slot in &slots {
        // Nobody waits for its first worker now: the start-up is long over.
        let (ready, _) = oneshot::channel();
        let task = tokio::task::spawn_local(run_slot(Rc::clone(sup), slot, ready));
        let mut revived = sup.pool.revived.borrow_mut();
        revived.retain(|t| !t.is_finished());
        revived.push(task);
    }
    slots.len()
}

/// Replaces the workers in `scope`, one slot after the other, each new one ready before the
/// next old one drains: every worker for a reload (SIGHUP), the stale ones when the sandbox
/// must admit new channel ports.
///
/// Rounds do not overlap: one asked for while another is under way (a second SIGHUP, a
/// new channel port) makes that one go round once more when it is done, so that every
/// worker ends up started after the last request. The request is registered before this
/// returns, so that a second one in the same tick is merged too.
pub fn request_round(sup: &Rc<Supervisor>, scope: Scope) {
    if sup.pool.reloading.replace(true) {
        let again = sup.pool.reload_again.get().max(Some(scope));
        sup.pool.reload_again.set(again);
        return;
    }
    tokio::task::spawn_local(rounds(Rc::clone(sup), scope));
}

/// Runs the rounds [`request_round`] asked for.
async fn rounds(sup: Rc<Supervisor>, scope: Scope) {
    let mut scope = scope;
    loop {
        sup.pool.reload_again.set(None);
        let Some((replaced, asked)) = replace_each(&sup, scope).await else {
            break;
        };
        match scope {
            Scope::All if asked == 0 => {
                sup.log(Priority::Notice, "no serving worker to replace".to_string());
            }
            Scope::All if replaced == asked => {
                sup.log(Priority::Notice, "all workers replaced".to_string());
            }
            Scope::All => sup.log(
                Priority::Warning,
                format!("{replaced} of {asked} workers replaced"),
            ),
            Scope::Stale if replaced == asked => {}
            Scope::Stale => sup.log(
                Priority::Warning,
                format!(
                    "{} of {asked} workers still refuse a new channel port; \
                     they are replaced again later",
                    asked - replaced
                ),
            ),
        }
        match sup.pool.reload_again.get() {
            Some(next) => scope = next,
            None => break,
        }
    }
    sup.pool.reloading.set(false);
}

/// Replaces the workers that still refuse a channel port when that is due (see
/// [`STALE_BACKOFF`]). Called on the supervisor's table poll.
pub fn retry_stale(sup: &Rc<Supervisor>) {
    if sup.pool.reloading.get() {
        return;
    }
    let current = sup.ports_version.get();
    if !(0..sup.pool.size).any(|slot| sup.pool.is_stale(slot, current)) {
        return;
    }
    if sup
        .pool
        .stale_retry
        .get()
        .is_due(sup.pool.exits.get(), Instant::now())
    {
        request_round(sup, Scope::Stale);
    }
}

/// Marks the channel ports in the table as admitted once every serving worker's sandbox,
/// and that of every worker being started, admits all of them (so a control shell waiting
/// for a new port can return). Draining workers accept no new connection and do not count.
fn publish_admitted(sup: &Supervisor) {
    if all_admit(&sup.pool.versions.borrow(), sup.ports_version.get()) {
        sup.boot
            .table
            .admit_ports(sup.ports.borrow().iter().copied());
    }
}

/// One round of [`request_round`]: how many workers were replaced and how many were asked
/// to be, None when stopping. A slot without a serving worker is not asked: the one it
/// starts next is new anyway.
async fn replace_each(sup: &Rc<Supervisor>, scope: Scope) -> Option<(usize, usize)> {
    let exits_before = sup.pool.exits.get();
    let mut replaced = 0;
    let mut asked = 0;
    let mut only_rows_short = true;
    for slot in 0..sup.pool.size {
        if sup.stopping.get() {
            return None;
        }
        let wanted = match scope {
            Scope::All => sup.pool.is_serving(slot),
            Scope::Stale => sup.pool.is_stale(slot, sup.ports_version.get()),
        };
        if !wanted {
            continue;
        }
        asked += 1;
        let (tx, rx) = oneshot::channel();
        sup.pool.requests.borrow_mut()[slot] = Some(tx);
        sup.pool.replace[slot].notify_one();
        let outcome = tokio::time::timeout(READY_TIMEOUT * 2, rx).await;
        if sup.stopping.get() {
            return None;
        }
        match outcome {
            Ok(Ok(Ok(()))) => replaced += 1,
            Ok(Ok(Err(e))) => {
                only_rows_short &= matches!(e, LaunchError::NoRow);
                sup.log(
                    Priority::Error,
                    format!("cannot replace worker {slot}: {e}"),
                );
            }
            _ => {
                only_rows_short = false;
                sup.log(
                    Priority::Error,
                    format!("worker {slot} was not replaced in time"),
                );
            }
        }
    }
    let mut retry = sup.pool.stale_retry.get();
    retry.after_round(
        replaced,
        asked,
        only_rows_short,
        exits_before,
        Instant::now(),
    );
    sup.pool.stale_retry.set(retry);
    Some((replaced, asked))
}

/// Starts a worker for `slot` and waits until it reports ready; it is then the slot's
/// serving worker. The caller publishes the admitted ports once the worker it replaces, if
/// any, is draining.
async fn launch(sup: &Rc<Supervisor>, slot: usize, make_room: bool) -> Result<Worker, LaunchError> {
    let version = sup.ports_version.get();
    let ports: Vec<u16> = sup.ports.borrow().iter().copied().collect();
    sup.pool.versions.borrow_mut()[slot].starting = Some(version);
    let result = start(sup, slot, ports, make_room).await;
    let mut versions = sup.pool.versions.borrow_mut();
    versions[slot].starting = None;
    if result.is_ok() {
        versions[slot].serving = Some(version);
        if version < sup.ports_version.get() {
            // A port appeared while it started: its sandbox refuses it.
            sup.pool.retry_stale_now();
        }
    }
    result
}

/// [`launch`] without the bookkeeping: a worker admitting `ports`.
/// `may_make_room`: stop draining workers if no row is free (see [`make_room`]).
async fn start(
    sup: &Rc<Supervisor>,
    slot: usize,
    ports: Vec<u16>,
    may_make_room: bool,
) -> Result<Worker, LaunchError> {
    let row = match sup.pool.take_row(slot) {
        Some(row) => row,
        None if may_make_room => make_room(sup, slot).await?,
        None => return Err(LaunchError::NoRow),
    };
    let (child, channel) = match spawn(sup, row, ports).await {
        Ok(started) => started,
        Err(e) => {
            sup.pool.free_row(row);
            return Err(LaunchError::Failed(e.to_string()));
        }
    };
    let pid = child.id().unwrap_or(0);
    let channel = Rc::new(channel);
    sup.pool.live.borrow_mut().insert(pid, Rc::clone(&channel));
    let (ready_tx, ready_rx) = oneshot::channel();
    let done = tokio::task::spawn_local(watch(
        Rc::clone(sup),
        slot,
        row,
        child,
        Rc::clone(&channel),
        ready_tx,
    ));
    let ready = tokio::time::timeout(READY_TIMEOUT, ready_rx).await;
    if sup.stopping.get() {
        // Started while the pool was being stopped: it must not serve.
        sup.pool.kill_if_live(pid);
        let _ = done.await;
        return Err(LaunchError::Stopping);
    }
    match ready {
        Ok(Ok(())) => {
            sup.log(
                Priority::Info,
                format!("worker {slot} started (pid {pid}, table row {row})"),
            );
            Ok(Worker {
                pid,
                row,
                channel,
                done,
            })
        }
        _ => {
            sup.pool.kill_if_live(pid);
            let _ = done.await;
            Err(LaunchError::Failed(
                "the worker did not become ready".to_string(),
            ))
        }
    }
}

/// No table row is free for a worker of `slot`: stops the draining workers that have
/// drained longest, one at a time, until one is (each frees its row once reaped), and
/// takes it. NoRow when no draining worker is left to stop.
async fn make_room(sup: &Rc<Supervisor>, slot: usize) -> Result<usize, LaunchError> {
    loop {
        let Some(oldest) = sup.pool.draining.borrow().first().copied() else {
            return Err(LaunchError::NoRow);
        };
        if sup.stopping.get() {
            return Err(LaunchError::Stopping);
        }
        let left = sup.boot.table.worker_connections(oldest.row);
        sup.log(
            Priority::Warning,
            format!(
                "no table row is free for worker {slot}: stopping the worker that has drained \
                 longest (pid {}, draining for {}s, {left} connection{} left)",
                oldest.pid,
                oldest.since.elapsed().as_secs(),
                if left == 1 { "" } else { "s" }
            ),
        );
        sup.pool.kill_if_live(oldest.pid);
        // Reaped, `watch` forgets it; one that is not (stuck in the kernel) is not waited
        // for again: the next one is stopped instead.
        sup.pool
            .draining
            .borrow_mut()
            .retain(|d| d.pid != oldest.pid);
        let deadline = Instant::now() + EVICT_WAIT;
        while sup.pool.live.borrow().contains_key(&oldest.pid) {
            if Instant::now() >= deadline {
                sup.log(
                    Priority::Error,
                    format!(
                        "the draining worker {} did not exit when killed",
                        oldest.pid
                    ),
                );
                break;
            }
            // `changed` wakes only those already waiting: look again now and then.
            tokio::select! {
                () = sup.pool.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if sup.stopping.get() {
            return Err(LaunchError::Stopping);
        }
        if let Some(row) = sup.pool.take_row(slot) {
            return Ok(row);
        }
    }
}

/// Forks and execs a worker from our own image, and sends it its start message.
async fn spawn(
    sup: &Supervisor,
    row: usize,
    connect_ports: Vec<u16>,
) -> Result<(tokio::process::Child, UnixDatagram), IpcError> {
    let (ours, theirs) = ipc::socketpair()?;
    let exe = format!("/proc/self/fd/{}", sup.boot.exe.as_raw_fd());
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0("balance")
        .arg("--worker")
        .arg(row.to_string())
        .env_clear()
        .stdin(std::process::Stdio::null());
    if sup.detached {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    crate::sys::worker_child_setup(&mut cmd, theirs.as_raw_fd());
    let child = tokio::process::Command::from(cmd).spawn()?;
    drop(theirs);
    let std_sock = std::os::unix::net::UnixDatagram::from(ours);
    std_sock.set_nonblocking(true)?;
    let channel = UnixDatagram::from_std(std_sock)?;
    let mut fds: Vec<i32> = sup.boot.listeners.iter().map(|l| l.as_raw_fd()).collect();
    fds.push(sup.boot.table_file.as_raw_fd());
    fds.push(sup.boot.table_file_read_only.as_raw_fd());
    let config = WorkerConfig {
        row: row as u32,
        connect_ports,
        ..sup.template.clone()
    };
    ipc::send(&channel, &Message::Start(config), &fds).await?;
    Ok((child, channel))
}

/// Serves one worker's messages until it exits, then accounts for it: its row's current
/// connections are subtracted and the row is freed.
async fn watch(
    sup: Rc<Supervisor>,
    slot: usize,
    row: usize,
    mut child: tokio::process::Child,
    channel: Rc<UnixDatagram>,
    ready: oneshot::Sender<()>,
) -> Exit {
    let pid = child.id().unwrap_or(0);
    let mut ready = Some(ready);
    let (status, punished) = loop {
        tokio::select! {
            status = child.wait() => break (status, false),
            msg = ipc::recv(&channel) => match msg {
                Ok((msg, fds)) => {
                    let fine = if fds.is_empty() {
                        handle_message(&sup, slot, pid, msg, &mut ready)
                    } else {
                        sup.log(Priority::Error, format!("worker {slot} sent descriptors; stopping it"));
                        false
                    };
                    if !fine {
                        let _ = child.start_kill();
                        break (child.wait().await, true);
                    }
                }
                Err(IpcError::Closed) => break (child.wait().await, false),
                Err(e) => {
                    sup.log(Priority::Error, format!("worker {slot} sent a bad message ({e}); stopping it"));
                    let _ = child.start_kill();
                    break (child.wait().await, true);
                }
            },
        }
    };
    sup.pool.live.borrow_mut().remove(&pid);
    sup.pool.draining.borrow_mut().retain(|d| d.pid != pid);
    // Connections whose wake-up went to this worker wait on the listeners: the others take
    // them now rather than its replacement after the backoff.
    sup.pool.nudge_others(pid);
    sup.boot.table.fold_worker(row);
    sup.pool.free_row(row);
    sup.pool.exits.set(sup.pool.exits.get() + 1);
    sup.pool.changed.notify_waiters();
    Exit { status, punished }
}

/// Checks and applies one request from a worker. Returns false when the worker misbehaved.
fn handle_message(
    sup: &Supervisor,
    slot: usize,
    pid: u32,
    msg: Message,
    ready: &mut Option<oneshot::Sender<()>>,
) -> bool {
    match msg {
        Message::Ready { landlock } => {
            if let Some(what) = landlock {
                if !sup.landlock_warned.replace(true) {
                    sup.log(
                        Priority::Warning,
                        format!("landlock {what}: workers run with seccomp and rlimits only"),
                    );
                }
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            true
        }
        Message::Log { priority, text } => {
            // The worker last: a line the original logged ("connection failed group G
            // channel C") starts the message, where log watchers look for it.
            sup.log(priority, format!("{text} (worker {slot})"));
            true
        }
        Message::Notice { text, line } => {
            if !super::notices::valid(&line) {
                sup.log(
                    Priority::Error,
                    format!("worker {slot} sent a notice no worker sends: {line:?}"),
                );
                return false;
            }
            let now = std::time::Instant::now();
            let passed = sup.notices.borrow_mut().pass(slot, &line, &text, now);
            if let Some(held) = passed {
                let text = super::notices::line(&text, held, slot);
                sup.log(line.kind.priority(), text);
            }
            true
        }
        Message::Disable {
            group,
            channel,
            addr,
        } => {
            if !sup.template.autodisable
                || group as usize >= MAX_GROUPS
                || channel as usize >= MAX_CHANNELS
            {
                sup.log(
                    Priority::Error,
                    format!(
                        "worker {slot} asked to disable group {group} channel {channel} without -a"
                    ),
                );
                return false;
            }
            sup.disable_channel(group as usize, channel as usize, addr);
            true
        }
        Message::StoppedAccepting => {
            // Connections that woke this worker wait on the listeners: the others take them.
            sup.pool.nudge_others(pid);
            true
        }
        Message::Start(_) | Message::Drain | Message::Accept => {
            sup.log(
                Priority::Error,
                format!("worker {slot} sent a supervisor message"),
            );
            false
        }
    }
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(serving: Option<u64>, starting: Option<u64>) -> SlotPorts {
        SlotPorts { serving, starting }
    }

    #[test]
    fn ports_are_admitted_only_when_every_serving_and_starting_worker_has_them() {
        assert!(all_admit(&[], 3), "no worker refuses anything");
        assert!(all_admit(&[slot(Some(3), None), slot(None, None)], 3));
        assert!(!all_admit(&[slot(Some(2), None), slot(Some(3), None)], 3));
        assert!(
            !all_admit(&[slot(Some(3), None), slot(None, Some(2))], 3),
            "a worker being started with the old ports"
        );
        assert!(all_admit(&[slot(Some(3), Some(3))], 3));
    }

    #[test]
    fn failing_replacements_back_off_and_do_not_retry_on_their_own_exits() {
        let t0 = Instant::now();
        let mut r = StaleRetry::new(t0);
        assert!(r.is_due(0, t0));
        r.after_round(0, 2, false, 0, t0);
        assert!(
            !r.is_due(5, t0),
            "the failed workers' exits do not make it due"
        );
        assert!(r.is_due(5, t0 + STALE_BACKOFF));
        let mut waits = Vec::new();
        for _ in 0..8 {
            let before = r.at;
            r.after_round(1, 2, false, 0, before);
            waits.push(r.at - before);
        }
        assert_eq!(waits[0], STALE_BACKOFF * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().expect("waits"), STALE_RETRY);
        r.after_round(2, 2, false, 0, t0);
        r.after_round(0, 1, false, 0, t0);
        assert_eq!(r.at, t0 + STALE_BACKOFF, "a success resets the backoff");
    }

    #[test]
    fn a_round_short_of_rows_is_retried_when_a_worker_exits() {
        let t0 = Instant::now();
        let mut r = StaleRetry::new(t0);
        r.after_round(1, 2, true, 7, t0);
        assert!(!r.is_due(7, t0 + STALE_BACKOFF * 4));
        assert!(r.is_due(8, t0), "a worker exited: a row may be free");
        assert!(
            r.is_due(7, t0 + STALE_RETRY),
            "and in any case after a while"
        );
        r.now(t0);
        assert!(r.is_due(7, t0));
    }
}
