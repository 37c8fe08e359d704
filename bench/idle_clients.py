#!/usr/bin/env python3
"""Open COUNT idle TCP connections to HOST:PORT and hold them.

Prints "connected OK FAILED" on stdout once every connect has been tried, then holds the
connections until stdin reaches EOF (the harness closes it) or HOLD seconds pass, whichever
comes first. Nothing is ever sent. One process holds at most a few thousand sockets, so the
harness starts several to stay under the per-process descriptor limit.
"""

import select
import socket
import sys
import time


def main() -> int:
    if len(sys.argv) != 5:
        print("usage: idle_clients.py HOST PORT COUNT HOLD_SECONDS", file=sys.stderr)
        return 2
    host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held, failed = [], 0
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5.0)
        try:
            s.connect((host, port))
            held.append(s)
        except OSError:
            s.close()
            failed += 1
    print(f"connected {len(held)} {failed}", flush=True)
    deadline = time.monotonic() + hold
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([sys.stdin], [], [], min(left, 1.0))
        if ready and not sys.stdin.buffer.read1(4096):
            break
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
