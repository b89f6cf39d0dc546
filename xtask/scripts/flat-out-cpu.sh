#!/bin/bash
# Where the two cores go when two senders run flat out, as root after `cargo xtask build`:
#   xtask/scripts/flat-out-cpu.sh [SIZE] [ATTEMPTS] [BIN_DIR]
# The set-up of flat-out-rss.sh (the agent at its defaults, eBPF on, to apm-listener writing to
# /dev/shm; two `apm-test-sender --nonblocking --comm php-fpm`). Prints the CPU seconds each
# process used per second of sending (utime + stime of all its threads, /proc/PID/stat), the
# agent's per profile stored, and the profiles stored per second. PERF=1 also samples the whole
# machine with `perf record -a` over the sending and prints the listener's top symbols and the
# agent's samples by what it does (receive syscall, compression, validation). SYSCALLS=1
# counts the agent's epoll_wait and recvmmsg calls per profile (`perf stat`, 3 s of sending).
# SCHED=1 prints, for each of the agent's threads, the seconds per second of sending it ran and
# waited runnable for a core (/proc/PID/task/TID/schedstat), and its voluntary switches.
# PAIR_SINK=count: apm-bench-sink instead of apm-listener (as in the compare bench's agent rows);
# PAIR_EBPF=off: the agent without its eBPF monitor; PAIR_COMPRESSION=none: batches uncompressed;
# PAIR_EXTRA: TOML appended to the agent's config (e.g. $'[batch]\nmax_bytes = 1048576').
set -u
SIZE=${1:-16384}; N=${2:-4000000}
HERE=$(cd "$(dirname "$0")" && pwd); BIN=${3:-$(cd "$HERE/../.." && pwd)/target/release}
. "$HERE/pair.sh"
TCK=$(getconf CLK_TCK)
# 0 for a process that has already exited (a sender done before the sample).
cpu() { awk -v t=$TCK '{ sub(/.*\) /, ""); split($0, f, " "); printf "%.3f", (f[12] + f[13]) / t }' /proc/$1/stat 2>/dev/null || echo 0; }
# Per thread of the agent: tid, comm, ns run, ns waiting runnable, voluntary switches.
sched() { for t in /proc/$AP/task/*; do
  echo "${t##*/} $(tr ' ' _ < $t/comm) $(cut -d' ' -f1,2 $t/schedstat) $(awk '/^voluntary_ctxt/ { print $2 }' $t/status)"
done 2>/dev/null | sort; }
start_pair "$BIN" "${PAIR_EXTRA:-}"
sleep 4
[ -n "${PERF:-}" ] && { perf record -a -g -o $D/perf.data 2>/dev/null & PP=$!; sleep 1; }
A0=$(cpu $AP); L0=$(cpu $LP); S0=$(stored); sched > $D/sched0
T0=$(date +%s.%N); SP=""
for s in 1 2; do
  $BIN/apm-test-sender --socket $SOCK --count $N --prefix s$s --size $SIZE --nonblocking --comm php-fpm > $D/s$s.json & SP="$SP $!"
done
sleep 1; SC0=0; for p in $SP; do SC0=$(echo "$SC0 + $(cpu $p)" | bc); done
if [ -n "${SYSCALLS:-}" ]; then
  N0=$(stored)
  perf stat -x, -e syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvmmsg -p $AP -o $D/stat.txt -- sleep 3
  N1=$(stored); sleep 1
  awk -F, -v n=$((N1 - N0)) '/sys_enter/ { sub("syscalls:sys_enter_", "", $3); printf "agent %s calls per profile: %.4f\n", $3, $1 / n }' $D/stat.txt
else
  sleep 4
fi
SC1=0; GONE=; for p in $SP; do [ -e /proc/$p/stat ] || GONE=1; SC1=$(echo "$SC1 + $(cpu $p)" | bc); done
wait $SP; T1=$(date +%s.%N)
A1=$(cpu $AP); L1=$(cpu $LP); sched > $D/sched1; sleep 3; S1=$(stored)
[ -n "${PERF:-}" ] && { kill -INT $PP; wait $PP 2>/dev/null; }
SECS=$(echo "$T1 - $T0" | bc)
STORED_N=$((S1 - S0))
echo "size $SIZE: $STORED_N stored in $SECS s of sending: $(echo "$STORED_N / $SECS" | bc)/s"
echo "CPU s per s of sending: agent $(echo "scale=3; ($A1 - $A0) / $SECS" | bc)," \
  "listener $(echo "scale=3; ($L1 - $L0) / $SECS" | bc)," \
  "senders $([ -n "$GONE" ] && echo "n/a (one finished before the sample)" || echo "$(echo "scale=3; ($SC1 - $SC0) / 4" | bc) (over 4 s of their run)")"
echo "agent CPU per profile stored: $(echo "scale=2; ($A1 - $A0) * 1000000 / $STORED_N" | bc) µs"
if [ -n "${SCHED:-}" ]; then
  join $D/sched0 $D/sched1 | awk -v s=$SECS '{ printf "agent thread %s (%s): ran %.3f s/s, waited for a core %.3f s/s, %d voluntary switches/s\n", $1, $2, ($7 - $3) / 1e9 / s, ($8 - $4) / 1e9 / s, ($9 - $5) / s }'
fi
if [ -n "${PERF:-}" ]; then
  echo "listener's top symbols (share of all samples on the machine):"
  perf report -i $D/perf.data --no-children --pid $LP --sort comm,sym --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -8
  # The agent's CPU by what it does (share of the agent's own samples, callees included).
  R="perf report -i $D/perf.data --pid $AP --percentage relative --sort sym --stdio -g none"
  $R --children 2>/dev/null > $D/agent-children.txt
  $R --no-children 2>/dev/null > $D/agent-self.txt
  share() { awk -v p="$2" '$0 ~ p { sub("%", "", $1); s += $1 } END { printf "%.1f %%", s }' $1; }
  echo "agent's samples: the kernel's receive (recvmmsg and below) $(share $D/agent-children.txt ' __recvmmsg$')," \
    "zstd compression $(share $D/agent-children.txt 'ZSTD_compressStream$')," \
    "JSON and UTF-8 validation $(share $D/agent-self.txt 'serde_json|simdutf8')"
fi
stop_pair
