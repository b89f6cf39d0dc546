#!/bin/bash
# The agent's live heap across a listener outage, as root after `cargo xtask build` (needs
# heaptrack): xtask/scripts/outage-heap.sh [OUT]. The agent (eBPF off) runs under heaptrack while
# apm-test-sender sends 2000 profiles/s of 1 KiB, non-blocking: 40 s up, 40 s with the listener
# stopped (spooled), 80 s after it is back. Prints the agent's VmRSS at the end and the live heap
# (heaptrack's massif snapshots, `mem_heap_B`) every ~4 s: compare before the outage with after
# the replay. A live heap that comes back while RSS does not is memory the allocator keeps.
set -u
OUT=${1:-/tmp/apm-outage-heap}; HERE=$(cd "$(dirname "$0")" && pwd); B=$(cd "$HERE/../.." && pwd)/target/release
D=$(mktemp -d); mkdir -p $D/run; PORT=$((20000 + RANDOM % 20000))
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/outage-heap$$.jsonl > $D/l.out 2>$D/l.log & LP=$!
sleep 1
cat > $D/agent.toml <<T
[ingest]
socket = "$D/run/listener.sock"
stream_socket = "$D/run/listener-stream.sock"
[central]
endpoint = "http://127.0.0.1:$PORT"
[spool]
dir = "$D/spool"
max_bytes = 268435456
[ebpf]
enabled = "off"
[control]
runtime_dir = "$D/run"
state_dir = "$D/state"
pid_file = "$D/run/agent.pid"
metrics_listen = ""
T
rm -f $OUT.zst $OUT.massif
heaptrack -o $OUT $B/apm-agent --config $D/agent.toml run 2>$D/a.log >/dev/null &
sleep 3
$B/apm-test-sender --socket $D/run/listener.sock --count 400000 --rate 2000 --nonblocking --size 1024 --prefix o > $D/s.out & SP=$!
sleep 40; kill $LP; wait $LP 2>/dev/null; sleep 40
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/outage-heap$$.jsonl > $D/l2.out 2>$D/l2.log & LP=$!
sleep 80
AP=$(pgrep -f "apm-agent --config $D/agent.toml" | tail -1)
echo "agent VmRSS at the end: $(grep VmRSS /proc/$AP/status | awk '{print $2, $3}') (heaptrack's own memory included)"
kill $SP; sleep 1; kill $AP; sleep 3; kill $LP; wait 2>/dev/null; rm -rf $D /dev/shm/outage-heap$$.jsonl
heaptrack_print -f $OUT.zst --print-massif $OUT.massif >/dev/null 2>&1
echo "live heap (MiB; includes the receive slots' 16 MiB of address space), outage from ~43 s to ~83 s:"
awk -F= '/^time=/ {t=$2} /^mem_heap_B=/ {if (t >= next_t) {printf "%6.1f s %6.2f\n", t, $2/1048576; next_t = t + 4}}' $OUT.massif
