#!/bin/bash
# The agent's live heap across a listener outage, as root after `cargo xtask build` (needs
# heaptrack): xtask/scripts/outage-heap.sh [OUT]. The agent (eBPF off) runs under heaptrack while
# apm-test-sender sends 2000 profiles/s of 1 KiB, non-blocking: 40 s up, 40 s with the listener
# stopped (spooled), 80 s after it is back. Prints the agent's VmRSS at the end and the live heap
# (heaptrack's massif snapshots, `mem_heap_B`) every ~4 s: compare before the outage with after
# the replay. A live heap that comes back while RSS does not is memory the allocator keeps.
set -u
OUT=${1:-/tmp/apm-outage-heap}; HERE=$(cd "$(dirname "$0")" && pwd); B=$(cd "$HERE/../.." && pwd)/target/release
. "$HERE/pair.sh"
rm -f $OUT.zst $OUT.massif
PAIR_EBPF=off HEAPTRACK="heaptrack -o $OUT" start_pair "$B" > /dev/null
sleep 3
$B/apm-test-sender --socket $SOCK --count 400000 --rate 2000 --nonblocking --size 1024 --prefix o > $D/s.out & SP=$!
sleep 40; stop_listener; sleep 40; start_listener; sleep 80
echo "agent VmRSS at the end: $(grep VmRSS /proc/$AP/status | awk '{print $2, $3}') (heaptrack's own memory included)"
kill $SP; stop_pair; sleep 2
heaptrack_print -f $OUT.zst --print-massif $OUT.massif >/dev/null 2>&1
echo "live heap (MiB; includes the receive slots' 16 MiB of address space), outage from ~43 s to ~83 s:"
awk -F= '/^time=/ {t=$2} /^mem_heap_B=/ {if (t >= next_t) {printf "%6.1f s %6.2f\n", t, $2/1048576; next_t = t + 4}}' $OUT.massif
