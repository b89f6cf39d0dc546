#!/bin/bash
# Where the agent's RSS goes (docs/agent.md, "Where the memory goes"), as root after
# `cargo xtask build`: xtask/scripts/agent-memory.sh on|off [trim]. One agent (eBPF on or off) to
# apm-listener; /proc/PID/smaps grouped by mapping (smaps_groups.py) idle, sampled every 0.2 s
# during 1 KiB then 16 KiB flat out (2 x apm-test-sender --nonblocking, comm php-fpm), and after;
# the eBPF maps from /proc/PID/fdinfo. `trim`: idle only, then malloc_trim(0) through gdb.
set -u
EBPF=$1; HERE=$(cd "$(dirname "$0")" && pwd); WT=$(cd "$HERE/../.." && pwd); BIN=$WT/target/release; D=/tmp/apm-agent-memory/$EBPF
rm -rf $D /dev/shm/apm-agent-memory-$EBPF; mkdir -p $D/run /dev/shm/apm-agent-memory-$EBPF
$BIN/apm-listener --listen 127.0.0.1:0 --out /dev/shm/apm-agent-memory-$EBPF/p.jsonl > $D/listener.out 2>$D/listener.log &
LPID=$!
for i in $(seq 50); do grep -q "listening on" $D/listener.out && break; sleep 0.1; done
ADDR=$(grep -o "listening on [^ ]*" $D/listener.out | awk '{print $3}')
cat > $D/agent.toml <<T
[ingest]
socket = "$D/run/listener.sock"
stream_socket = "$D/run/listener-stream.sock"
[central]
endpoint = "http://$ADDR"
[spool]
dir = "$D/spool"
max_bytes = 268435456
[ebpf]
enabled = "$EBPF"
[control]
runtime_dir = "$D/run"
state_dir = "$D/state"
pid_file = "$D/run/agent.pid"
metrics_listen = "127.0.0.1:0"
T
$BIN/apm-agent --config $D/agent.toml run 2>$D/agent.log &
APID=$!
for i in $(seq 100); do [ -S $D/run/listener.sock ] && break; sleep 0.1; done
sleep 3
snap() { echo "== $1"; grep -E "VmRSS|VmHWM|RssAnon|RssFile" /proc/$APID/status; python3 $HERE/smaps_groups.py $APID; cat /proc/$APID/smaps_rollup | head -20; }
snap idle
echo "== bpf maps of the agent (grep map_ /proc/$APID/fdinfo/*)"
for f in /proc/$APID/fdinfo/*; do grep -q map_id $f && echo "$(grep -h -E 'map_type|map_id|max_entries|key_size|value_size|memlock' $f | tr -s '\t\n' '  ')"; done
grep -h memlock /proc/$APID/fdinfo/* | awk '{s+=$2} END {printf "total memlock %.2f MiB\n", s/1048576}'
if [ "${2:-}" = trim ]; then
  echo "== gdb -p $APID -batch -ex 'call (int) malloc_trim(0)'"
  gdb -p $APID -batch -ex 'call (int) malloc_trim(0)' 2>&1 | grep '^\$'
  snap idle-after-malloc_trim
  kill $APID; wait $APID; kill $LPID; wait $LPID; exit 0
fi
# Samples smaps every 0.2 s while the senders run and keeps the one with the highest Rss.
peak() { best=0; while kill -0 $1 2>/dev/null || kill -0 $2 2>/dev/null; do r=$(awk '/^Rss:/{print $2}' /proc/$APID/smaps_rollup); if [ "${r:-0}" -gt "$best" ]; then best=$r; python3 $HERE/smaps_groups.py $APID > $D/peak-$3.txt; fi; sleep 0.2; done; echo "== peak sample during $3 (Rss $best KiB)"; cat $D/peak-$3.txt; }
S=""; for p in a b; do $BIN/apm-test-sender --socket $D/run/listener.sock --count 3000000 --prefix a$p --size 1024 --nonblocking --comm php-fpm > $D/s1-$p.json & S="$S $!"; done
peak $S 1KiB
wait $S
sleep 2
snap after-1KiB
: > /dev/shm/apm-agent-memory-$EBPF/p.jsonl
S=""; for p in a b; do $BIN/apm-test-sender --socket $D/run/listener.sock --count 1500000 --prefix b$p --size 16384 --nonblocking --comm php-fpm > $D/s16-$p.json & S="$S $!"; done
peak $S 16KiB
wait $S
sleep 2
snap after-16KiB
cat $D/s1-*.json $D/s16-*.json
kill $APID; wait $APID; kill $LPID; wait $LPID
rm -rf /dev/shm/apm-agent-memory-$EBPF
