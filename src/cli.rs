//! Command line: argv in, one [`Command`] (or one [`CliError`]) out.
//!
//! The original balance read its arguments with GNU `getopt` (option string
//! `c:b:B:t:T:adfpiHM6`), and the scripts and init files written for it rely on that
//! grammar: bundled flags (`-fd`), values glued or separate (`-t5`, `-t 5`, `-ft 5`),
//! options after operands (`balance 8000 -f host`), `--` ending the options, and a value
//! taken verbatim even when it starts with `-` or `=`. clap's parser differs from getopt
//! in exactly those corners (it strips the `=` of `-t=5`, takes the `-1` of `-T -1` for a
//! flag, refuses a repeated flag), so this module scans argv itself with getopt_long
//! semantics from one option table, [`OPTIONS`], and clap renders `--help` from that same
//! table, so the parser and the help text cannot drift apart.
//!
//! Everything here is pure: no host name is resolved and nothing touches the network, so
//! every operand error is reported before the daemon binds or detaches (the original found
//! bad channels only after daemonizing, where nobody saw the message). Service names are
//! the one lookup done here, in an injectable [`Services`] table read from /etc/services.
//!
//! Deliberate departures from the original, each fixing one of its known problems:
//! * `-T 0` means "no idle timeout" (the original's help said so, but it rejected 0).
//! * Ports, listening or in a channel, must be 1..=65535; the original accepted `70000`,
//!   `-5` and, in channels, `abc` (as port 0).
//! * A channel's maxc must be a decimal number (the original turned `x` into 0).
//! * Limits count channels, not separators: [`MAX_GROUPS`] groups of [`MAX_CHANNELS`].
//! * IPv6 backends can be written, as `[addr]:port:maxc` or as a bare literal where the
//!   original's reading fails (`::1`, `2001:db8::5`); where it does not, it wins: `db1::5`
//!   is host `db1` with maxc 5, as in the original.
//! * `-b` is restricted to `[A-Za-z0-9._:-]`, because it becomes part of a file name.
//! * `-M` is accepted and ignored: the table is always a file mapping.
//! * Arguments must be valid UTF-8, and long options cannot be abbreviated.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

pub use crate::table::{GroupKind, MAX_CHANNELS, MAX_GROUPS};
/// Seconds a backend connect may take when `-t` is not given.
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 5;
/// Seconds a connection that one side has ended may stay idle when
/// `--half-close-timeout` is not given. The original closed both sides at the first end
/// of stream; half-close is passed on here, and this keeps a peer that never answers it
/// (a backend ignoring the client's FIN) from holding the connection, and its place under
/// maxc, for ever.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: u64 = 60;

const DEFAULT_RUN_DIR: &str = "/run/balance";
const DEFAULT_USER: &str = "balance";
pub const DEFAULT_CONTROL_GROUP: &str = "balance";
use crate::table::MAX_POOL as MAX_WORKERS;
const SYSTEM_SERVICES: &str = "/etc/services";

use crate::exitcode::{EX_DATAERR, EX_OSERR, EX_UNAVAILABLE, EX_USAGE};

/// The three invocation forms, shared by `--help` and every usage error.
const USAGE_FORMS: [&str; 3] = [
    "balance [OPTIONS] PORT [CHANNEL...] [! | % CHANNEL...]... [! | %]",
    "balance [-b ADDR] [-d] [--json] -i PORT",
    "balance [-b ADDR] [-d] [--json] -c COMMAND PORT",
];

const ABOUT: &str = "balance: a TCP load balancer. It accepts connections on PORT and relays each
one to a channel (a backend) chosen from the groups given on the command line.";

const AFTER_HELP: &str = "\
Channels:
  A CHANNEL is host[:port[:maxc]] or [ipv6-addr][:port[:maxc]]. A bare IPv6 address
  is taken as one only if it cannot be read as host:port:maxc ('db1::5' is host db1
  with maxc 5, 'fe80::1' is host fe80 with maxc 1): use brackets.
  A host name is its IPv4 address when it has one (as in the original), else IPv6.
  An empty or missing port means PORT; ports may be numbers or service names.
  maxc caps the channel's concurrent connections; empty, missing or 0 means no cap,
  negative that the channel is never chosen (until the shell's maxc changes it).
  '!' ends a group and makes it round robin, '%' ends it and makes it a hash group
  (by client address). The last group is round robin unless a '%' ends it.
  The first group with a usable channel serves a connection; later groups are failover.
  Up to 32 groups of up to 64 channels each; no channels at all is allowed.

Examples:
  balance 8080 10.0.0.1 10.0.0.2:8081 ! 10.0.0.9
  balance -f smtp mail1:smtp mail2::10 %
  balance -c show 8080

Signals (to the supervisor, the process that --pidfile names):
  SIGTERM, SIGINT  stop accepting, end the workers, remove the table file, exit 0
  SIGHUP           reload: replace the workers one by one (connections in progress finish
                   on the old ones), start worker slots given up again, reconnect to syslog
  SIGUSR1          ignored (the original's liveness probe)

Exit status:
  0   success
  64  bad command line (unknown option, bad value, wrong operands, invalid port)
  65  invalid channel address; shell: a command refused (syntax error, no such channel
      or group, a channel to disable first, a full group), a file that is not a table
  67  the service user (--user) or control group (--control-group) does not exist
  69  service unavailable (bad grouping, too many groups or channels, no master process,
      an unusable run directory, a kill that did not finish)
  70  internal error (no worker could run; shell: the table could not be used)
  71  operating system error (bind, socket, files, the pid file); shell: no access to the
      table file
  74  cannot read the input or write the output (shell, --help, --version); a reader
      that went away is not an error
  75  shell: the table is locked by another writer or kept changing, try again
  77  shell: the table is read-only for you
";

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the balancer.
    Proxy(ProxyArgs),
    /// Talk to a running balancer: `-i` (interactive) or `-c CMD` (one command).
    Shell(ShellArgs),
    /// `--help`/`-h`: print this text with `print!` on stdout and exit 0.
    Help(String),
    /// `--version`/`-V`: print this text with `print!` on stdout and exit 0.
    Version(String),
}

/// The listening side, which also names the table (see [`table_file_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Numeric port; also the default port of channels that give none.
    pub port: u16,
    /// The port operand as typed (`smtp`, `8000`).
    pub port_text: String,
    /// `-b ADDR` exactly as typed (only `[A-Za-z0-9._:-]`); `None` means every address.
    pub bind: Option<String>,
}

/// Settings shared by the balancer and the control shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Common {
    pub listen: Listen,
    /// `-d`: debug output.
    pub debug: bool,
    /// `--run-dir DIR`: where table files live, default `/run/balance`.
    pub run_dir: PathBuf,
}

/// The control shell. It always runs in the foreground.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellArgs {
    pub common: Common,
    /// `-c CMD`: run this one command and exit; `None` for `-i`. `-c` wins over `-i`.
    pub command: Option<String>,
    /// `--json`: machine-readable output.
    pub json: bool,
    /// `--control-group NAME`: the group allowed to use the shell.
    pub control_group: String,
    /// `--syslog-socket PATH`: where the audit trail goes instead of the default socket.
    pub syslog_socket: Option<PathBuf>,
}

/// The balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyArgs {
    pub common: Common,
    /// `-a`: disable a channel whose connect fails.
    pub autodisable: bool,
    /// `-B ADDR`: source address for backend connections, unresolved.
    pub source: Option<String>,
    /// `-t SEC`: connect timeout per attempt, at least 1.
    pub connect_timeout: u64,
    /// `-T SEC`: drop a relay idle this long; `None` (absent or 0) never does.
    pub idle_timeout: Option<u64>,
    /// `--half-close-timeout SEC`: drop a relay that one side has ended once idle this
    /// long; `None` (0) never does.
    pub half_close_timeout: Option<u64>,
    /// `-f`: stay in the foreground.
    pub foreground: bool,
    /// `-p`: dump relayed data on stdout.
    pub dump: bool,
    /// `-H`: in a hash group, fail over to the group's other channels.
    pub hash_failover: bool,
    /// `-6`: listen on IPv6 (dual stack).
    pub ipv6: bool,
    pub groups: Vec<GroupSpec>,
    /// `--user NAME`: unprivileged user the workers run as.
    pub user: String,
    /// `--workers N` (1..=32); `None` means one per CPU, decided by the caller.
    pub workers: Option<usize>,
    /// `--pidfile PATH`.
    pub pidfile: Option<PathBuf>,
    /// `--control-group NAME`: the group allowed to use the shell.
    pub control_group: String,
    /// `--syslog-socket PATH`: log there instead of the default socket.
    pub syslog_socket: Option<PathBuf>,
    /// `--log-connections`: log every relayed connection.
    pub log_connections: bool,
}

/// One group of channels, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub kind: GroupKind,
    pub channels: Vec<ChannelSpec>,
}

/// One backend as given on the command line; the host is not resolved yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Name or address literal; IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// Most concurrent connections; 0 means no limit, a negative value that the channel is
    /// never chosen (as in the original, where `host::-1` made a standby channel).
    pub maxc: i32,
    /// The operand as typed.
    pub text: String,
}

/// A command line that cannot be run. The caller prints `message` on stderr (with
/// `eprintln!`; it has no trailing newline) and exits with `code`, a sysexits value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    /// A malformed command line: the problem, the synopsis and a pointer to `--help`.
    fn usage(problem: impl fmt::Display) -> Self {
        CliError {
            code: EX_USAGE,
            message: format!(
                "balance: {problem}\n{}\nTry 'balance --help' for more information.",
                synopsis()
            ),
        }
    }

    fn plain(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    fn bad_address(host: &str) -> Self {
        Self::plain(EX_DATAERR, format!("unknown or invalid address [{host}]"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// TCP service names from a services(5) file, for `getservbyname(name, "tcp")` lookups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services {
    /// Every tcp name and alias with its port, in file order (the first match wins).
    tcp: Vec<(String, u16)>,
}

impl Services {
    /// Parses services(5) text: `name port/proto [aliases...]`, `#` starts a comment.
    /// Malformed lines are skipped, as the C library does.
    pub fn parse(text: &str) -> Self {
        let mut tcp = Vec::new();
        for line in text.lines() {
            let line = line.split_once('#').map_or(line, |(data, _)| data);
            let mut fields = line.split_whitespace();
            let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((port, "tcp")) = port_proto.split_once('/') else {
                continue;
            };
            let Some(port) = decimal(port).and_then(port_in_range) else {
                continue;
            };
            tcp.extend(
                std::iter::once(name)
                    .chain(fields)
                    .map(|n| (n.to_owned(), port)),
            );
        }
        Services { tcp }
    }

    /// Reads `path`; a missing or unreadable file gives an empty table.
    pub fn from_file(path: &Path) -> Self {
        std::fs::read(path)
            .map(|bytes| Self::parse(&String::from_utf8_lossy(&bytes)))
            .unwrap_or_default()
    }

    /// The system table, /etc/services.
    pub fn system() -> Self {
        Self::from_file(Path::new(SYSTEM_SERVICES))
    }

    /// The tcp port of a service name or alias (case-sensitive).
    pub fn lookup(&self, name: &str) -> Option<u16> {
        self.tcp.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }
}

/// A port as a tcp service name or a decimal number, 1..=65535.
pub fn parse_port(text: &str, services: &Services) -> Option<u16> {
    services
        .lookup(text)
        .or_else(|| decimal(text).and_then(port_in_range))
}

/// Name of the table file of the balancer listening on `port` and `bind` (`-b` as typed):
/// `balance.<port>.<bind or 0.0.0.0>`, as the original named its rendezvous file.
pub fn table_file_name(port: u16, bind: Option<&str>) -> String {
    format!("{TABLE_FILE_PREFIX}{port}.{}", bind.unwrap_or("0.0.0.0"))
}

/// How every table file's name starts.
pub const TABLE_FILE_PREFIX: &str = "balance.";

/// Parses a whole argv, `argv[0]` included.
pub fn parse<I, T>(args: I, services: &Services) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = utf8_args(args)?;
    let matches = scan(&args)?;
    if matches.has(Opt::Help) {
        return Ok(Command::Help(help_text()));
    }
    if matches.has(Opt::Version) {
        return Ok(Command::Version(version_text()));
    }
    let flags = Flags::from_matches(&matches)?;
    let operands = &matches.operands;
    if flags.interactive || flags.command.is_some() {
        shell_args(flags, operands, services).map(Command::Shell)
    } else {
        proxy_args(flags, operands, services).map(Command::Proxy)
    }
}

fn utf8_args<I, T>(args: I) -> Result<Vec<String>, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    args.into_iter()
        .skip(1)
        .map(|arg| {
            arg.into().into_string().map_err(|bad| {
                CliError::usage(format!("argument is not valid UTF-8: {}", bad.display()))
            })
        })
        .collect()
}

/// Every option; [`OPTIONS`] gives each its names and help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Autodisable,
    Bind,
    Source,
    ShellCommand,
    Debug,
    Foreground,
    Interactive,
    HashFailover,
    Mmap,
    Dump,
    ConnectTimeout,
    IdleTimeout,
    HalfCloseTimeout,
    Ipv6,
    User,
    Workers,
    Pidfile,
    RunDir,
    ControlGroup,
    SyslogSocket,
    LogConnections,
    Json,
    Help,
    Version,
}

/// One option's spelling and documentation.
struct OptSpec {
    opt: Opt,
    /// clap's id for the help renderer.
    id: &'static str,
    short: Option<char>,
    long: Option<&'static str>,
    /// Name of the value shown in help; `None` for a flag.
    value: Option<&'static str>,
    help: &'static str,
}

/// A short option; `id` is its one-letter name.
const fn short(
    opt: Opt,
    id: &'static str,
    value: Option<&'static str>,
    help: &'static str,
) -> OptSpec {
    let short = Some(id.as_bytes()[0] as char);
    OptSpec {
        opt,
        id,
        short,
        long: None,
        value,
        help,
    }
}

/// A long option; `id` is its name without the dashes.
const fn long(
    opt: Opt,
    id: &'static str,
    value: Option<&'static str>,
    help: &'static str,
) -> OptSpec {
    OptSpec {
        opt,
        id,
        short: None,
        long: Some(id),
        value,
        help,
    }
}

/// The options, in help order. The short ones are the original's getopt string
/// `c:b:B:t:T:adfpiHM6` plus `-h` and `-V`.
#[rustfmt::skip]
const OPTIONS: &[OptSpec] = &[
    short(Opt::Autodisable, "a", None, "Disable a channel whose connect fails (until enabled in the shell)"),
    short(Opt::Bind, "b", Some("ADDR"), "Listen on ADDR only; letters, digits and . _ : - allowed"),
    short(Opt::Source, "B", Some("ADDR"), "Connect to channels from source address ADDR"),
    short(Opt::ShellCommand, "c", Some("COMMAND"), "Run one shell COMMAND (quoted) and exit; wins over -i"),
    short(Opt::Debug, "d", None, "Print debugging output"),
    short(Opt::Foreground, "f", None, "Stay in the foreground instead of detaching"),
    short(Opt::Interactive, "i", None, "Open the control shell of the balancer on PORT"),
    short(Opt::HashFailover, "H", None, "In hash groups, fail over to the group's other channels"),
    short(Opt::Mmap, "M", None, "Ignored (the table is always a mapped file); kept for old scripts"),
    short(Opt::Dump, "p", None, "Dump all relayed data on stdout"),
    short(Opt::ConnectTimeout, "t", Some("SEC"), "Connect timeout per channel, 1 to 2147483647 [default: 5]"),
    short(Opt::IdleTimeout, "T", Some("SEC"), "Drop connections idle for SEC seconds, 0: never [default: 0]"),
    short(Opt::Ipv6, "6", None, "Listen on IPv6, dual stack (IPv4 clients too); -b ADDR must then be IPv6"),
    long(Opt::HalfCloseTimeout, "half-close-timeout", Some("SEC"), "Reset connections one side has ended once silent for SEC seconds, 0: never [default: 60]"),
    long(Opt::User, "user", Some("NAME"), "Run the supervisor and workers as user NAME [default: balance]"),
    long(Opt::Workers, "workers", Some("N"), "Number of workers, 1 to 32 [default: one per CPU]"),
    long(Opt::Pidfile, "pidfile", Some("PATH"), "Write the supervisor's process id to PATH"),
    long(Opt::RunDir, "run-dir", Some("DIR"), "Directory of the table files [default: /run/balance]"),
    long(Opt::ControlGroup, "control-group", Some("NAME"), "Group allowed to read the table in the shell [default: balance]"),
    long(Opt::SyslogSocket, "syslog-socket", Some("PATH"), "Send log messages to the syslog socket PATH"),
    long(Opt::LogConnections, "log-connections", None, "Log every relayed connection"),
    long(Opt::Json, "json", None, "show and stats print JSON (only with -i or -c)"),
    OptSpec { short: Some('h'), ..long(Opt::Help, "help", None, "Print this help and exit") },
    OptSpec { short: Some('V'), ..long(Opt::Version, "version", None, "Print the version and exit") },
];

/// argv split into options (in order, with their raw values) and operands.
#[derive(Debug, Default)]
struct Matches {
    given: Vec<(Opt, Option<String>)>,
    operands: Vec<String>,
}

impl Matches {
    fn has(&self, opt: Opt) -> bool {
        self.given.iter().any(|(o, _)| *o == opt)
    }

    /// The value of the last occurrence of `opt`, as getopt callers see it.
    fn value(&self, opt: Opt) -> Option<&str> {
        self.given
            .iter()
            .rev()
            .find(|(o, _)| *o == opt)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Records `opt`; returns false when scanning should stop (help and version).
    fn record(&mut self, opt: Opt, value: Option<String>) -> bool {
        self.given.push((opt, value));
        !matches!(opt, Opt::Help | Opt::Version)
    }
}

/// Splits argv (without argv[0]) like GNU getopt_long with permutation.
fn scan(args: &[String]) -> Result<Matches, CliError> {
    let mut matches = Matches::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let go_on = if arg == "--" {
            matches.operands.extend(rest.by_ref().cloned());
            true
        } else if let Some(long) = arg.strip_prefix("--") {
            scan_long(long, &mut rest, &mut matches)?
        } else if let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) {
            scan_short(cluster, &mut rest, &mut matches)?
        } else {
            matches.operands.push(arg.clone());
            true
        };
        if !go_on {
            break;
        }
    }
    Ok(matches)
}

/// `--name`, `--name=value` or `--name value`.
fn scan_long<'a>(
    text: &str,
    rest: &mut impl Iterator<Item = &'a String>,
    matches: &mut Matches,
) -> Result<bool, CliError> {
    let (name, glued) = match text.split_once('=') {
        Some((name, value)) => (name, Some(value.to_owned())),
        None => (text, None),
    };
    let spec = OPTIONS
        .iter()
        .find(|s| s.long == Some(name))
        .ok_or_else(|| CliError::usage(format!("unrecognized option '--{name}'")))?;
    let value =
        match (spec.value, glued) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(CliError::usage(format!(
                    "option '--{name}' doesn't allow an argument"
                )));
            }
            (Some(_), Some(value)) => Some(value),
            (Some(_), None) => Some(rest.next().cloned().ok_or_else(|| {
                CliError::usage(format!("option '--{name}' requires an argument"))
            })?),
        };
    Ok(matches.record(spec.opt, value))
}

/// A cluster of short options after its `-`: flags, then at most one option whose value is
/// the rest of the cluster or, when that is empty, the next argument.
fn scan_short<'a>(
    cluster: &str,
    rest: &mut impl Iterator<Item = &'a String>,
    matches: &mut Matches,
) -> Result<bool, CliError> {
    for (at, letter) in cluster.char_indices() {
        let spec = OPTIONS
            .iter()
            .find(|s| s.short == Some(letter))
            .ok_or_else(|| CliError::usage(format!("invalid option -- '{letter}'")))?;
        if spec.value.is_none() {
            if !matches.record(spec.opt, None) {
                return Ok(false);
            }
            continue;
        }
        let glued = &cluster[at + letter.len_utf8()..];
        let value = if glued.is_empty() {
            rest.next().cloned().ok_or_else(|| {
                CliError::usage(format!("option requires an argument -- '{letter}'"))
            })?
        } else {
            glued.to_owned()
        };
        return Ok(matches.record(spec.opt, Some(value)));
    }
    Ok(true)
}

/// Option values, checked, with defaults applied.
struct Flags {
    debug: bool,
    interactive: bool,
    command: Option<String>,
    json: bool,
    bind: Option<String>,
    run_dir: PathBuf,
    control_group: String,
    autodisable: bool,
    source: Option<String>,
    connect_timeout: u64,
    idle_timeout: Option<u64>,
    half_close_timeout: Option<u64>,
    foreground: bool,
    dump: bool,
    hash_failover: bool,
    ipv6: bool,
    user: String,
    workers: Option<usize>,
    pidfile: Option<PathBuf>,
    syslog_socket: Option<PathBuf>,
    log_connections: bool,
}

impl Flags {
    /// Checks every value given, whichever mode it belongs to, as getopt's caller did.
    fn from_matches(m: &Matches) -> Result<Self, CliError> {
        let text = |opt, what| m.value(opt).map(|v| non_empty(v, what)).transpose();
        let path = |opt, what| text(opt, what)?.map(|v| absolute(v, what)).transpose();
        Ok(Flags {
            debug: m.has(Opt::Debug),
            interactive: m.has(Opt::Interactive),
            command: m.value(Opt::ShellCommand).map(str::to_owned),
            json: m.has(Opt::Json),
            bind: m.value(Opt::Bind).map(bind_address).transpose()?,
            run_dir: path(Opt::RunDir, "--run-dir")?.unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            control_group: text(Opt::ControlGroup, "--control-group")?
                .unwrap_or_else(|| DEFAULT_CONTROL_GROUP.to_owned()),
            autodisable: m.has(Opt::Autodisable),
            source: text(Opt::Source, "-B")?,
            connect_timeout: m
                .value(Opt::ConnectTimeout)
                .map(connect_timeout)
                .transpose()?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: m
                .value(Opt::IdleTimeout)
                .map(|v| seconds_or_never(v, "-T"))
                .transpose()?
                .flatten(),
            half_close_timeout: m
                .value(Opt::HalfCloseTimeout)
                .map(|v| seconds_or_never(v, "--half-close-timeout"))
                .transpose()?
                .unwrap_or(Some(DEFAULT_HALF_CLOSE_TIMEOUT)),
            foreground: m.has(Opt::Foreground),
            dump: m.has(Opt::Dump),
            hash_failover: m.has(Opt::HashFailover),
            ipv6: m.has(Opt::Ipv6),
            user: text(Opt::User, "--user")?.unwrap_or_else(|| DEFAULT_USER.to_owned()),
            workers: m.value(Opt::Workers).map(workers).transpose()?,
            pidfile: path(Opt::Pidfile, "--pidfile")?,
            syslog_socket: path(Opt::SyslogSocket, "--syslog-socket")?,
            log_connections: m.has(Opt::LogConnections),
        })
    }

    fn common(&self, port_text: &str, services: &Services) -> Result<Common, CliError> {
        let port = parse_port(port_text, services).ok_or_else(|| {
            CliError::plain(EX_USAGE, format!("invalid port [{port_text}], exiting."))
        })?;
        Ok(Common {
            listen: Listen {
                port,
                port_text: port_text.to_owned(),
                bind: self.bind.clone(),
            },
            debug: self.debug,
            run_dir: self.run_dir.clone(),
        })
    }
}

/// A path option made absolute now: the daemon changes to `/` when it detaches, and a
/// relative pid file or syslog socket would then be looked for there.
fn absolute(value: String, what: &str) -> Result<PathBuf, CliError> {
    std::path::absolute(&value).map_err(|e| {
        CliError::plain(
            EX_OSERR,
            format!("balance: cannot resolve {what} {value} against the current directory: {e}"),
        )
    })
}

fn non_empty(value: &str, what: &str) -> Result<String, CliError> {
    if value.is_empty() {
        return Err(CliError::usage(format!("{what} needs a non-empty value")));
    }
    Ok(value.to_owned())
}

fn bind_address(value: &str) -> Result<String, CliError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if value.is_empty() || !value.chars().all(allowed) {
        return Err(CliError::usage(format!(
            "invalid -b address '{value}': only letters, digits, '.', '_', ':' and '-' are allowed"
        )));
    }
    Ok(value.to_owned())
}

/// The largest `-t` and `-T` (the original's `int`, about 68 years): a larger figure is a
/// typo, not a timeout, and is refused like any other bad value.
const MAX_SECONDS: u64 = i32::MAX as u64;

fn connect_timeout(value: &str) -> Result<u64, CliError> {
    decimal(value)
        .filter(|s| (1..=MAX_SECONDS).contains(s))
        .ok_or_else(|| {
            CliError::usage(format!(
                "invalid -t value '{value}': need whole seconds, 1 to {MAX_SECONDS}"
            ))
        })
}

/// `-T`, `--half-close-timeout`: whole seconds; 0 means no timeout.
fn seconds_or_never(value: &str, option: &str) -> Result<Option<u64>, CliError> {
    let seconds = decimal(value)
        .filter(|&s| s <= MAX_SECONDS)
        .ok_or_else(|| {
            CliError::usage(format!(
                "invalid {option} value '{value}': need whole seconds up to {MAX_SECONDS}, 0 for none"
            ))
        })?;
    Ok(Some(seconds).filter(|&s| s > 0))
}

fn workers(value: &str) -> Result<usize, CliError> {
    decimal(value)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| (1..=MAX_WORKERS).contains(n))
        .ok_or_else(|| {
            CliError::usage(format!(
                "invalid --workers value '{value}': need a number from 1 to {MAX_WORKERS}"
            ))
        })
}

/// Plain unsigned decimal: digits only, no sign, no spaces, no overflow.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn port_in_range(n: u64) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

fn shell_args(
    flags: Flags,
    operands: &[String],
    services: &Services,
) -> Result<ShellArgs, CliError> {
    let [port] = operands else {
        return Err(CliError::usage(
            "the control shell (-i, -c) takes exactly one operand, the PORT",
        ));
    };
    Ok(ShellArgs {
        common: flags.common(port, services)?,
        command: flags.command,
        json: flags.json,
        control_group: flags.control_group,
        syslog_socket: flags.syslog_socket,
    })
}

fn proxy_args(
    flags: Flags,
    operands: &[String],
    services: &Services,
) -> Result<ProxyArgs, CliError> {
    if flags.json {
        return Err(CliError::usage(
            "--json only applies to the control shell (-i, -c)",
        ));
    }
    let Some((port, channels)) = operands.split_first() else {
        return Err(CliError::usage("missing PORT operand"));
    };
    let common = flags.common(port, services)?;
    let groups = parse_groups(channels, common.listen.port, services)?;
    Ok(ProxyArgs {
        common,
        autodisable: flags.autodisable,
        source: flags.source,
        connect_timeout: flags.connect_timeout,
        idle_timeout: flags.idle_timeout,
        half_close_timeout: flags.half_close_timeout,
        foreground: flags.foreground,
        dump: flags.dump,
        hash_failover: flags.hash_failover,
        ipv6: flags.ipv6,
        groups,
        user: flags.user,
        workers: flags.workers,
        pidfile: flags.pidfile,
        control_group: flags.control_group,
        syslog_socket: flags.syslog_socket,
        log_connections: flags.log_connections,
    })
}

/// The operands after PORT: channels, with `!` and `%` closing groups.
fn parse_groups(
    operands: &[String],
    default_port: u16,
    services: &Services,
) -> Result<Vec<GroupSpec>, CliError> {
    let mut groups = Vec::new();
    let mut channels = Vec::new();
    for operand in operands {
        let kind = match operand.as_str() {
            "!" => GroupKind::RoundRobin,
            "%" => GroupKind::Hash,
            _ => {
                if channels.len() == MAX_CHANNELS {
                    return Err(CliError::plain(
                        EX_UNAVAILABLE,
                        "balance: too many channels in one group",
                    ));
                }
                channels.push(parse_channel(operand, default_port, services)?);
                continue;
            }
        };
        if channels.is_empty() {
            return Err(CliError::plain(
                EX_UNAVAILABLE,
                "balance: no channels in group",
            ));
        }
        push_group(&mut groups, kind, std::mem::take(&mut channels))?;
    }
    if !channels.is_empty() {
        push_group(&mut groups, GroupKind::RoundRobin, channels)?;
    }
    Ok(groups)
}

fn push_group(
    groups: &mut Vec<GroupSpec>,
    kind: GroupKind,
    channels: Vec<ChannelSpec>,
) -> Result<(), CliError> {
    if groups.len() == MAX_GROUPS {
        return Err(CliError::plain(EX_UNAVAILABLE, "balance: too many groups"));
    }
    groups.push(GroupSpec { kind, channels });
    Ok(())
}

/// `host[:port[:maxc]]`, `[v6][:port[:maxc]]`, or a bare IPv6 literal where the first
/// reading fails. The original split at the first colon, so `db1::5` (host `db1`, maxc 5)
/// must keep meaning what it meant, although it is an IPv6 address too.
fn parse_channel(
    operand: &str,
    default_port: u16,
    services: &Services,
) -> Result<ChannelSpec, CliError> {
    parse_fields(operand, default_port, services).or_else(|e| match is_bare_ipv6(operand) {
        true => Ok(ChannelSpec {
            host: operand.to_owned(),
            port: default_port,
            maxc: 0,
            text: operand.to_owned(),
        }),
        false => Err(e),
    })
}

impl ChannelSpec {
    /// Written like a bare IPv6 address but read, as the original read it, as
    /// host:port:maxc (`fe80::1` is host fe80 with maxc 1).
    pub fn reads_like_ipv6(&self) -> bool {
        self.host != self.text && is_bare_ipv6(&self.text)
    }
}

/// An IPv6 literal without brackets, with an optional `%zone`.
fn is_bare_ipv6(text: &str) -> bool {
    let addr = text.split_once('%').map_or(text, |(addr, _zone)| addr);
    addr.parse::<Ipv6Addr>().is_ok()
}

/// `host[:port[:maxc]]` or `[v6][:port[:maxc]]`.
fn parse_fields(
    operand: &str,
    default_port: u16,
    services: &Services,
) -> Result<ChannelSpec, CliError> {
    let (host, fields) = split_host(operand)?;
    if host.is_empty() {
        return Err(CliError::bad_address(host));
    }
    let (port_text, maxc_text) = match fields {
        Some(fields) => fields.split_once(':').unwrap_or((fields, "")),
        None => ("", ""),
    };
    let port = match port_text {
        "" => default_port,
        text => parse_port(text, services).ok_or_else(|| {
            CliError::plain(
                EX_USAGE,
                format!("invalid port [{text}] in channel [{operand}]"),
            )
        })?,
    };
    let maxc = match maxc_text {
        "" => 0,
        text => signed_maxc(text).ok_or_else(|| {
            CliError::plain(
                EX_USAGE,
                format!("invalid maxc [{text}] in channel [{operand}]"),
            )
        })?,
    };
    Ok(ChannelSpec {
        host: host.to_owned(),
        port,
        maxc,
        text: operand.to_owned(),
    })
}

/// A channel's maxc: a decimal number, with a leading `-` for a channel never chosen, from
/// -2147483648 to 2147483647, the range the shell's `maxc` takes. (The original's `atoi`
/// wrapped larger numbers: 4294967295 became -1, a channel never chosen; such a number is
/// refused rather than given either meaning quietly.)
fn signed_maxc(text: &str) -> Option<i32> {
    match text.strip_prefix('-') {
        Some(digits) => decimal(digits)
            .and_then(|n| i64::try_from(n).ok())
            .and_then(|n| i32::try_from(-n).ok()),
        None => decimal(text).and_then(|n| i32::try_from(n).ok()),
    }
}

/// The host part of a channel and the `port[:maxc]` text after its `:`, if any.
fn split_host(operand: &str) -> Result<(&str, Option<&str>), CliError> {
    if let Some(inner) = operand.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| CliError::bad_address(operand))?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|fields| (host, Some(fields)))
                .ok_or_else(|| CliError::bad_address(operand)),
        };
    }
    Ok(match operand.split_once(':') {
        Some((host, fields)) => (host, Some(fields)),
        None => (operand, None),
    })
}

/// The usage forms, as printed after a usage error.
fn synopsis() -> String {
    format!("usage: {}", USAGE_FORMS.join("\n       "))
}

fn version_text() -> String {
    format!("balance {}\n", env!("CARGO_PKG_VERSION"))
}

/// `--help`, rendered by clap from [`OPTIONS`].
fn help_text() -> String {
    let mut cmd = clap::Command::new("balance")
        .about(ABOUT)
        .override_usage(USAGE_FORMS.join("\n       "))
        .disable_help_flag(true)
        .disable_version_flag(true)
        .after_help(AFTER_HELP)
        .args(OPTIONS.iter().map(clap_arg))
        .arg(clap::Arg::new("PORT").help("Port to listen on: a number or a tcp service name"))
        .arg(
            clap::Arg::new("CHANNEL")
                .action(clap::ArgAction::Append)
                .help("Backend to relay to, or '!' / '%' to end a group (see below)"),
        );
    let mut text = cmd.render_help().to_string();
    let trimmed = text.trim_end().len();
    text.truncate(trimmed);
    text.push('\n');
    text
}

fn clap_arg(spec: &OptSpec) -> clap::Arg {
    let mut arg = clap::Arg::new(spec.id).help(spec.help);
    if let Some(short) = spec.short {
        arg = arg.short(short);
    }
    if let Some(long) = spec.long {
        arg = arg.long(long);
    }
    match spec.value {
        Some(name) => arg.value_name(name).action(clap::ArgAction::Set),
        None => arg.action(clap::ArgAction::SetTrue),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    const SERVICES: &str = "\
# test table
smtp\t\t25/tcp\t\tmail
imap2 143/tcp imap # inline comment
http 80/tcp www
";

    fn services() -> Services {
        Services::parse(SERVICES)
    }

    fn run(args: &[&str]) -> Result<Command, CliError> {
        parse(
            std::iter::once("balance").chain(args.iter().copied()),
            &services(),
        )
    }

    fn proxy(args: &[&str]) -> ProxyArgs {
        match run(args) {
            Ok(Command::Proxy(p)) => p,
            other => panic!("{args:?}: expected proxy, got {other:?}"),
        }
    }

    fn shell(args: &[&str]) -> ShellArgs {
        match run(args) {
            Ok(Command::Shell(s)) => s,
            other => panic!("{args:?}: expected shell, got {other:?}"),
        }
    }

    fn fail(args: &[&str]) -> CliError {
        match run(args) {
            Err(e) => e,
            Ok(c) => panic!("{args:?}: expected an error, got {c:?}"),
        }
    }

    /// Asserts a usage error whose first line is `balance: <first>`.
    fn assert_usage(args: &[&str], first: &str) {
        let err = fail(args);
        assert_eq!(err.code, 64, "{args:?}: {}", err.message);
        let mut lines = err.message.lines();
        assert_eq!(lines.next(), Some(format!("balance: {first}").as_str()));
        assert_eq!(
            lines.next(),
            Some(synopsis().lines().next().unwrap_or_default())
        );
        assert!(err
            .message
            .ends_with("Try 'balance --help' for more information."));
    }

    fn assert_plain(args: &[&str], code: u8, message: &str) {
        let err = fail(args);
        assert_eq!(
            (err.code, err.message.as_str()),
            (code, message),
            "{args:?}"
        );
    }

    fn channel(host: &str, port: u16, maxc: i32, text: &str) -> ChannelSpec {
        ChannelSpec {
            host: host.into(),
            port,
            maxc,
            text: text.into(),
        }
    }

    fn hosts(group: &GroupSpec) -> Vec<&str> {
        group.channels.iter().map(|c| c.host.as_str()).collect()
    }

    #[test]
    fn port_alone_gives_defaults_and_no_groups() {
        let p = proxy(&["8000"]);
        assert_eq!(
            p.common,
            Common {
                listen: Listen {
                    port: 8000,
                    port_text: "8000".into(),
                    bind: None
                },
                debug: false,
                run_dir: PathBuf::from("/run/balance"),
            }
        );
        assert!(p.groups.is_empty());
        assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(p.idle_timeout, None);
        assert_eq!(
            (p.user.as_str(), p.control_group.as_str()),
            ("balance", "balance")
        );
        assert_eq!(
            (p.workers, &p.pidfile, &p.syslog_socket, &p.source),
            (None, &None, &None, &None)
        );
        let flags = [
            p.autodisable,
            p.foreground,
            p.dump,
            p.hash_failover,
            p.ipv6,
            p.log_connections,
        ];
        assert_eq!(flags, [false; 6]);
    }

    #[test]
    fn each_short_flag_sets_its_field() {
        assert!(proxy(&["-a", "80"]).autodisable);
        assert!(proxy(&["-d", "80"]).common.debug);
        assert!(proxy(&["-f", "80"]).foreground);
        assert!(proxy(&["-p", "80"]).dump);
        assert!(proxy(&["-H", "80"]).hash_failover);
        assert!(proxy(&["-6", "80"]).ipv6);
        assert_eq!(proxy(&["-M", "80"]), proxy(&["80"]));
        assert_eq!(
            proxy(&["-B", "10.0.0.7", "80"]).source.as_deref(),
            Some("10.0.0.7")
        );
    }

    #[test]
    fn flags_bundle() {
        let p = proxy(&["-fdH", "80"]);
        assert!(p.foreground && p.common.debug && p.hash_failover && !p.dump);
        let p = proxy(&["-af6M", "80"]);
        assert!(p.autodisable && p.foreground && p.ipv6);
        assert!(proxy(&["-ff", "80"]).foreground);
    }

    #[test]
    fn value_options_take_glued_or_next_argument_even_in_a_bundle() {
        for args in [
            &["-ft5", "80"][..],
            &["-ft", "5", "80"],
            &["-t5", "80"],
            &["-t", "5", "80"],
        ] {
            assert_eq!(proxy(args).connect_timeout, 5, "{args:?}");
        }
        let p = proxy(&["-ft", "5", "80"]);
        assert!(p.foreground);
        assert_eq!(
            proxy(&["-b127.0.0.1", "80"]).common.listen.bind.as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            proxy(&["-fb", "::1", "80"]).common.listen.bind.as_deref(),
            Some("::1")
        );
    }

    #[test]
    fn value_is_taken_verbatim_like_getopt() {
        assert_eq!(shell(&["-c", "-x", "80"]).command.as_deref(), Some("-x"));
        assert_usage(
            &["-T", "-1", "80"],
            "invalid -T value '-1': need whole seconds up to 2147483647, 0 for none",
        );
        assert_usage(
            &["-t=5", "80"],
            "invalid -t value '=5': need whole seconds, 1 to 2147483647",
        );
    }

    #[test]
    fn last_occurrence_of_an_option_wins() {
        assert_eq!(proxy(&["-t", "3", "-t", "4", "80"]).connect_timeout, 4);
        assert_eq!(proxy(&["--user", "a", "--user=b", "80"]).user, "b");
    }

    #[test]
    fn options_may_follow_operands() {
        let p = proxy(&["8000", "-f", "h1"]);
        assert!(p.foreground);
        assert_eq!(p.common.listen.port, 8000);
        assert_eq!(p.groups[0].channels, vec![channel("h1", 8000, 0, "h1")]);
        let p = proxy(&["8000", "h1", "-t", "7", "h2", "--workers", "2"]);
        assert_eq!((p.connect_timeout, p.workers), (7, Some(2)));
        assert_eq!(hosts(&p.groups[0]), ["h1", "h2"]);
    }

    #[test]
    fn double_dash_ends_options() {
        let p = proxy(&["-f", "--", "8000", "-d", "--user"]);
        assert!(!p.common.debug);
        assert_eq!(hosts(&p.groups[0]), ["-d", "--user"]);
        assert_eq!(proxy(&["8000", "-"]).groups[0].channels[0].host, "-");
        assert_plain(&["--", "-5"], 64, "invalid port [-5], exiting.");
    }

    #[test]
    fn argv0_is_skipped() {
        let parsed = parse(["-x", "8000"], &services());
        assert!(matches!(parsed, Ok(Command::Proxy(p)) if p.common.listen.port == 8000));
    }

    #[test]
    fn bad_options_are_usage_errors_in_getopt_words() {
        assert_usage(&["-x", "8000", "h"], "invalid option -- 'x'");
        assert_usage(&["8000", "-fx"], "invalid option -- 'x'");
        assert_usage(&["-t"], "option requires an argument -- 't'");
        assert_usage(&["8000", "-fc"], "option requires an argument -- 'c'");
        assert_usage(&["--bogus", "80"], "unrecognized option '--bogus'");
        assert_usage(&["--use", "x", "80"], "unrecognized option '--use'");
        assert_usage(&["80", "--user"], "option '--user' requires an argument");
        assert_usage(
            &["--log-connections=yes", "80"],
            "option '--log-connections' doesn't allow an argument",
        );
    }

    #[test]
    fn no_operands_is_a_usage_error() {
        assert_usage(&[], "missing PORT operand");
        assert_usage(&["-f", "-t", "3"], "missing PORT operand");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_argument_is_a_usage_error() {
        use std::os::unix::ffi::OsStringExt;
        let args = [
            OsString::from("balance"),
            OsString::from_vec(vec![b'8', 0xff]),
        ];
        let err = parse(args, &services()).expect_err("non-UTF-8 must fail");
        assert_eq!(err.code, 64);
        assert!(err
            .message
            .starts_with("balance: argument is not valid UTF-8"));
    }

    #[test]
    fn help_and_version_win_over_the_rest() {
        for args in [&["--help"][..], &["-h"], &["-fh", "80"], &["--help", "-x"]] {
            assert!(matches!(run(args), Ok(Command::Help(_))), "{args:?}");
        }
        assert_usage(&["-x", "--help"], "invalid option -- 'x'");
        for args in [&["--version"][..], &["-V", "80"]] {
            let Ok(Command::Version(text)) = run(args) else {
                panic!("{args:?}: no version")
            };
            assert_eq!(text, format!("balance {}\n", env!("CARGO_PKG_VERSION")));
        }
    }

    #[test]
    fn help_documents_every_option_operands_and_exit_codes() {
        let help = help_text();
        for spec in OPTIONS {
            let name = match (spec.short, spec.long) {
                (_, Some(long)) => format!("--{long}"),
                (Some(short), None) => format!("-{short} "),
                (None, None) => unreachable!("option without a name"),
            };
            assert!(help.contains(&name), "help lacks {name}");
            assert!(help.contains(spec.help), "help lacks text of {name}");
        }
        for needle in [
            "host[:port[:maxc]]",
            "'!'",
            "'%'",
            "Exit status",
            "64",
            "65",
            "69",
        ] {
            assert!(help.contains(needle), "help lacks {needle}");
        }
        assert!(help.ends_with("\n") && !help.ends_with("\n\n"));
    }

    #[test]
    fn option_table_names_are_unique() {
        for (i, a) in OPTIONS.iter().enumerate() {
            for b in &OPTIONS[i + 1..] {
                assert!(a.opt != b.opt && a.id != b.id, "{} repeats", a.id);
                assert!(a.short.is_none() || a.short != b.short, "{} repeats", a.id);
                assert!(a.long.is_none() || a.long != b.long, "{} repeats", a.id);
            }
        }
    }

    #[test]
    fn interactive_shell_needs_exactly_the_port() {
        let s = shell(&["-i", "8000"]);
        assert_eq!(s.command, None);
        assert_eq!(s.common.listen.port, 8000);
        assert!(!s.json);
        let shell_needs = "the control shell (-i, -c) takes exactly one operand, the PORT";
        assert_usage(&["-i"], shell_needs);
        assert_usage(&["-i", "8000", "h"], shell_needs);
        assert_usage(&["-c", "show"], shell_needs);
    }

    #[test]
    fn one_shell_command_must_be_one_word() {
        let s = shell(&["-c", "mrtg-bytes 0 0", "8000"]);
        assert_eq!(s.command.as_deref(), Some("mrtg-bytes 0 0"));
        assert_usage(
            &["-c", "mrtg-bytes", "0", "0", "8000"],
            "the control shell (-i, -c) takes exactly one operand, the PORT",
        );
        assert_eq!(
            shell(&["-i", "-c", "show", "8000"]).command.as_deref(),
            Some("show")
        );
        assert_eq!(
            shell(&["-c", "show", "-i", "8000"]).command.as_deref(),
            Some("show")
        );
    }

    #[test]
    fn shell_takes_common_settings() {
        let s = shell(&[
            "-d",
            "-b",
            "::1",
            "--json",
            "--run-dir=/tmp/b",
            "--control-group",
            "ops",
            "-i",
            "smtp",
        ]);
        assert_eq!(
            s.common.listen,
            Listen {
                port: 25,
                port_text: "smtp".into(),
                bind: Some("::1".into())
            }
        );
        assert!(s.common.debug && s.json);
        assert_eq!(
            (s.common.run_dir, s.control_group),
            (PathBuf::from("/tmp/b"), "ops".into())
        );
        assert_plain(&["-i", "abc"], 64, "invalid port [abc], exiting.");
    }

    #[test]
    fn json_outside_the_shell_is_a_usage_error() {
        assert_usage(
            &["--json", "8000"],
            "--json only applies to the control shell (-i, -c)",
        );
    }

    #[test]
    fn listen_port_is_a_service_or_a_number_in_range() {
        assert_eq!(proxy(&["smtp"]).common.listen.port, 25);
        assert_eq!(proxy(&["mail"]).common.listen.port, 25);
        assert_eq!(proxy(&["65535"]).common.listen.port_text, "65535");
        for bad in ["abc", "0", "70000", "65536", "+80", "8o", ""] {
            assert_plain(&[bad], 64, &format!("invalid port [{bad}], exiting."));
        }
    }

    #[test]
    fn connect_timeout_must_be_at_least_one_second() {
        assert_eq!(proxy(&["-t", "1", "80"]).connect_timeout, 1);
        assert_eq!(proxy(&["-t", "007", "80"]).connect_timeout, 7);
        assert_eq!(
            proxy(&["-t", "2147483647", "80"]).connect_timeout,
            2_147_483_647
        );
        for bad in [
            "0",
            "abc",
            "-1",
            "5x",
            "",
            " 5",
            "2147483648",
            "4294967296",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            assert_usage(
                &["-t", bad, "80"],
                &format!("invalid -t value '{bad}': need whole seconds, 1 to 2147483647"),
            );
        }
    }

    #[test]
    fn half_close_timeout_defaults_to_a_minute_and_zero_means_none() {
        assert_eq!(proxy(&["80"]).half_close_timeout, Some(60));
        assert_eq!(
            proxy(&["--half-close-timeout", "0", "80"]).half_close_timeout,
            None
        );
        assert_eq!(
            proxy(&["--half-close-timeout=5", "80"]).half_close_timeout,
            Some(5)
        );
        assert_usage(
            &["--half-close-timeout", "-1", "80"],
            "invalid --half-close-timeout value '-1': need whole seconds up to 2147483647, 0 for none",
        );
    }

    #[test]
    fn idle_timeout_zero_means_none() {
        assert_eq!(proxy(&["-T", "0", "80"]).idle_timeout, None);
        assert_eq!(proxy(&["-T30", "80"]).idle_timeout, Some(30));
        assert_eq!(
            proxy(&["-T", "2147483647", "80"]).idle_timeout,
            Some(2_147_483_647)
        );
        for bad in ["-1", "x", "", "2147483648", "18446744073709551615"] {
            assert_usage(
                &["-T", bad, "80"],
                &format!(
                    "invalid -T value '{bad}': need whole seconds up to 2147483647, 0 for none"
                ),
            );
        }
    }

    #[test]
    fn bind_address_is_kept_as_typed_if_file_name_safe() {
        for good in [
            "127.0.0.1",
            "::1",
            "localhost",
            "::ffff:127.0.0.1",
            "my-host_1.example",
        ] {
            assert_eq!(
                proxy(&["-b", good, "80"]).common.listen.bind.as_deref(),
                Some(good)
            );
        }
        for bad in ["", "a/b", "../x", "a b", "fe80::1%eth0", "h\u{e9}"] {
            let err = fail(&["-b", bad, "80"]);
            assert_eq!(err.code, 64, "{bad:?}");
            assert!(err
                .message
                .starts_with(&format!("balance: invalid -b address '{bad}'")));
        }
    }

    #[test]
    fn long_options_take_values_both_ways() {
        let p = proxy(&[
            "--user=nobody",
            "--workers",
            "32",
            "--pidfile",
            "/run/b.pid",
            "--run-dir=/var/run/b",
            "--control-group",
            "wheel",
            "--syslog-socket=/dev/log",
            "--log-connections",
            "80",
        ]);
        assert_eq!(p.user, "nobody");
        assert_eq!(p.workers, Some(32));
        assert_eq!(p.pidfile, Some(PathBuf::from("/run/b.pid")));
        assert_eq!(p.common.run_dir, PathBuf::from("/var/run/b"));
        assert_eq!(p.control_group, "wheel");
        assert_eq!(p.syslog_socket, Some(PathBuf::from("/dev/log")));
        assert!(p.log_connections);
        assert_eq!(proxy(&["--workers=1", "80"]).workers, Some(1));
        // Relative paths are taken from the current directory, not from `/`, where the
        // daemon goes when it detaches.
        let cwd = std::env::current_dir().expect("current directory");
        let p = proxy(&[
            "--pidfile=b.pid",
            "--run-dir",
            "run",
            "--syslog-socket=./log",
            "80",
        ]);
        assert_eq!(p.pidfile, Some(cwd.join("b.pid")));
        assert_eq!(p.common.run_dir, cwd.join("run"));
        assert_eq!(p.syslog_socket, Some(cwd.join("log")));
    }

    #[test]
    fn long_option_values_are_checked() {
        for bad in ["0", "33", "-1", "x", ""] {
            assert_usage(
                &["--workers", bad, "80"],
                &format!("invalid --workers value '{bad}': need a number from 1 to 32"),
            );
        }
        assert_usage(&["--user", "", "80"], "--user needs a non-empty value");
        assert_usage(&["--pidfile=", "80"], "--pidfile needs a non-empty value");
        assert_usage(&["-B", "", "80"], "-B needs a non-empty value");
    }

    #[test]
    fn channels_use_services_and_default_to_the_listen_port() {
        let p = proxy(&[
            "-f",
            "smtp",
            "127.0.0.1",
            "127.0.0.1:imap",
            "127.0.0.1::5",
            "localhost:http",
        ]);
        assert_eq!(p.common.listen.port, 25);
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].kind, GroupKind::RoundRobin);
        assert_eq!(
            p.groups[0].channels,
            vec![
                channel("127.0.0.1", 25, 0, "127.0.0.1"),
                channel("127.0.0.1", 143, 0, "127.0.0.1:imap"),
                channel("127.0.0.1", 25, 5, "127.0.0.1::5"),
                channel("localhost", 80, 0, "localhost:http"),
            ]
        );
    }

    #[test]
    fn channel_fields_may_be_empty() {
        let p = proxy(&[
            "80",
            "h:",
            "h::",
            "h:81:",
            "h::2147483647",
            "h::-1",
            "h::-2147483648",
        ]);
        let got: Vec<_> = p.groups[0]
            .channels
            .iter()
            .map(|c| (c.port, c.maxc))
            .collect();
        // A negative maxc is a channel never chosen, as in the original (`maxc` in the
        // shell takes it too).
        assert_eq!(
            got,
            [
                (80, 0),
                (80, 0),
                (81, 0),
                (80, i32::MAX),
                (80, -1),
                (80, i32::MIN)
            ]
        );
    }

    #[test]
    fn ipv6_channels() {
        let p = proxy(&[
            "80",
            "[::1]",
            "[::1]:81",
            "[::1]:81:3",
            "[fe80::2]::7",
            "::1",
            "2001:db8::5",
            "fe80::1%lo",
            "fe80::1",
            "db1::5",
            "cafe::",
        ]);
        let got: Vec<_> = p.groups[0]
            .channels
            .iter()
            .map(|c| (c.host.as_str(), c.port, c.maxc))
            .collect();
        assert_eq!(
            got,
            [
                ("::1", 80, 0),
                ("::1", 81, 0),
                ("::1", 81, 3),
                ("fe80::2", 80, 7),
                ("::1", 80, 0),
                ("2001:db8::5", 80, 0),
                ("fe80::1%lo", 80, 0),
                // Where the original's reading (split at the first colon) works, it wins.
                ("fe80", 80, 1),
                ("db1", 80, 5),
                ("cafe", 80, 0),
            ]
        );
    }

    #[test]
    fn bad_channel_hosts_are_data_errors() {
        assert_plain(&["80", ":81"], 65, "unknown or invalid address []");
        assert_plain(&["80", "[]"], 65, "unknown or invalid address []");
        assert_plain(&["80", "[]:81"], 65, "unknown or invalid address []");
        assert_plain(&["80", "[::1"], 65, "unknown or invalid address [[::1]");
        assert_plain(&["80", "[::1]x"], 65, "unknown or invalid address [[::1]x]");
        assert_plain(&["80", ""], 65, "unknown or invalid address []");
    }

    #[test]
    fn bad_channel_ports_and_maxc_are_usage_errors() {
        for (op, port) in [
            ("h:0", "0"),
            ("h:70000", "70000"),
            ("h:nosuch", "nosuch"),
            ("h:-1", "-1"),
            ("[::1]:x:2", "x"),
        ] {
            assert_plain(
                &["80", op],
                64,
                &format!("invalid port [{port}] in channel [{op}]"),
            );
        }
        for (op, maxc) in [
            ("h:80:x", "x"),
            ("h:80:+1", "+1"),
            ("h:80:--1", "--1"),
            ("h:80:-", "-"),
            ("h::-2147483649", "-2147483649"),
            ("h::3:9", "3:9"),
            ("h::4294967296", "4294967296"),
            ("h::2147483648", "2147483648"),
            ("h::4294967295", "4294967295"),
        ] {
            assert_plain(
                &["80", op],
                64,
                &format!("invalid maxc [{maxc}] in channel [{op}]"),
            );
        }
    }

    #[test]
    fn separators_close_groups() {
        let p = proxy(&["80", "a", "b", "!", "c", "%", "d"]);
        let kinds: Vec<_> = p.groups.iter().map(|g| g.kind).collect();
        assert_eq!(
            kinds,
            [
                GroupKind::RoundRobin,
                GroupKind::Hash,
                GroupKind::RoundRobin
            ]
        );
        assert_eq!(
            p.groups.iter().map(hosts).collect::<Vec<_>>(),
            [vec!["a", "b"], vec!["c"], vec!["d"]]
        );
    }

    #[test]
    fn trailing_separator_sets_the_kind_and_adds_no_group() {
        let p = proxy(&["80", "a", "b", "%"]);
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].kind, GroupKind::Hash);
        let p = proxy(&["80", "a", "!"]);
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].kind, GroupKind::RoundRobin);
    }

    #[test]
    fn separator_without_channels_is_unavailable() {
        for args in [
            &["80", "!", "a"][..],
            &["80", "a", "!", "!", "b"],
            &["80", "%", "a"],
            &["80", "!"],
        ] {
            assert_plain(args, 69, "balance: no channels in group");
        }
        assert_plain(&["80", "!", "h:0"], 69, "balance: no channels in group");
    }

    /// Operands for `groups` groups of `per_group` channels, separated by `!`.
    fn grouped(groups: usize, per_group: usize) -> Vec<String> {
        let mut args = vec!["80".to_owned()];
        for g in 0..groups {
            if g > 0 {
                args.push("!".into());
            }
            args.extend((0..per_group).map(|c| format!("10.{g}.0.{c}")));
        }
        args
    }

    fn run_owned(args: &[String]) -> Result<Command, CliError> {
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn channel_limit_per_group() {
        let Ok(Command::Proxy(p)) = run_owned(&grouped(1, MAX_CHANNELS)) else {
            panic!("64 channels refused")
        };
        assert_eq!(p.groups[0].channels.len(), MAX_CHANNELS);
        let err = run_owned(&grouped(1, MAX_CHANNELS + 1)).expect_err("65 channels accepted");
        assert_eq!(
            (err.code, err.message.as_str()),
            (69, "balance: too many channels in one group")
        );
    }

    #[test]
    fn group_limit() {
        let mut args = grouped(MAX_GROUPS, MAX_CHANNELS);
        let Ok(Command::Proxy(p)) = run_owned(&args) else {
            panic!("32 x 64 refused")
        };
        assert_eq!(p.groups.len(), MAX_GROUPS);
        assert!(p.groups.iter().all(|g| g.channels.len() == MAX_CHANNELS));
        args.push("%".into());
        assert!(matches!(run_owned(&args), Ok(Command::Proxy(p)) if p.groups.len() == MAX_GROUPS));
        let err = run_owned(&grouped(MAX_GROUPS + 1, 1)).expect_err("33 groups accepted");
        assert_eq!(
            (err.code, err.message.as_str()),
            (69, "balance: too many groups")
        );
    }

    #[test]
    fn services_file_format() {
        let s = Services::parse(
            "# c\n\nftp 21/udp\nftp 21/tcp ftp-data\nsmtp 25/tcp\nsmtp 2525/tcp\nbad 99999/tcp\nbroken\nx y/tcp\n\
             dns 53/tcp domain #  nameserver\n   \tz 7/TCP\n",
        );
        assert_eq!(s.lookup("ftp"), Some(21));
        assert_eq!(s.lookup("ftp-data"), Some(21));
        assert_eq!(s.lookup("smtp"), Some(25));
        assert_eq!(s.lookup("domain"), Some(53));
        assert_eq!(s.lookup("nameserver"), None);
        assert_eq!(s.lookup("bad"), None);
        assert_eq!(s.lookup("x"), None);
        assert_eq!(s.lookup("z"), None);
        assert_eq!(s.lookup("FTP"), None);
    }

    #[test]
    fn services_from_file() {
        let missing = std::env::temp_dir().join("balance-cli-test-no-such-services-file");
        assert_eq!(Services::from_file(&missing), Services::default());
        let path =
            std::env::temp_dir().join(format!("balance-cli-test-services-{}", std::process::id()));
        std::fs::write(&path, "gopher 70/tcp\n").expect("write temp file");
        let s = Services::from_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(s.lookup("gopher"), Some(70));
    }

    #[test]
    fn parse_port_accepts_services_and_decimal_in_range() {
        let s = services();
        let cases = [
            ("25", Some(25)),
            ("00080", Some(80)),
            ("65535", Some(65535)),
            ("www", Some(80)),
            ("imap", Some(143)),
            ("0", None),
            ("65536", None),
            ("+25", None),
            (" 25", None),
            ("", None),
            ("nosuch", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_port(text, &s), want, "{text:?}");
        }
    }

    #[test]
    fn table_file_names() {
        assert_eq!(table_file_name(8000, None), "balance.8000.0.0.0.0");
        assert_eq!(table_file_name(19041, Some("::1")), "balance.19041.::1");
        assert_eq!(
            table_file_name(25, Some("localhost")),
            "balance.25.localhost"
        );
    }

    #[test]
    fn error_displays_its_message() {
        let err = fail(&["0"]);
        assert_eq!(err.to_string(), "invalid port [0], exiting.");
        assert!(!fail(&["-x"]).message.ends_with('\n'));
    }
}
