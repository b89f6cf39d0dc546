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
D=$(mktemp -d /tmp/apm-rss.XXXX); mkdir -p $D/run /dev/shm/apm-rss$$
$BIN/apm-listener --listen 127.0.0.1:0 --out /dev/shm/apm-rss$$/p.jsonl > $D/l.out 2>$D/l.log & L=$!
for i in $(seq 50); do grep -q "listening on" $D/l.out && break; sleep 0.1; done
ADDR=$(grep -o "listening on [^ ]*" $D/l.out | awk '{print $3}')
cat > $D/agent.toml <<T
[ingest]
socket = "$D/run/l.sock"
stream_socket = "$D/run/ls.sock"
[central]
endpoint = "http://$ADDR"
[spool]
dir = "$D/spool"
max_bytes = 268435456
[ebpf]
enabled = "on"
[control]
runtime_dir = "$D/run"
state_dir = "$D/state"
pid_file = "$D/run/agent.pid"
metrics_listen = "127.0.0.1:0"
$EXTRA
T
${HEAPTRACK:-} $BIN/apm-agent --config $D/agent.toml run 2>$D/agent.log &
for i in $(seq 100); do [ -S $D/run/l.sock ] && break; sleep 0.1; done
sleep 4
AP=$(pgrep -f "$D/agent.toml" | tail -1)
T0=$(date +%s.%N); SP=""
for s in 1 2; do
  $BIN/apm-test-sender --socket $D/run/l.sock --count $N --prefix s$s --size $SIZE --nonblocking --comm php-fpm > $D/s$s.json & SP="$SP $!"
done
wait $SP; T1=$(date +%s.%N); sleep 3
echo "size $SIZE: $(grep -E 'VmHWM|VmRSS' /proc/$AP/status | tr -s ' \t\n' ' ')"
[ -n "${SMAPS:-}" ] && python3 $HERE/smaps_groups.py $AP
echo "senders: $(cat $D/s1.json) $(cat $D/s2.json)"
ST=$(wc -l < /dev/shm/apm-rss$$/p.jsonl)
echo "listener stored $ST in $(echo "$T1-$T0" | bc) s of sending: $(echo "$ST/($T1-$T0)" | bc)/s"
kill $AP; sleep 2; kill $L; wait 2>/dev/null
rm -rf $D /dev/shm/apm-rss$$
