#!/bin/bash
# Where the agent's RSS sits before and after a listener outage, per malloc arena (docs/BENCHMARKS.md,
# "Soak"), as root after `cargo xtask build`, with gdb installed:
#   xtask/scripts/outage-arenas.sh AGENT_BINARY TAG
# outage-rss.sh's run (2000 profiles/s of 1 KiB, non-blocking) with 38 s up, 40 s with the listener
# stopped (spooled) and 80 s after it is back. At its two samples this writes to
# /tmp/apm-outage-arenas/TAG/: PHASE.rss (VmRSS before and after a malloc_trim(0) called through
# gdb), PHASE.maps (the [heap] and anonymous mappings of >= 64 KiB with their Rss, KiB, read after
# the trim) and PHASE.mi (glibc's malloc_info XML: per arena, "rest" is free bytes, the top chunk
# included, and "current" its size).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
export OA_OUT=/tmp/apm-outage-arenas/$2; mkdir -p $OA_OUT
dump() {
  local O=$OA_OUT AP=$2
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
export -f dump
UP=38 DOWN=40 AFTER=80 PHASE_HOOK=dump bash "$HERE/outage-rss.sh" "$1" "$2"
for p in before after; do
  echo "$2 $p: $(tr '\n' ' ' < $OA_OUT/$p.rss)"; cat $OA_OUT/$p.maps
  grep -o '<heap nr="[0-9]*">\|<total type="rest"[^>]*>\|<system type="current"[^>]*>' $OA_OUT/$p.mi | paste - - -
done
