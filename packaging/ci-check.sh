#!/usr/bin/env bash
# Builds the Debian package and checks it as an operator uses it: lintian, the systemd
# units (verify, security score, capability set), then on this machine dpkg -i, the
# init script with two instances on loopback, the control shell as root and as a member
# of group balance, reload, stop, an upgrade (running daemons restarted), dpkg -r and
# dpkg -P. Runs as root; changes the machine (installs the package, deletes and recreates
# user balance, sets policy-rc.d and runlevel aside during the upgrade) and leaves it as
# it found it, user balance included. Prints "packaging: N passed, N failed" last.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work="$repo/target/pkg"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$work/cargo}"

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging/ci-check.sh: run as root (it installs the package)" >&2
    exit 1
fi
if dpkg-query -W -f='${Status}' balance 2>/dev/null | grep -q 'installed\|config-files'; then
    echo "packaging/ci-check.sh: package balance is already on this machine; purge it first" >&2
    exit 1
fi

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
# check DESCRIPTION COMMAND...: runs COMMAND, counts the outcome.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
finish() {
    echo "packaging: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}
fatal() {
    fail "$*"
    finish || exit 1
}

# --- tools -------------------------------------------------------------------------
missing=()
command -v dpkg-buildpackage >/dev/null || missing+=(dpkg-dev)
command -v dh >/dev/null || missing+=(debhelper)
command -v lintian >/dev/null || missing+=(lintian)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v adduser >/dev/null || missing+=(adduser)
command -v python3 >/dev/null || missing+=(python3)
command -v man >/dev/null || missing+=(man-db)
command -v strace >/dev/null || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- processes started here are stopped by pid, whatever happens --------------------
pids=()
installed=no
# Files replaced for one step (see the upgrade), put back whatever happens.
set_aside=()
# set_aside FILE: moves FILE (or the symlink), if there is one, to FILE.ci-aside until
# restore_set_aside, which also removes what was put in its place.
set_aside() {
    if [ -e "$1.ci-aside" ] || [ -L "$1.ci-aside" ]; then
        echo "$1.ci-aside exists: not setting $1 aside over it" >&2
        return 1
    fi
    if [ -e "$1" ] || [ -L "$1" ]; then mv -T "$1" "$1.ci-aside"; fi
    set_aside+=("$1")
}
# put_back FILE [SAY]: FILE.ci-aside, if there is one, becomes FILE again (over what stood
# in its place), and SAY is printed.
put_back() {
    if [ -e "$1.ci-aside" ] || [ -L "$1.ci-aside" ]; then
        mv -fT "$1.ci-aside" "$1"
        [ -z "${2:-}" ] || echo "$2"
    fi
}
restore_set_aside() {
    local f
    for f in "${set_aside[@]}"; do
        rm -f "$f"
        put_back "$f"
    done
    set_aside=()
}
# What a run killed in the middle of the upgrade left set aside goes back first.
for f in /usr/sbin/policy-rc.d /usr/sbin/runlevel; do
    put_back "$f" "put $f back (set aside by an earlier run that was cut short)"
done
cleanup() {
    set +e
    restore_set_aside
    if [ "$installed" = yes ]; then
        /etc/init.d/balance stop >/dev/null 2>&1
        dpkg -P balance >/dev/null 2>&1
    fi
    for f in "$work"/caps-run/*.pid; do
        [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    for p in "${pids[@]}"; do
        [ "$p" -gt 1 ] 2>/dev/null && kill "$p" 2>/dev/null
    done
    # The other tests need the service user.
    getent passwd balance >/dev/null ||
        adduser --system --group --no-create-home --home /nonexistent balance >/dev/null
}
trap cleanup EXIT

# forget_pids PID...: takes processes seen gone off the list (their pids may be reused).
forget_pids() {
    local keep=() p q
    for p in "${pids[@]}"; do
        for q in "$@"; do [ "$p" = "$q" ] && continue 2; done
        keep+=("$p")
    done
    pids=("${keep[@]}")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds or time is up.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# fetch PORT: prints the body of http://127.0.0.1:PORT/id (the backend's name).
fetch() {
    python3 - "$1" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/id", timeout=5) as r:
    sys.stdout.write(r.read().decode().strip())
PY
}

# gone PID: the process has exited (a zombie waiting for init to reap it counts).
gone() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [ -z "$state" ] || [ "$state" = Z ]
}

# --- versions ----------------------------------------------------------------------
version=$(cd "$repo" && cargo pkgid --offline | sed 's/.*[#@]//')
changelog_version=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
check "debian/changelog version $changelog_version is Cargo.toml's $version" \
    [ "$changelog_version" = "$version" ]

# --- build from a copy, so that build products stay out of the tree ----------------
mkdir -p "$work"
src="$work/src/balance"
rm -rf "$work/src"
mkdir -p "$src"
tar -C "$repo" --exclude=./target --exclude=./.git -cf - . | tar -C "$src" -xf -
echo "building the package (log: $work/build.log)"
if ! (cd "$src" && dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log"
    fatal "dpkg-buildpackage"
fi
deb="$work/src/balance_${version}_$(dpkg --print-architecture).deb"
check "dpkg-buildpackage built $(basename "$deb")" test -f "$deb"
[ -f "$deb" ] || fatal "no package to check"
check "package version is $version" [ "$(dpkg-deb -f "$deb" Version)" = "$version" ]

if lintian --fail-on error,warning --display-info "$deb" >"$work/lintian.log" 2>&1; then
    pass "lintian: no errors or warnings"
else
    fail "lintian: no errors or warnings"
fi
cat "$work/lintian.log"

# --- systemd units, against the packaged binary ------------------------------------
root="$work/root"
rm -rf "$root"
dpkg-deb -x "$deb" "$root"
binary="$root/usr/sbin/balance"
units="$work/units"
rm -rf "$units"
mkdir -p "$units"
unitdir="$root/lib/systemd/system"
[ -d "$unitdir" ] || unitdir="$root/usr/lib/systemd/system"
for u in balance.service balance@.service; do
    sed "s#/usr/sbin/balance#$binary#g" "$unitdir/$u" >"$units/$u"
done
for u in balance@ci.service balance.service; do
    if systemd-analyze verify --man=no "$units/$u" >"$work/verify.out" 2>"$work/verify.err" &&
        [ ! -s "$work/verify.err" ]; then
        pass "systemd-analyze verify $u: silent"
    else
        cat "$work/verify.err"
        fail "systemd-analyze verify $u: silent"
    fi
    if systemd-analyze security --offline=true --threshold=35 "$units/$u" >"$work/security.out" 2>&1; then
        pass "systemd-analyze security $u: $(grep -o 'exposure level.*' "$work/security.out")"
    else
        tail -n 3 "$work/security.out"
        fail "systemd-analyze security $u at 3.5 or better"
    fi
done

# The unit's bounding set is all the root bootstrap gets: two instances (the second
# finds the run directory already given to user balance) must start and serve under it.
caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$units/balance@.service" |
    tr '[:upper:]' '[:lower:]' | sed 's/cap_/+/g; s/ /,/g')
caps_run="$work/caps-run"
rm -rf "$caps_run"
mkdir -p "$work/www/b1" "$work/www/b2"
echo b1 >"$work/www/b1/id"
echo b2 >"$work/www/b2/id"
b1=$(free_port)
b2=$(free_port)
python3 -m http.server "$b1" --bind 127.0.0.1 --directory "$work/www/b1" >/dev/null 2>&1 &
pids+=($!)
python3 -m http.server "$b2" --bind 127.0.0.1 --directory "$work/www/b2" >/dev/null 2>&1 &
pids+=($!)
wait_for 10 fetch "$b1" >/dev/null || fatal "backend on 127.0.0.1:$b1"
wait_for 10 fetch "$b2" >/dev/null || fatal "backend on 127.0.0.1:$b2"
getent passwd balance >/dev/null ||
    adduser --system --group --no-create-home --home /nonexistent balance >/dev/null
for i in 1 2; do
    port=$(free_port)
    if setpriv --bounding-set "-all,$caps" --inh-caps -all --regid balance --clear-groups \
        "$binary" --run-dir "$caps_run" --pidfile "$caps_run/$i.pid" "$port" "127.0.0.1:$b1" &&
        [ "$(fetch "$port")" = b1 ]; then
        pass "instance $i serves with only the unit's capabilities ($caps)"
    else
        fail "instance $i serves with only the unit's capabilities ($caps)"
    fi
done
for f in "$caps_run"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid"
    wait_for 15 gone "$pid" || fail "capability test instance $pid stops on SIGTERM"
done
rm -rf "$caps_run"

# The unit's system-call filter is inherited by everything balance runs (the workers add
# their own on top): every call of one instance from start to stop, through traffic and a
# reload, must be in it. The filter's groups are expanded by systemd itself.
declare -A seen_groups=()
expand_filter() {
    local item
    for item in "$@"; do
        case "$item" in
            @*)
                [ -n "${seen_groups[$item]-}" ] && continue
                seen_groups[$item]=1
                # shellcheck disable=SC2046
                expand_filter $(systemd-analyze syscall-filter --no-pager "$item" |
                    sed '1d; s/^ *//; /^#/d; /^$/d')
                ;;
            *) echo "$item" ;;
        esac
    done
}
allowed="$work/filter-allowed"
denied="$work/filter-denied"
: >"$allowed"
: >"$denied"
while IFS= read -r line; do
    value=${line#SystemCallFilter=}
    seen_groups=()
    # shellcheck disable=SC2086
    case "$value" in
        "~"*) expand_filter ${value#"~"} >>"$denied" ;;
        *) expand_filter $value >>"$allowed" ;;
    esac
done < <(grep '^SystemCallFilter=' "$units/balance@.service")
filter_run="$work/filter-run"
rm -rf "$filter_run"
port=$(free_port)
strace -f -qq -o "$work/strace.out" \
    "$binary" --run-dir "$filter_run" --pidfile "$filter_run/s.pid" "$port" "127.0.0.1:$b1" &
strace_pid=$!
pids+=("$strace_pid")
if wait_for 20 test -s "$filter_run/s.pid" && wait_for 20 fetch "$port" >/dev/null; then
    supervisor=$(cat "$filter_run/s.pid")
    kill -HUP "$supervisor"
    sleep 1
    fetch "$port" >/dev/null || true
    kill "$supervisor"
    wait_for 30 gone "$strace_pid" || kill "$strace_pid"
    wait "$strace_pid" 2>/dev/null || true
    calls=$(sed -nE 's/^[0-9]+ +(<\.\.\. )?([a-z0-9_]+)[( ].*/\2/p' "$work/strace.out" | sort -u)
    outside=$(comm -23 <(printf '%s\n' "$calls") \
        <(sort -u "$allowed" | comm -23 - <(sort -u "$denied")) | tr '\n' ' ')
    check "the unit's SystemCallFilter allows all $(wc -w <<<"$calls") calls balance makes${outside:+; not: $outside}" \
        [ -z "$outside" ]
else
    fail "an instance under strace serves on port $port"
fi
rm -rf "$filter_run"

# --- install on a machine without the service user ---------------------------------
if getent passwd balance >/dev/null; then
    wait_for 30 deluser --quiet --system balance ||
        fatal "deluser balance (processes of user balance still running?)"
fi
getent group balance >/dev/null && delgroup --quiet --system balance
check "user balance is gone before dpkg -i" bash -c '! getent passwd balance && ! getent group balance'

installed=yes
if dpkg -i "$deb" >"$work/dpkg-i.log" 2>&1; then
    pass "dpkg -i"
else
    cat "$work/dpkg-i.log"
    fatal "dpkg -i"
fi
check "postinst created system user balance, home /nonexistent, group balance" \
    bash -c '[ "$(getent passwd balance | cut -d: -f4,6)" = "$(getent group balance | cut -d: -f3):/nonexistent" ] &&
        [ "$(getent passwd balance | cut -d: -f3)" -lt 1000 ]'
for f in /usr/sbin/balance /etc/init.d/balance /etc/default/balance \
    /usr/share/man/man8/balance.8.gz; do
    check "installed $f" test -e "$f"
done
check "installed the systemd units" test -e "${unitdir#"$root"}/balance@.service" -a \
    -e "${unitdir#"$root"}/balance.service"
check "man balance renders" bash -c 'man 8 balance 2>&1 | grep -q "CONTROL COMMANDS"'
check "balance --version is $version" [ "$(/usr/sbin/balance --version)" = "balance $version" ]
# No daemon may have been started (policy-rc.d, empty BALANCE_INSTANCES): no pid files. An
# empty /run/balance left by an earlier run by hand does not count.
check "dpkg -i started nothing (policy-rc.d or empty BALANCE_INSTANCES)" \
    bash -c '! ls /run/balance/*.pid >/dev/null 2>&1'


# --- two instances through the init script -----------------------------------------
p1=$(free_port)
p2=$(free_port)
cat >/etc/default/balance <<CONF
BALANCE_INSTANCES="ci_rr ci_bound"
BALANCE_ARGS_ci_rr="--workers 2 $p1 127.0.0.1:$b1 127.0.0.1:$b2"
BALANCE_ARGS_ci_bound="-b 127.0.0.1 $p2 127.0.0.1:$b2"
CONF
# What balance says while starting (here: no /dev/log) comes after the progress line.
starts_cleanly() {
    local out
    out=$(service balance start 2>&1) || { echo "$out"; return 1; }
    [ "$(head -n 1 <<<"$out")" = "Starting TCP load balancer: balance ci_rr ci_bound." ] ||
        { echo "$out"; return 1; }
}
check "service balance start, its progress line whole" starts_cleanly
check "pidfiles /run/balance/ci_rr.pid and ci_bound.pid" \
    test -s /run/balance/ci_rr.pid -a -s /run/balance/ci_bound.pid
check "/run/balance is balance:balance 0750" \
    [ "$(stat -c '%U:%G %a' /run/balance)" = "balance:balance 750" ]
check "table files are root:balance 0640" bash -c "
    [ \"\$(stat -c '%U:%G %a' /run/balance/balance.$p1.0.0.0.0 /run/balance/balance.$p2.127.0.0.1)\" = \
      \"\$(printf 'root:balance 640\nroot:balance 640')\" ]"
check "service balance status: running" service balance status
sup1=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
sup2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
# Stopped by pid at exit should the init script fail to.
pids+=("$sup1" "$sup2")
check "service balance start again: no second daemon" service balance start
seen="$(fetch "$p1" || true) $(fetch "$p1" || true)"
check "round robin through port $p1 reaches both backends ($seen)" \
    bash -c "[[ '$seen' == *b1* && '$seen' == *b2* ]]"
check "traffic through 127.0.0.1:$p2 reaches backend b2" [ "$(fetch "$p2")" = b2 ]

show_root=$(/usr/sbin/balance -c show "$p1" 2>&1) || true
check "balance -c show $p1 as root lists both channels" \
    bash -c "grep -q ' $b1 ' <<<'$show_root' && grep -q ' $b2 ' <<<'$show_root'"
show_group=$(setpriv --reuid=nobody --regid=nogroup --groups=balance \
    /usr/sbin/balance -b 127.0.0.1 -c show "$p2" 2>&1) || true
check "balance -c show $p2 as a member of group balance" \
    bash -c "grep -q ' $b2 ' <<<'$show_group'"
check "balance -c disable as a member of group balance is refused" \
    bash -c "! setpriv --reuid=nobody --regid=nogroup --groups=balance \
        /usr/sbin/balance -c 'disable 0' $p1 >/dev/null 2>&1"
check "balance -c show as user nobody without the group is refused" \
    bash -c "! setpriv --reuid=nobody --regid=nogroup --clear-groups \
        /usr/sbin/balance -c show $p1 >/dev/null 2>&1"

# One instance at a time: restarting or stopping ci_bound leaves ci_rr alone.
rr_pid=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
old_bound=$sup2
check "service balance restart ci_bound" service balance restart ci_bound
sup2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$sup2")
check "restart ci_bound kept ci_rr ($rr_pid)" \
    [ "$(cat /run/balance/ci_rr.pid 2>/dev/null)" = "$rr_pid" ]
check "restart ci_bound started a new one ($old_bound -> $sup2)" \
    bash -c "[ '$sup2' != '$old_bound' ] && kill -0 $sup2"
check "service balance stop ci_bound, ci_rr still running" bash -c "
    service balance stop ci_bound >/dev/null && [ ! -e /run/balance/ci_bound.pid ] &&
    service balance status ci_rr >/dev/null"
check "service balance start ci_bound" service balance start ci_bound
sup2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$sup2")
check "an instance not in /etc/default/balance: 6" \
    [ "$(timeout 60 service balance restart nosuch >/dev/null 2>&1; echo $?)" -eq 6 ]
check "an invalid instance name: 2" \
    [ "$(timeout 60 service balance stop 'a;b' >/dev/null 2>&1; echo $?)" -eq 2 ]

# reload sends SIGHUP: the workers are replaced one by one, the supervisor stays.
before=$(cat /run/balance/ci_rr.pid || true)
check "service balance reload" service balance reload
sleep 1
check "reload keeps the supervisor" [ "$(cat /run/balance/ci_rr.pid 2>/dev/null)" = "$before" ]
check "serving after reload" wait_for 10 fetch "$p1"
check "service balance status after reload" service balance status

check "service balance stop" service balance stop
check "supervisors $sup1 and $sup2 are gone" wait_for 15 bash -c "
    $(declare -f gone); gone $sup1 && gone $sup2"
check "stop removed /run/balance" test ! -e /run/balance
status=0
service balance status >/dev/null 2>&1 || status=$?
check "service balance status after stop: 3 (not running)" [ "$status" -eq 3 ]

# LSB exit codes and what the init script must not be fooled by.
rc_of() {
    local rc=0
    timeout 60 "$@" >/dev/null 2>&1 || rc=$?
    echo "$rc"
}
both_gone() { gone "$sup1" && gone "$sup2"; }
# stops_both COMMAND...: the command succeeds and both supervisors are gone after it.
stops_both() {
    timeout 60 "$@" >/dev/null 2>&1 && wait_for 15 both_gone
}
refuses_to_start() {
    [ "$(rc_of service balance start)" -eq 6 ] && [ ! -e /run/balance/ci_rr.pid ]
}
check "service balance reload with nothing running: 7" [ "$(rc_of service balance reload)" -eq 7 ]
# The run directory belongs to the service user: names it puts there must not steer root's
# stop (a name with spaces used to become start-stop-daemon options and kill anything).
sleep 600 &
victim=$!
pids+=("$victim")
install -d -m 0750 -o balance -g balance /run/balance
setpriv --reuid=balance --regid=balance --clear-groups sh -c "
    echo $victim >/run/balance/x; echo $victim >'/run/balance/x --name sleep -- y.pid'
    echo $victim >/run/balance/planted.pid"
rc_of service balance stop >/dev/null
check "stop leaves alone what the service user planted in /run/balance" kill -0 "$victim"
kill "$victim" 2>/dev/null || true
rm -rf /run/balance
install -d -m 0750 -o root -g balance /run/balance
echo "${pids[0]}" >/run/balance/ci_rr.pid
check "status with another process's pid in the pid file: 1 (dead, pid file exists)" \
    [ "$(rc_of service balance status)" -eq 1 ]
rm -rf /run/balance
good_conf=$(cat /etc/default/balance)
# ci_rr_args ARGS: the configuration as it was, with ARGS before ci_rr's port and channel.
ci_rr_args() {
    printf '%s\nBALANCE_ARGS_ci_rr="%s %s 127.0.0.1:%s"\n' "$good_conf" "$1" "$p1" "$b1" \
        >/etc/default/balance
}
# Stops what a start left running (ci_bound; by pid at exit should the init script fail to).
stop_the_rest() {
    pids+=("$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)")
    service balance stop >/dev/null 2>&1 || true
    rm -rf /run/balance
}
# The progress line names the misconfigured instance too (it used to leave it out, so that
# "failed!" seemed to be about the instance before it).
ci_rr_args -af
names_every_instance() {
    local out
    out=$(service balance start 2>&1)
    [ "$(head -n 1 <<<"$out")" = "Starting TCP load balancer: balance ci_rr ci_bound failed!" ] ||
        { echo "$out"; return 1; }
}
check "a misconfigured instance is named on the progress line" names_every_instance
stop_the_rest
# -fb ADDR used to pass (the cluster was taken for an option with a value) and hang the
# start; --bogus is refused by balance itself (64), which is LSB's 6 too.
for bad in "--pidfile /tmp/other.pid" "-f" "-af" "-c show" "-fb 127.0.0.1" "-cshow" "-V" \
    "--help" "--bogus"; do
    ci_rr_args "$bad"
    check "BALANCE_ARGS with $bad: start refuses (6) and starts nothing" refuses_to_start
    stop_the_rest
done
# An option's value that starts with a dash is not taken for flags: here balance itself
# refuses the group (67, LSB's 6), not the init script.
ci_rr_args "--control-group -fx"
value_is_not_flags() {
    local out rc=0
    out=$(timeout 60 service balance start 2>&1) || rc=$?
    [ "$rc" -eq 6 ] && ! grep -q "leave out" <<<"$out" && grep -q -- "-fx" <<<"$out" ||
        { echo "rc=$rc: $out"; return 1; }
}
check "a value starting with a dash (--control-group -fx) is balance's to judge" value_is_not_flags
stop_the_rest
printf 'BALANCE_INSTANCES="ci_rr"\nBALANCE_ARGS_ci_rr="-b 127.0.0.1 %s 127.0.0.1:%s"\n' \
    "$b1" "$b2" >/etc/default/balance
check "a start that fails (port $b1 taken) is 1 and leaves no /run/balance" \
    bash -c "[ \$(timeout 60 service balance start >/dev/null 2>&1; echo \$?) -eq 1 ] &&
        [ ! -e /run/balance ]"
printf '%s\n' "$good_conf" >/etc/default/balance
check "service balance start (before breaking the configuration)" service balance start
sup1=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
sup2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$sup1" "$sup2")
printf '%s\nBALANCE_ARGS_broken="unclosed\n' "$good_conf" >/etc/default/balance
check "with a syntax error in /etc/default/balance: start 6" [ "$(rc_of service balance start)" -eq 6 ]
check "with a syntax error: status 4 (unknown)" [ "$(rc_of service balance status)" -eq 4 ]
check "with a syntax error: stop still stops every daemon" stops_both service balance stop
printf '%s\n' "$good_conf" >/etc/default/balance

# --- upgrade -----------------------------------------------------------------------
# An upgrade restarts the running daemons (debhelper's postinst runs the init script's
# restart): a new control shell cannot attach to the table of a daemon started by the old
# binary when the table layout changed, as it did between releases. The same package
# repacked under a higher version stands for the next release.
check "service balance start (before the upgrade)" service balance start
old1=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
old2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$old1" "$old2")
rm -rf "$work/next"
dpkg-deb -R "$deb" "$work/next"
sed -i "s/^Version: .*/Version: ${version}+ci1/" "$work/next/DEBIAN/control"
next_deb="$work/balance_${version}+ci1.deb"
dpkg-deb -b "$work/next" "$next_deb" >/dev/null
# Maintainer scripts take no service action on this machine: policy-rc.d exits 101, and
# runlevel (systemctl's, without systemd running) knows none, so invoke-rc.d does nothing.
# For this one dpkg -i they are as on a sysvinit machine in runlevel 2.
set_aside /usr/sbin/policy-rc.d
set_aside /usr/sbin/runlevel
printf '#!/bin/sh\necho "N 2"\n' >/usr/sbin/runlevel
chmod 0755 /usr/sbin/runlevel
upgrade_rc=0
dpkg -i "$next_deb" >"$work/dpkg-upgrade.log" 2>&1 || upgrade_rc=$?
restore_set_aside
[ "$upgrade_rc" -eq 0 ] || cat "$work/dpkg-upgrade.log"
check "dpkg -i of version ${version}+ci1 (an upgrade, service actions allowed)" \
    [ "$upgrade_rc" -eq 0 ]
check "the upgrade stopped both daemons ($old1 $old2)" wait_for 15 bash -c "
    $(declare -f gone); gone $old1 && gone $old2"
gone "$old1" && gone "$old2" && forget_pids "$old1" "$old2"
new1=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
new2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$new1" "$new2")
check "and started both again ($new1 $new2)" \
    bash -c "[ $new1 != $old1 ] && [ $new2 != $old2 ] && kill -0 $new1 $new2"
show_upgraded=$(/usr/sbin/balance -c show "$p1" 2>&1) || true
check "balance -c show $p1 after the upgrade" \
    bash -c "grep -q ' $b1 ' <<<'$show_upgraded' && grep -q ' $b2 ' <<<'$show_upgraded'"
check "serving after the upgrade" wait_for 10 fetch "$p2"
check "service balance stop (after the upgrade)" service balance stop

# --- removal -----------------------------------------------------------------------
# Daemons still running when the package goes (a policy-rc.d may keep prerm from
# stopping them) can be stopped afterwards with the init script, which stays until purge
# (not executable: debhelper's postrm takes the x bit away).
check "service balance start (before removal)" service balance start
sup1=$(cat /run/balance/ci_rr.pid 2>/dev/null || echo 0)
sup2=$(cat /run/balance/ci_bound.pid 2>/dev/null || echo 0)
pids+=("$sup1" "$sup2")
check "dpkg -r" dpkg -r balance
check "after dpkg -r, sh /etc/init.d/balance stop stops every daemon" \
    stops_both sh /etc/init.d/balance stop
check "and removes /run/balance" test ! -e /run/balance

check "dpkg -r removed /usr/sbin/balance" test ! -e /usr/sbin/balance
check "dpkg -r kept the conffile /etc/default/balance" test -e /etc/default/balance
# An instance enabled the documented way ("systemctl enable balance@NAME") leaves a link
# that debhelper does not know of.
mkdir -p /etc/systemd/system/balance.service.wants
ln -sf /lib/systemd/system/balance@.service \
    /etc/systemd/system/balance.service.wants/balance@ci.service
check "dpkg -P" dpkg -P balance
installed=no
leftovers=$(ls -d /etc/balance* /etc/default/balance /etc/init.d/balance /etc/rc?.d/*balance \
    /lib/systemd/system/balance* /usr/lib/systemd/system/balance* /etc/systemd/system/balance* \
    /etc/systemd/system/*/balance* /var/lib/systemd/deb-systemd-helper-enabled/*balance* \
    /var/lib/systemd/deb-systemd-helper-enabled/*/balance* /run/balance /usr/sbin/balance \
    /usr/share/man/man8/balance.8.gz /usr/share/doc/balance 2>/dev/null || true)
check "dpkg -P left nothing behind${leftovers:+: $leftovers}" [ -z "$leftovers" ]
check "dpkg -P kept user and group balance" bash -c 'getent passwd balance && getent group balance' 

finish
