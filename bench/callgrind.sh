#!/bin/sh
# Instruction profile of the serving side, per I/O, with callgrind.
#
# Runs `refblk bench` under valgrind --tool=callgrind --separate-threads=yes on a
# tmpfs image (no device noise: what is left is our code), once for the `file`
# path and once for the `refblk` path, collecting only while the workload runs
# (--toggle-collect on bench::workload::run). Per-thread outputs: the generator
# thread for `file`; for `refblk` the guest (main thread) and the backend queue
# thread `vbd7.51712q0` (the serving side). Instruction counts are user space
# only; system calls are not in them (count them with strace -c -f).
#
# usage: bench/callgrind.sh [profile] [runtime-seconds]   (after cargo build --release)
set -eu
profile=${1:-rnd4k_q32t1_read}
runtime=${2:-2}
bin=${REFBLK:-target/release/refblk}
out=${OUT:-bench/results/callgrind}
dir=$(mktemp -d /dev/shm/refblk-cg.XXXXXX)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$out"
for path in file refblk; do
    rm -f "$out/$profile.$path".*
    RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes \
        --toggle-collect='*bench*workload*run*' \
        --callgrind-out-file="$out/$profile.$path.cg.%p" \
        "$bin" bench --dir "$dir" --paths "$path" --profiles "$profile" \
        --runtime "$runtime" --reps 1 --size 64M --quiet \
        --json "$out/$profile.$path.json" > "$out/$profile.$path.md" 2> "$out/$profile.$path.log"
done
# Per thread: total instructions and the operations of the run.
for f in "$out/$profile".*.cg.*; do
    ops=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['io'][0]['samples'][0]['ops'])" \
        "$(echo "$f" | sed 's/\.cg\..*/.json/')")
    ir=$(grep -m1 '^summary:' "$f" | awk '{print $2}')
    thread=$(grep -m1 '^thread:' "$f" | awk '{print $2}')
    echo "$(basename "$f") thread $thread: $ir instructions, $ops ops, $((ir / (ops > 0 ? ops : 1))) per op"
done
