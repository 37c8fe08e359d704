#!/usr/bin/env python3
"""Benchmark balance against HAProxy (mode tcp, with and without splice) and a direct
connection, on loopback only.

Everything this script starts is remembered by pid and stopped by pid (SIGTERM, then SIGKILL
after a bounded wait), also on Ctrl-C. Every wait and every loop is bounded.

Proxy CPU is utime+stime+cutime+cstime from /proc/<pid>/stat, summed over the proxy's
processes and all their descendants (balance: supervisor and workers; HAProxy: its one
process, threads included), sampled just before and just after each measurement.

Exit status: 0 when the harness ran (targets may FAIL: that is a result, not an error),
1 when the harness itself broke (a tool is missing, a server did not start, balance did not
relay), 2 on a bad command line.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ["direct", "balance", "haproxy", "haproxy-splice"]
PROXIES = ["balance", "haproxy", "haproxy-splice"]
TESTS = [("bulk", 1), ("bulk", 8), ("cps", 1), ("cps", 64), ("ka", 1), ("ka", 64)]
BODY = "hello, world\n"


class HarnessError(Exception):
    """The harness could not do its job (as opposed to a slow or failing peer)."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes, by pid


class Procs:
    """Processes this run started, stopped by pid."""

    def __init__(self):
        self.live = []

    def start(self, argv, cpu=None, errlog=None, **kw):
        if errlog is not None:
            kw["stderr"] = open(errlog, "ab")
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + argv
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        # taskset execs its command, so the pid is the pid of the program itself.
        p = subprocess.Popen(argv, **kw)
        p.errlog = errlog
        if errlog is not None:
            kw["stderr"].close()
        self.live.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, wait=10.0):
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ignored signal {sig}: SIGKILL")
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=wait)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"stopping pid {p.pid}: {e}")


PROCS = Procs()


def run_tool(argv, cpu, timeout):
    """Run a load generator to completion (killed by pid on timeout); returns stdout."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{argv[0]} did not finish in {timeout}s")
    return r.returncode, r.stdout, r.stderr


# ---------------------------------------------------------------- /proc readers


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2 :].split()  # rest[i] is field i+3 of proc(5)


def descendants(roots):
    """The root pids and all their live descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(_stat_fields(d)[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(roots):
    total = 0
    for pid in descendants(roots):
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def memory_kib(roots):
    """(PSS, RSS) in KiB, summed over the processes."""
    pss = rss = 0
    pids = descendants(roots)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss, len(pids)


def open_fds(roots):
    """Open descriptors of each process, largest first (shows how connections spread)."""
    counts = []
    for pid in descendants(roots):
        try:
            counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            continue
    return sorted(counts, reverse=True)


def tcp_sockets(port, state):
    """Number of IPv4/IPv6 TCP sockets whose local port is `port`, in `state` (hex)."""
    n = 0
    hexport = f"{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split(None, 4)
                    if parts[1].endswith(":" + hexport) and parts[3] == state:
                        n += 1
        except OSError:
            continue
    return n


def wait_listening(port, proc, what, timeout=15.0):
    """Waits (bounded) for a LISTEN socket on port, without connecting to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tcp_sockets(port, "0A"):
            return
        if proc is not None and proc.poll() is not None:
            err = tail(getattr(proc, "errlog", None))
            raise HarnessError(f"{what} exited with status {proc.returncode} before listening"
                               f"{': ' + err.strip() if err else ''}")
        time.sleep(0.05)
    raise HarnessError(f"{what} not listening on 127.0.0.1:{port} after {timeout}s")


def wait_for(check, timeout, what):
    """Waits (bounded) until check() is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise HarnessError(f"no {what} after {timeout}s")


def tail(path, n=1000):
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return ""


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def http_get(port, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


# ---------------------------------------------------------------- servers


class Nginx:
    def __init__(self, workdir, port, workers, cpu):
        self.dir = tempfile.mkdtemp(prefix="nginx-", dir=workdir)
        os.chmod(self.dir, 0o755)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                f"""user www-data;
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 12000; multi_accept on; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}
}}
"""
            )
        self.port = port
        self.proc = PROCS.start(
            ["nginx", "-p", self.dir, "-c", conf, "-e", f"{self.dir}/error.log"], cpu=cpu
        )
        wait_listening(port, self.proc, "nginx")

    def stop(self):
        PROCS.stop(self.proc, signal.SIGTERM)


class Iperf:
    def __init__(self, port, cpu):
        self.port, self.cpu = port, cpu
        self.start()

    def start(self):
        self.proc = PROCS.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.port)], cpu=self.cpu)
        wait_listening(self.port, self.proc, "iperf3 -s")

    def restart(self):
        self.stop()
        self.start()

    def stop(self):
        PROCS.stop(self.proc)


# ---------------------------------------------------------------- proxies


class SyslogSink:
    """A datagram socket standing in for /dev/log, so that balance runs as shipped: with its
    syslog connection up (this machine has no syslog daemon). Counts what arrives."""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, "syslog.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)  # the supervisor reconnects as user balance
        self.sock.settimeout(0.5)
        self.messages = 0
        self.last = b""
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages += 1
                self.last = data

    def count(self):
        with self.lock:
            return self.messages

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


SYSLOG = None


class Balance:
    """One balance instance per backend (it relays a port to one channel group)."""

    def __init__(self, binary, workdir, routes, workers, cpu):
        self.run_dir = tempfile.mkdtemp(prefix="balance-run-", dir=workdir)
        os.chmod(self.run_dir, 0o755)
        self.procs = []
        for listen, backend in routes:
            argv = [binary, "-f", "-b", "127.0.0.1", "--run-dir", self.run_dir,
                    "--syslog-socket", SYSLOG.path,
                    "--workers", str(workers), str(listen), f"127.0.0.1:{backend}"]
            before = SYSLOG.count()
            # The run directory is balance's alone (it refuses one holding others' files).
            errlog = os.path.join(workdir, f"balance-stderr.{listen}")
            p = PROCS.start(argv, cpu=cpu, errlog=errlog)
            self.procs.append(p)
            wait_listening(listen, p, "balance")
            wait_for(lambda: SYSLOG.count() > before, 10, "balance's start message on syslog")
        self.wait_workers(workers)

    def wait_workers(self, workers, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(descendants([p.pid])) >= workers + 1 for p in self.procs):
                return
            time.sleep(0.05)
        raise HarnessError("balance workers did not start")

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            PROCS.stop(p)
            if p.returncode not in (0, -signal.SIGTERM):
                err = tail(p.errlog)
                log(f"balance pid {p.pid} exited with {p.returncode}: {err}")
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Haproxy:
    def __init__(self, workdir, routes, threads, cpu, splice, maxconn=7000, instances=1):
        self.dir = tempfile.mkdtemp(prefix="haproxy-", dir=workdir)
        conf = os.path.join(self.dir, "haproxy.cfg")
        splice_opts = "    option splice-request\n    option splice-response\n" if splice else ""
        sections = "".join(
            f"listen p{listen}\n    bind 127.0.0.1:{listen}\n    server s1 127.0.0.1:{backend}\n"
            for listen, backend in routes
        )
        with open(conf, "w") as f:
            f.write(
                f"""global
    nbthread {threads}
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
{splice_opts}{sections}"""
            )
        # Several instances bind the same port (HAProxy sets SO_REUSEPORT): the kernel spreads
        # connections over them, which keeps each under the 20,000-descriptor hard limit.
        self.procs = []
        for _ in range(instances):
            p = PROCS.start(["haproxy", "-db", "-f", conf], cpu=cpu,
                            errlog=os.path.join(self.dir, f"stderr.{len(self.procs)}"))
            self.procs.append(p)
        for listen, _ in routes:
            wait_listening(listen, self.procs[0], "haproxy")
        time.sleep(0.2)
        for p in self.procs:
            if p.poll() is not None:
                raise HarnessError(f"haproxy exited: {tail(p.errlog)}")

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            PROCS.stop(p, signal.SIGUSR1)  # soft stop; SIGKILL after the bounded wait
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- measurements


def parse_duration_us(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]


def run_wrk(port, conns, duration, close, cpu):
    threads = 1 if (conns == 1 or cpu is not None) else 2
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--latency",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    rc, out, err = run_tool(argv, cpu, duration + 30)
    if rc != 0:
        raise HarnessError(f"wrk failed ({rc}): {err.strip()[:300]}")
    res = {"requests": 0, "rate": 0.0, "p50_us": None, "p99_us": None, "errors": 0}
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rate"] = float(m.group(1))
    for pct, key in (("50", "p50_us"), ("99", "p99_us")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[key] = parse_duration_us(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    return res


def run_iperf(port, streams, duration, cpu, server):
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams),
            "-J", "--connect-timeout", "5000"]
    for attempt in range(2):
        rc, out, err = run_tool(argv, cpu, duration + 30)
        try:
            j = json.loads(out)
        except ValueError:
            j = {"error": (out + err).strip()[:300]}
        if rc == 0 and "error" not in j:
            s = j["end"]["sum_received"]
            return {"bytes": int(s["bytes"]), "gbps": s["bits_per_second"] / 1e9}
        log(f"iperf3 attempt {attempt + 1} failed: {j.get('error')}; restarting the iperf3 server")
        server.restart()
    raise HarnessError(f"iperf3 through port {port} failed twice")


def measure(test, arg, port, pids, duration, gen_cpu, iperf_server):
    before = cpu_seconds(pids) if pids else None
    if test == "bulk":
        res = run_iperf(port, arg, duration, gen_cpu, iperf_server)
        work = res["bytes"] / 1e9
    else:
        res = run_wrk(port, arg, duration, test == "cps", gen_cpu)
        work = res["requests"]
    if pids:
        cpu = cpu_seconds(pids) - before
        res["proxy_cpu_s"] = cpu
        if test == "bulk":
            res["cpu_s_per_gb"] = cpu / work if work else None
        else:
            res["cpu_us_per_op"] = cpu * 1e6 / work if work else None
    return res


def start_peers(binary, workdir, mode, http_port, bulk_port, cpus):
    pinned = mode == "pinned"
    proxy_cpu = cpus[0] if pinned else None
    workers = 1 if pinned else len(cpus)
    ports = dict(zip(PROXIES, [free_ports(2) for _ in PROXIES]))
    peers = {"direct": {"http": http_port, "bulk": bulk_port, "obj": None}}
    routes = lambda p: [(ports[p][0], http_port), (ports[p][1], bulk_port)]  # noqa: E731
    peers["balance"] = {"obj": Balance(binary, workdir, routes("balance"), workers, proxy_cpu)}
    peers["haproxy"] = {"obj": Haproxy(workdir, routes("haproxy"), workers, proxy_cpu, False)}
    peers["haproxy-splice"] = {
        "obj": Haproxy(workdir, routes("haproxy-splice"), workers, proxy_cpu, True)}
    for p in PROXIES:
        peers[p]["http"], peers[p]["bulk"] = ports[p]
    return peers


def check_relay(peers):
    for name, peer in peers.items():
        data = b""
        for _ in range(20):
            try:
                data = http_get(peer["http"])
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 200") and data.endswith(BODY.encode()):
                break
            time.sleep(0.25)
        else:
            raise HarnessError(f"{name} did not relay an HTTP request: {data[:200]!r}")


def run_mode(args, mode, cpus, results):
    pinned = mode == "pinned"
    gen_cpu = cpus[1] if pinned else None
    http_port, bulk_port = free_ports(2)
    nginx = Nginx(args.workdir, http_port, 1 if pinned else len(cpus), gen_cpu)
    iperf = Iperf(bulk_port, gen_cpu)
    peers = start_peers(args.balance, args.workdir, mode, http_port, bulk_port, cpus)
    try:
        check_relay(peers)
        out = results.setdefault(mode, {})
        for rnd in range(args.rounds):
            order = PEERS[rnd % len(PEERS):] + PEERS[: rnd % len(PEERS)]
            for test, arg in TESTS:
                key = f"{test}{arg}"
                for name in order:
                    peer = peers[name]
                    pids = peer["obj"].pids() if peer["obj"] else None
                    port = peer["bulk"] if test == "bulk" else peer["http"]
                    res = measure(test, arg, port, pids, args.duration, gen_cpu, iperf)
                    out.setdefault(key, {}).setdefault(name, []).append(res)
                    log(f"{mode} round {rnd + 1}/{args.rounds} {key:6} {name:15} {brief(test, res)}")
                    if name == "balance" and not (res.get("bytes") or res.get("requests")):
                        raise HarnessError(f"balance relayed nothing in {mode} {key}")
                    time.sleep(args.pause)
    finally:
        for name in PROXIES:
            peers[name]["obj"].stop()
        iperf.stop()
        nginx.stop()


def brief(test, r):
    if test == "bulk":
        cpu = r.get("cpu_s_per_gb")
        return f"{r['gbps']:.2f} Gbit/s" + (f", {cpu:.3f} CPU-s/GB" if cpu is not None else "")
    cpu = r.get("cpu_us_per_op")
    s = f"{r['rate']:.0f}/s p50 {fmt(r['p50_us'], '.0f')} us p99 {fmt(r['p99_us'], '.0f')} us"
    if r["errors"]:
        s += f" errors {r['errors']}"
    return s + (f", {cpu:.1f} CPU-us/op" if cpu is not None else "")


def hold_idle(port, count, backend_port):
    """Opens `count` idle connections through `port` from several client processes; returns
    (clients, backend connections seen established)."""
    per_proc = 2500
    nproc = max(2, -(-count // per_proc))
    share = [count // nproc + (1 if i < count % nproc else 0) for i in range(nproc)]
    clients = [PROCS.start([sys.executable, os.path.join(HERE, "idle_clients.py"), "127.0.0.1",
                            str(port), str(n), "900"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE) for n in share]
    ok = failed = 0
    for c in clients:
        line = c.stdout.readline().decode().split()  # idle_clients bounds its own connects
        if len(line) == 3:
            ok += int(line[1])
            failed += int(line[2])
    if failed:
        log(f"{failed} idle connects failed")
    deadline = time.monotonic() + 30
    seen = 0
    while time.monotonic() < deadline:
        seen = tcp_sockets(backend_port, "01")
        if seen >= ok:
            break
        time.sleep(0.2)
    return clients, ok, seen


def release_idle(clients):
    for c in clients:
        try:
            c.stdin.close()
        except OSError:
            pass
    for c in clients:
        try:
            c.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        PROCS.stop(c)


def run_memory(args, cpus, results):
    backend = free_ports(1)[0]
    nginx = Nginx(args.workdir, backend, 2, None)
    out = results.setdefault("memory", {})
    try:
        for rnd in range(args.rounds):
            order = ["balance", "haproxy"] if rnd % 2 == 0 else ["haproxy", "balance"]
            for name in order:
                port = free_ports(1)[0]
                if name == "balance":
                    obj = Balance(args.balance, args.workdir, [(port, backend)], 2, None)
                else:
                    obj = Haproxy(args.workdir, [(port, backend)], 1, None, False, 9000, 2)
                clients = []
                try:
                    check_relay({name: {"http": port}})
                    time.sleep(0.5)
                    pss0, rss0, nprocs = memory_kib(obj.pids())
                    clients, ok, seen = hold_idle(port, args.idle, backend)
                    time.sleep(1.0)
                    pss1, rss1, _ = memory_kib(obj.pids())
                    fds = open_fds(obj.pids())
                    alive = all(p.poll() is None for p in obj.procs)
                finally:
                    release_idle(clients)
                    obj.stop()
                res = {"processes": nprocs, "pss_idle_kib": pss0, "rss_idle_kib": rss0,
                       "pss_held_kib": pss1, "rss_held_kib": rss1, "connections": ok,
                       "backend_established": seen, "alive": alive, "fds_per_process": fds,
                       "kib_per_conn": (pss1 - pss0) / ok if ok else None}
                out.setdefault(name, []).append(res)
                log(f"memory round {rnd + 1}/{args.rounds} {name:8} idle PSS {pss0} KiB, "
                    f"{ok} held ({seen} at backend): PSS {pss1} KiB RSS {rss1} KiB, fds {fds}")
                if name == "balance" and (seen < ok or ok < args.idle or not alive):
                    raise HarnessError(f"balance held {ok}/{args.idle} client connections, "
                                       f"{seen} at the backend, processes alive: {alive}")
                time.sleep(args.pause)
    finally:
        nginx.stop()


# ---------------------------------------------------------------- report


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(results):
    summary = {}
    for mode, tests in results.items():
        summary[mode] = {}
        if mode == "memory":
            summary[mode] = {name: {k: med(runs, k) for k in runs[0]
                                    if isinstance(runs[0][k], (int, float))}
                             for name, runs in tests.items()}
            continue
        for key, peers in tests.items():
            summary[mode][key] = {
                name: {k: med(runs, k) for k in runs[0] if isinstance(runs[0][k], (int, float))}
                for name, runs in peers.items()
            }
    return summary


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return a / b if (a is not None and b) else None


ROWS = [
    ("bulk1", "gbps", "bulk 1 stream, Gbit/s", ".2f"),
    ("bulk1", "cpu_s_per_gb", "bulk 1 stream, CPU-s/GB", ".3f"),
    ("bulk8", "gbps", "bulk 8 streams, Gbit/s", ".2f"),
    ("bulk8", "cpu_s_per_gb", "bulk 8 streams, CPU-s/GB", ".3f"),
    ("cps1", "rate", "new conn c1, conn/s", ".0f"),
    ("cps1", "cpu_us_per_op", "new conn c1, CPU-us/conn", ".1f"),
    ("cps64", "rate", "new conn c64, conn/s", ".0f"),
    ("cps64", "cpu_us_per_op", "new conn c64, CPU-us/conn", ".1f"),
    ("ka1", "rate", "keep-alive c1, req/s", ".0f"),
    ("ka1", "p50_us", "keep-alive c1, p50 us", ".0f"),
    ("ka1", "p99_us", "keep-alive c1, p99 us", ".0f"),
    ("ka1", "cpu_us_per_op", "keep-alive c1, CPU-us/req", ".1f"),
    ("ka64", "rate", "keep-alive c64, req/s", ".0f"),
    ("ka64", "p50_us", "keep-alive c64, p50 us", ".0f"),
    ("ka64", "p99_us", "keep-alive c64, p99 us", ".0f"),
    ("ka64", "cpu_us_per_op", "keep-alive c64, CPU-us/req", ".1f"),
]


def table(summary, rounds):
    lines = []
    head = f"{'':30}" + "".join(f"{p:>15}" for p in PEERS) + f"{'bal/hap':>9}{'bal/hap-spl':>12}"
    for mode in ("unpinned", "pinned"):
        if mode not in summary:
            continue
        lines.append(f"\n== {mode} (median of {rounds} round(s)) ==")
        lines.append(head)
        for key, metric, label, spec in ROWS:
            vals = {p: summary[mode].get(key, {}).get(p, {}).get(metric) for p in PEERS}
            lines.append(
                f"{label:30}" + "".join(f"{fmt(vals[p], spec):>15}" for p in PEERS)
                + f"{fmt(ratio(vals['balance'], vals['haproxy']), '.2f'):>9}"
                + f"{fmt(ratio(vals['balance'], vals['haproxy-splice']), '.2f'):>12}"
            )
    mem = summary.get("memory", {})
    if mem:
        lines.append(f"\n== memory, all proxy processes (median of {rounds} round(s)) ==")
        lines.append(f"{'':30}{'balance':>15}{'haproxy':>15}{'bal/hap':>9}")
        for metric, label, spec in (
            ("processes", "processes", ".0f"),
            ("pss_idle_kib", "idle PSS, KiB", ".0f"),
            ("rss_idle_kib", "idle RSS, KiB", ".0f"),
            ("connections", "idle client connections held", ".0f"),
            ("pss_held_kib", "holding them: PSS, KiB", ".0f"),
            ("rss_held_kib", "holding them: RSS, KiB", ".0f"),
            ("kib_per_conn", "PSS KiB per extra connection", ".2f"),
        ):
            b = mem.get("balance", {}).get(metric)
            h = mem.get("haproxy", {}).get(metric)
            lines.append(f"{label:30}{fmt(b, spec):>15}{fmt(h, spec):>15}"
                         f"{fmt(ratio(b, h), '.2f'):>9}")
        lines.append("(direct: no proxy process, 0 by definition; HAProxy runs as two "
                     "SO_REUSEPORT instances, balance with --workers 2)")
    return "\n".join(lines)


def round_ratios(raw, key, metric, ref_peer):
    """balance / ref_peer for each round of a pinned test: the two were measured within
    seconds of each other, so the spread of these ratios shows how far the machine's noise
    moves a verdict that is made on the medians."""
    runs = raw.get("pinned", {}).get(key, {})
    pairs = zip(runs.get("balance", []), runs.get(ref_peer, []))
    return [b[metric] / r[metric] for b, r in pairs
            if b.get(metric) is not None and r.get(metric)]


def targets(summary, idle, raw):
    p = summary.get("pinned", {})
    mem = summary.get("memory", {})

    def get(key, peer, metric):
        return p.get(key, {}).get(peer, {}).get(metric)

    def pinned(label, key, metric, op, factor, ref_peer):
        return (label, get(key, "balance", metric), op, factor, get(key, ref_peer, metric),
                round_ratios(raw, key, metric, ref_peer))

    checks = [
        pinned("CPU per new connection (pinned, c64) <= 0.8 x HAProxy",
               "cps64", "cpu_us_per_op", "<=", 0.8, "haproxy"),
        pinned("CPU per keep-alive request (pinned, c64) <= 0.9 x HAProxy",
               "ka64", "cpu_us_per_op", "<=", 0.9, "haproxy"),
        pinned("CPU-s per GB (pinned, 8 streams) <= 0.8 x HAProxy-splice",
               "bulk8", "cpu_s_per_gb", "<=", 0.8, "haproxy-splice"),
        pinned("bulk 1 stream (pinned) >= 1.2 x HAProxy-splice",
               "bulk1", "gbps", ">=", 1.2, "haproxy-splice"),
        pinned("p99 latency keep-alive c64 (pinned) <= HAProxy",
               "ka64", "p99_us", "<=", 1.0, "haproxy"),
        (f"PSS holding {idle} idle connections <= 0.5 x HAProxy",
         mem.get("balance", {}).get("pss_held_kib"), "<=", 0.5,
         mem.get("haproxy", {}).get("pss_held_kib"), []),
        ("PSS per extra idle connection <= 1.5 KiB",
         mem.get("balance", {}).get("kib_per_conn"), "<=", 1.0, 1.5, []),
    ]
    out = []
    for label, b, op, factor, ref, per_round in checks:
        if b is None or ref is None:
            verdict, detail = "N/A ", "not measured"
        else:
            limit = factor * ref
            ok = b <= limit if op == "<=" else b >= limit
            verdict = "PASS" if ok else "FAIL"
            detail = f"balance {b:.3g} vs limit {limit:.3g} (ratio {b / ref:.2f})"
        out.append({"target": label, "verdict": verdict.strip(), "balance": b, "reference": ref,
                    "factor": factor, "op": op, "ratio_per_round": per_round})
        print(f"  {verdict} {label}: {detail}")
        if len(per_round) > 1:
            met = sum(1 for r in per_round if (r <= factor if op == "<=" else r >= factor))
            print(f"       ratio per round: {' '.join(f'{r:.2f}' for r in sorted(per_round))}"
                  f" (met in {met} of {len(per_round)})")
    # Pinned, one stream is limited by the generator's CPU (both iperf3 ends): the direct
    # connection on that CPU is what a proxy costing it nothing would reach.
    direct, spliced = get("bulk1", "direct", "gbps"), get("bulk1", "haproxy-splice", "gbps")
    if direct and spliced:
        out.append({"target": "bulk 1 stream (pinned): direct connection, for scale",
                    "verdict": "INFO", "balance": None, "reference": spliced,
                    "direct": direct, "ratio_direct": direct / spliced})
        print(f"  INFO bulk 1 stream (pinned): a direct connection moved {direct:.2f} Gbit/s, "
              f"{direct / spliced:.2f} x HAProxy-splice: no proxy gets past that here")
    return out


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--balance", required=True, help="path to the balance binary")
    ap.add_argument("--smoke", action="store_true",
                    help="quick check of the harness: 1 round of 1 s, pinned only, 1,000 idle")
    ap.add_argument("--rounds", type=int, help="rounds per measurement [3]")
    ap.add_argument("--duration", type=int, help="seconds per measurement [5]")
    ap.add_argument("--idle", type=int, help="idle connections for the memory test [10000]")
    ap.add_argument("--modes", help="comma-separated: unpinned,pinned [both]; empty: none")
    ap.add_argument("--no-memory", action="store_true", help="skip the idle-connection test")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between measurements")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"), help="JSON output path")
    args = ap.parse_args()
    smoke = args.smoke
    args.rounds = args.rounds or (1 if smoke else 3)
    args.duration = args.duration or (1 if smoke else 5)
    args.idle = args.idle or (1000 if smoke else 10000)
    modes = [m for m in (args.modes if args.modes is not None else
                         ("pinned" if smoke else "unpinned,pinned")).split(",") if m]
    if not (1 <= args.rounds <= 50 and 1 <= args.duration <= 300 and 1 <= args.idle <= 19000):
        ap.error("rounds 1..50, duration 1..300, idle 1..19000")
    if any(m not in ("unpinned", "pinned") for m in modes):
        ap.error("--modes takes unpinned and/or pinned")

    if os.geteuid() != 0:
        log("must run as root (balance binds, then drops to user balance)")
        return 1
    for tool in ("nginx", "haproxy", "wrk", "iperf3", "taskset"):
        if not shutil.which(tool):
            log(f"{tool} not found (bench/run installs it)")
            return 1
    cpus = sorted(os.sched_getaffinity(0))
    if "pinned" in modes and len(cpus) < 2:
        log("pinned mode needs two CPUs")
        return 1

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    args.workdir = tempfile.mkdtemp(prefix="balance-bench-")
    os.chmod(args.workdir, 0o755)
    global SYSLOG
    SYSLOG = SyslogSink(args.workdir)
    results = {}
    started = time.time()
    status = 0
    try:
        for mode in modes:
            run_mode(args, mode, cpus[:2], results)
        if not args.no_memory:
            run_memory(args, cpus, results)
    except HarnessError as e:
        log(f"harness error: {e}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 1
    finally:
        PROCS.stop_all()
        SYSLOG.stop()
        shutil.rmtree(args.workdir, ignore_errors=True)

    summary = summarize(results)
    loadavg = open("/proc/loadavg").read().split()[:3]
    print(f"\nbalance benchmark ({'smoke' if smoke else 'full'} run): {len(cpus)} CPUs, "
          f"loadavg at end {' '.join(loadavg)}, {time.time() - started:.0f} s; proxy CPU from "
          "/proc/<pid>/stat of all proxy processes; pinned = proxy on CPU "
          f"{cpus[0]}, generators and backends on CPU {cpus[1] if len(cpus) > 1 else '-'}")
    print(table(summary, args.rounds))
    print(f"\nbalance ran as shipped (sandboxed workers, shared table, syslog): "
          f"{SYSLOG.messages} syslog messages received")
    print("\ntargets (ratios from this run):")
    verdicts = targets(summary, args.idle, results)
    report = {
        "smoke": smoke, "rounds": args.rounds, "duration_s": args.duration, "idle": args.idle,
        "cpus": cpus, "loadavg_end": loadavg, "harness_status": status,
        "syslog_messages": SYSLOG.messages,
        "balance": args.balance, "raw": results, "median": summary, "targets": verdicts,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nJSON: {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
