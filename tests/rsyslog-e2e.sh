#!/usr/bin/env bash
# End-to-end syslog check with Debian's rsyslog, started by hand (no init system here):
# the daemon's events and the control audit trail land in rsyslog's output file, logging
# goes on after rsyslog restarts, and a burst of connection lines lands whole. Loopback
# only; every process is stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BALANCE_BIN:-target/debug/balance}

if ! command -v rsyslogd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog
fi

work=$(mktemp -d /tmp/balance-rsyslog.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/rsyslogd.pid" ] && kill "$(cat "$work/rsyslogd.pid" 2>/dev/null)" 2>/dev/null || true
    [ -f "$work/balance.pid" ] && kill "$(cat "$work/balance.pid" 2>/dev/null)" 2>/dev/null || true
    sleep 0.3
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/rsyslog.conf" <<CONF
global(workDirectory="$work")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="$work/log" CreatePath="on")
\$FileCreateMode 0644
authpriv.*;daemon.* $work/messages
CONF

start_rsyslog() {
    rm -f "$work/rsyslogd.pid"
    rsyslogd -n -f "$work/rsyslog.conf" -i "$work/rsyslogd.pid" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$work/log" ] && break; sleep 0.05; done
    [ -S "$work/log" ] || { echo "rsyslogd did not create its socket"; exit 1; }
    # The daemon runs as user balance: the socket must be writable for it.
    chmod 666 "$work/log"
}

passed=0 failed=0
check() { # description, pattern
    local ok=0
    for _ in $(seq 100); do
        if grep -q -- "$2" "$work/messages" 2>/dev/null; then ok=1; break; fi
        sleep 0.1
    done
    if [ $ok = 1 ]; then passed=$((passed + 1)); echo "ok: $1"
    else failed=$((failed + 1)); echo "FAILED: $1 (no line matching '$2')"; fi
}

start_rsyslog
python3 -c '
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"B1\n"); c.close()
' > "$work/backend.port" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/backend.port" ] && break; sleep 0.05; done
backend=$(cat "$work/backend.port")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

"$bin" --run-dir "$work/run" --pidfile "$work/balance.pid" --syslog-socket "$work/log" \
    --log-connections -b 127.0.0.1 "$port" "127.0.0.1:$backend"
pid=$(cat "$work/balance.pid")
check "start-up on record" "Balance\[$pid\]: balance .* started: listening on 127.0.0.1:$port"
check "privilege drop on record" "Balance\[$pid\]: privileges dropped to user balance"

python3 -c "import socket; s=socket.create_connection(('127.0.0.1',$port)); print(s.recv(10))"
check "connection line" "Balance\[$pid\]: connection from 127.0.0.1:.* bytes up.* (worker [0-9]*)"

"$bin" --run-dir "$work/run" --syslog-socket "$work/log" -b 127.0.0.1 -c "disable 0" "$port"
check "audit of the control command" "uid 0 (root) pid [0-9]*: disable group 0 channel 0: enabled -> disabled"
check "supervisor observed the change" "Balance\[$pid\]: table change observed: group 0 channel 0"
"$bin" --run-dir "$work/run" --syslog-socket "$work/log" -b 127.0.0.1 -c "enable 0" "$port"

# rsyslog restarts: balance must reconnect.
kill "$(cat "$work/rsyslogd.pid")"
for _ in $(seq 100); do [ -S "$work/log" ] || break; sleep 0.05; done
start_rsyslog
before=$(grep -c "connection from" "$work/messages" || true)
for _ in 1 2 3; do
    python3 -c "import socket; s=socket.create_connection(('127.0.0.1',$port)); s.recv(10)"
done
ok=0
for _ in $(seq 100); do
    now=$(grep -c "connection from" "$work/messages" || true)
    if [ "$now" -gt "$before" ]; then ok=1; break; fi
    sleep 0.1
done
if [ $ok = 1 ]; then passed=$((passed + 1)); echo "ok: logging after rsyslog restart"
else failed=$((failed + 1)); echo "FAILED: nothing logged after rsyslog restart"; fi

# A burst far bigger than the socket's queue (net.unix.max_dgram_qlen): every connection
# line lands, none is lost to a busy rsyslog (lines that find the queue full wait).
burst=2000
before=$(grep -c "connection from" "$work/messages" || true)
python3 -c "
import socket
from concurrent.futures import ThreadPoolExecutor
def one(_):
    s = socket.create_connection(('127.0.0.1', $port), timeout=10); s.recv(10); s.close()
with ThreadPoolExecutor(16) as ex: list(ex.map(one, range($burst)))
"
ok=0
for _ in $(seq 100); do
    now=$(grep -c "connection from" "$work/messages" || true)
    if [ "$now" -ge $((before + burst)) ]; then ok=1; break; fi
    sleep 0.1
done
if [ $ok = 1 ] && ! grep -q "could not be delivered" "$work/messages"; then
    passed=$((passed + 1)); echo "ok: a burst of $burst connection lines, none lost"
else
    failed=$((failed + 1))
    echo "FAILED: $((now - before)) of $burst connection lines; $(grep -c "could not be delivered" "$work/messages" || true) loss warnings"
fi

kill "$pid"
check "shutdown on record" "Balance\[$pid\]: stopped"
echo "rsyslog: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
