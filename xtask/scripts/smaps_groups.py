#!/usr/bin/env python3
"""Groups /proc/PID/smaps by what the mapping is: Rss and Private_Dirty in KiB per group."""
import sys, re, collections
pid = sys.argv[1]
groups = collections.OrderedDict()
cur = None
def group(name, perms, size_kb):
    if name.endswith('apm-agent'):
        return 'binary ' + ('text' if 'x' in perms else 'data/rodata')
    if name.startswith('/'):
        return 'shared libraries'
    if name == '[heap]':
        return '[heap] (brk: main-thread malloc)'
    if name.startswith('[stack'):
        return '[stack]'
    if 'bpf' in name:
        return 'bpf: ' + name
    if name.startswith('['):
        return name
    if name == '':
        return 'anonymous mmap'
    return name
rows = []
for line in open(f'/proc/{pid}/smaps'):
    m = re.match(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$', line)
    if m:
        start, end, perms, name = int(m[1], 16), int(m[2], 16), m[3], m[4].strip()
        cur = {'name': name, 'perms': perms, 'size': (end - start) // 1024, 'rss': 0, 'pd': 0}
        rows.append(cur)
        continue
    k, _, v = line.partition(':')
    if k == 'Rss':
        cur['rss'] = int(v.split()[0])
    elif k == 'Private_Dirty':
        cur['pd'] = int(v.split()[0])
agg = collections.defaultdict(lambda: [0, 0, 0, 0])
big = []
for r in rows:
    g = group(r['name'], r['perms'], r['size'])
    a = agg[g]
    a[0] += r['rss']; a[1] += r['pd']; a[2] += r['size']; a[3] += 1
    if g == 'anonymous mmap' and r['rss'] >= 512:
        big.append(r)
tot = sum(a[0] for a in agg.values())
print(f"{'group':45} {'Rss KiB':>9} {'PrivDirty':>9} {'VSZ KiB':>9} {'maps':>5}")
for g, a in sorted(agg.items(), key=lambda x: -x[1][0]):
    print(f"{g:45} {a[0]:9} {a[1]:9} {a[2]:9} {a[3]:5}")
print(f"{'TOTAL':45} {tot:9}")
print("anonymous mappings with Rss >= 512 KiB (size KiB, Rss KiB):")
for r in sorted(big, key=lambda r: -r['rss']):
    print(f"   size {r['size']:8} rss {r['rss']:8} {r['perms']}")
