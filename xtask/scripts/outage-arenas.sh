#!/bin/bash
# Where the agent's RSS sits before and after a listener outage, per malloc arena (docs/BENCHMARKS.md,
# "Soak"), as root after `cargo xtask build`, with gdb installed:
#   xtask/scripts/outage-arenas.sh AGENT_BINARY TAG
# apm-listener and apm-test-sender come from target/release; 2000 profiles/s of 1 KiB, non-blocking;
# 40 s up, 40 s with the listener stopped (spooled), 80 s after it is back. At 38 s and at the end
# it writes to /tmp/apm-outage-arenas/TAG/: PHASE.rss (VmRSS before and after a malloc_trim(0)
# called through gdb), PHASE.maps (the [heap] and anonymous mappings of >= 64 KiB with their Rss,
# KiB, read after the trim) and PHASE.mi (glibc's malloc_info XML: per arena, "rest" is free
# bytes, the top chunk included, and "current" its size).
set -u
A=$1; TAG=$2; HERE=$(cd "$(dirname "$0")" && pwd); B=$(cd "$HERE/../.." && pwd)/target/release
O=/tmp/apm-outage-arenas/$TAG; mkdir -p $O
D=$(mktemp -d); mkdir -p $D/run; PORT=$((20000 + RANDOM % 20000))
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/oa-$TAG.jsonl > $D/l.out 2>$D/l.log & LP=$!
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
$B/apm-test-sender --socket $D/run/listener.sock --count 480000 --rate 2000 --nonblocking --size 1024 --prefix oa > $D/s.out &
SP=$!
dump() {
  grep VmRSS /proc/$AP/status > $O/$1.rss
  gdb -p $AP -batch -ex 'call (int)malloc_trim(0)' -ex "call (void*)fopen(\"$O/$1.mi\",\"w\")" \
    -ex 'call (int)malloc_info(0,$2)' -ex 'call (int)fclose($2)' > /dev/null 2>&1
  grep VmRSS /proc/$AP/status >> $O/$1.rss
  python3 - $AP > $O/$1.maps <<'P'
import sys, re
rows, cur = [], None
for line in open(f'/proc/{sys.argv[1]}/smaps'):
    m = re.match(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$', line)
    if m:
        cur = [m[1], (int(m[2], 16) - int(m[1], 16)) // 1024, m[4].strip() or 'anon', 0]
        rows.append(cur)
    elif line.startswith('Rss:'):
        cur[3] = int(line.split()[1])
print('start size_kib name rss_kib')
for r in rows:
    if r[3] >= 64 and r[2] in ('anon', '[heap]'):
        print(*r)
P
}
sleep 38; dump before
kill $LP; wait $LP 2>/dev/null; sleep 40
$B/apm-listener --listen 127.0.0.1:$PORT --out /dev/shm/oa-$TAG.jsonl > $D/l2.out 2>$D/l2.log & LP=$!
sleep 80; dump after
for p in before after; do
  echo "$TAG $p: $(tr '\n' ' ' < $O/$p.rss)"; cat $O/$p.maps
  grep -o '<heap nr="[0-9]*">\|<total type="rest"[^>]*>\|<system type="current"[^>]*>' $O/$p.mi | paste - - -
done
kill $SP $AP 2>/dev/null; wait $AP 2>/dev/null; kill $LP; rm -rf $D /dev/shm/oa-$TAG.jsonl
