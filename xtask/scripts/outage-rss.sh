#!/bin/bash
# The agent's RSS before a listener outage and 120 s after the listener is back (docs/BENCHMARKS.md,
# "Soak"), as root after `cargo xtask build`: xtask/scripts/outage-rss.sh AGENT_BINARY TAG.
# apm-listener and apm-test-sender come from target/release; 2000 profiles/s of 1 KiB, non-blocking;
# 60 s up, 60 s with the listener stopped (spooled), 120 s after it is back (UP, DOWN and AFTER
# in the environment change them). PHASE_HOOK, when set, is run as `$PHASE_HOOK before|after PID`
# at the two samples (outage-arenas.sh uses it).
A=$1; TAG=$2; HERE=$(cd "$(dirname "$0")" && pwd); B=$(cd "$HERE/../.." && pwd)/target/release
D=$(mktemp -d); mkdir -p $D/run; PORT=$((20000 + RANDOM % 20000))
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/o-$TAG.jsonl > $D/l.out 2>$D/l.log & LP=$!
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
$A --config $D/agent.toml run 2>$D/a.log & AP=$!
sleep 2
$B/apm-test-sender --socket $D/run/listener.sock --count 480000 --rate 2000 --nonblocking --size 1024 --prefix o > $D/s.out &
SP=$!
sleep ${UP:-60}; r1=$(grep VmRSS /proc/$AP/status | awk '{print $2}'); ${PHASE_HOOK:+$PHASE_HOOK before $AP}
kill $LP; wait $LP 2>/dev/null; sleep ${DOWN:-60}
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/o-$TAG.jsonl > $D/l2.out 2>$D/l2.log & LP=$!
sleep ${AFTER:-120}; r2=$(grep VmRSS /proc/$AP/status | awk '{print $2}'); ${PHASE_HOOK:+$PHASE_HOOK after $AP}
echo "$TAG: rss before outage ${r1} kB, ${AFTER:-120} s after the listener's return ${r2} kB; $(grep -o '"delivered":[0-9]*\|"spooled_batches":[0-9]*' <($A --config $D/agent.toml status --json) | tr '\n' ' ')"
kill $SP $AP; wait $AP 2>/dev/null; kill $LP; rm -rf $D /dev/shm/o-$TAG.jsonl
