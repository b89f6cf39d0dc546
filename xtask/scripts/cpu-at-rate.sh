#!/bin/bash
# The agent's CPU per 100k profiles at a steady rate, as root after `cargo xtask build`:
#   xtask/scripts/cpu-at-rate.sh [RATE] [COUNT] [perf|strace] [BIN_DIR]
# One agent at its defaults (eBPF on) to apm-listener on /dev/shm; one paced non-blocking
# apm-test-sender (comm php-fpm) sends COUNT 1 KiB profiles at RATE per second; prints the agent's
# utime + stime over the send (from /proc/PID/stat) per 100k, what the sender saw (EAGAIN) and what
# the listener stored. `perf`: `perf record -g` of the agent for 10 s into $OUT/perf.data;
# `strace`: `strace -c -f` of the agent for 10 s into $OUT/strace-c.txt (OUT=/tmp/apm-cpu-at-rate).
# A whole-process figure on a shared machine: compare runs made one after the other.
set -u
RATE=${1:-5000}; N=${2:-100000}; TRACE=${3:-}
HERE=$(cd "$(dirname "$0")" && pwd); BIN=${4:-$(cd "$HERE/../.." && pwd)/target/release}
OUT=/tmp/apm-cpu-at-rate; mkdir -p $OUT
. "$HERE/pair.sh"
start_pair "$BIN"
sleep 4
cpu() { awk '{print $14+$15}' /proc/$AP/stat; }
c0=$(cpu)
$BIN/apm-test-sender --socket $SOCK --count $N --prefix c --size 1024 --nonblocking --comm php-fpm --rate $RATE > $D/s.json & S=$!
case "$TRACE" in
  perf) sleep 3; perf record -F 999 -g -p $AP -o $OUT/perf.data -- sleep 10 >/dev/null 2>&1 ;;
  strace) sleep 3; timeout 10 strace -c -f -p $AP -o $OUT/strace-c.txt ;;
esac
wait $S; sleep 1.5
c1=$(cpu)
TCK=$(getconf CLK_TCK)
echo "rate $RATE/s, $N profiles of 1 KiB: agent CPU $(echo "scale=2; ($c1-$c0)/$TCK" | bc) s = $(echo "scale=3; ($c1-$c0)/$TCK*100000/$N" | bc) s per 100k; sender $(cat $D/s.json); listener stored $(wc -l < $STORED)"
stop_pair
