#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root: privilege dropping, sandboxing and file
# permissions are tested for real). Installs what the tests need on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: run as root (the tests drop privileges and change file owners)" >&2
    exit 1
fi

# Tools the tests call: setpriv (util-linux) runs clients as other users, ss and ip netns
# (iproute2), adduser creates the service user exactly as the package will.
missing=()
command -v setpriv >/dev/null || missing+=(util-linux)
command -v adduser >/dev/null || missing+=(adduser)
command -v ss >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
getent passwd balance >/dev/null ||
    adduser --system --group --no-create-home --home /nonexistent balance
getent passwd nobody >/dev/null || { echo "tests/run.sh: user nobody missing" >&2; exit 1; }

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
# The real workers under the real seccomp policy in an optimised build too: std and tokio
# make different system calls in debug and release.
cargo test --release --test sandbox --test select --test relay --test supervisor
bash fuzz/run.sh
# A short benchmark against HAProxy: checks that the harness works, not the targets.
BALANCE=target/release/balance bash bench/run --smoke
# Syslog end to end, with Debian's rsyslog started by hand.
bash tests/rsyslog-e2e.sh
bash packaging/ci-check.sh
