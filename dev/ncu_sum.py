"""Sums Nsight Compute's CSV (--csv --metrics gpu__time_duration.sum) by kernel name: calls, total and mean time.
usage: python3 dev/ncu_sum.py ncu.csv"""
import csv
import sys
from collections import defaultdict

tot, cnt = defaultdict(float), defaultdict(int)
with open(sys.argv[1], newline="") as f:
    rows = [r for r in csv.reader(f) if r]
head = next((i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Value" in r), None)
if head is None:
    sys.exit("no ncu table in " + sys.argv[1])
h = rows[head]
ki, ui, vi = h.index("Kernel Name"), h.index("Metric Unit"), h.index("Metric Value")
for r in rows[head + 1:]:
    if len(r) <= vi:
        continue
    name = r[ki].split("(")[0].split("<")[0].replace("void ", "").strip()
    v = float(r[vi].replace(",", ""))
    unit = r[ui]
    us = v / 1e3 if unit in ("ns", "nsecond") else v * 1e3 if unit in ("ms", "msecond") else v
    tot[name] += us
    cnt[name] += 1
all_us = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_us / 1e3:.3f} ms")
for k in sorted(tot, key=tot.get, reverse=True):
    print(f"  {k:24s} {cnt[k]:6d} calls {tot[k] / 1e3:9.3f} ms {100 * tot[k] / all_us:5.1f}% {tot[k] / cnt[k]:8.2f} us/call")
