#!/bin/bash
# Peak RSS and delivered/s of the agent under two senders flat out, as root after
# `cargo xtask build`:
#   xtask/scripts/flat-out-rss.sh [SIZE] [ATTEMPTS] [EXTRA_TOML] [BIN_DIR]
# One agent at its defaults (eBPF on; EXTRA_TOML is appended to its config, e.g.
# $'[limits]\nmemory_budget_mb = 4') to apm-listener on /dev/shm; two `apm-test-sender
# --nonblocking --comm php-fpm` send ATTEMPTS profiles of SIZE bytes each, dropping on EAGAIN
# as PHP does. Prints VmHWM/VmRSS 3 s after the senders end, the senders' counts, and the
# profiles the listener stored per second of sending. SMAPS=1 adds /proc/PID/smaps grouped by
# mapping; HEAPTRACK="heaptrack -o FILE" runs the agent under heaptrack (slower; for where the
# heap peak is: `heaptrack_print -f FILE.zst --print-flamegraph F --flamegraph-cost-type peak`).
set -u
SIZE=${1:-16384}; N=${2:-1500000}; EXTRA=${3:-}
HERE=$(cd "$(dirname "$0")" && pwd); BIN=${4:-$(cd "$HERE/../.." && pwd)/target/release}
. "$HERE/pair.sh"
start_pair "$BIN" "$EXTRA"
sleep 4
T0=$(date +%s.%N); SP=""
for s in 1 2; do
  $BIN/apm-test-sender --socket $SOCK --count $N --prefix s$s --size $SIZE --nonblocking --comm php-fpm > $D/s$s.json & SP="$SP $!"
done
wait $SP; T1=$(date +%s.%N); sleep 3
echo "size $SIZE: $(grep -E 'VmHWM|VmRSS' /proc/$AP/status | tr -s ' \t\n' ' ')"
[ -n "${SMAPS:-}" ] && python3 $HERE/smaps_groups.py $AP
echo "senders: $(cat $D/s1.json) $(cat $D/s2.json)"
ST=$(wc -l < $STORED)
echo "listener stored $ST in $(echo "$T1-$T0" | bc) s of sending: $(echo "$ST/($T1-$T0)" | bc)/s"
stop_pair
