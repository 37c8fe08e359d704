#!/usr/bin/env bash
# A short, bounded fuzzing campaign, as CI runs it: every target for FUZZ_SECONDS (default
# 20) from the seeds in fuzz/corpus/<target>/. Installs cargo-fuzz and the nightly
# toolchain (with rustup) when missing. Exits non-zero when a target crashes, after
# printing the input that crashed it (kept in fuzz/artifacts/<target>/); add that input to
# tests/hostile.rs.
#
# Environment: FUZZ_SECONDS per target; FUZZ_TARGETS to run only some; CARGO_TARGET_DIR
# for the build (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-"cli_args control_command ipc_message table_reader"}
target_dir=${CARGO_TARGET_DIR:-$PWD/fuzz/target}

if ! cargo +nightly --version >/dev/null 2>&1; then
    # A fresh machine: fetch it (cargo-fuzz needs nightly's sanitizer flags).
    if ! rustup toolchain install nightly --profile minimal; then
        echo "fuzz/run.sh: the nightly toolchain is missing and rustup could not install it" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

cargo +nightly fuzz build --target-dir "$target_dir"

# New inputs go to a scratch corpus, so the checked-in seeds stay as they are.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
touch "$scratch/started"
failed=()
for target in $targets; do
    max_len=4096
    [ "$target" = table_reader ] && max_len=16384
    mkdir -p "$scratch/$target" "fuzz/artifacts/$target"
    echo "== fuzzing $target for ${seconds}s"
    if ! cargo +nightly fuzz run --target-dir "$target_dir" "$target" \
        "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    for target in "${failed[@]}"; do
        find "fuzz/artifacts/$target" -type f -newer "$scratch/started" | while read -r artifact; do
            echo "== $target crashed on $artifact:"
            od -A d -t x1z -v "$artifact" | head -n 40
        done
    done
    echo "fuzz/run.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz/run.sh: no crashes in: $targets"
