"""Sums Nsight Compute's CSV by kernel: calls, total and mean time, and with
--metrics gpu__time_duration.sum,dram__bytes_read.sum the DRAM bytes read
and the resulting bandwidth. Template arguments are kept (k_matvec<8,...>
is the Q8_0 matvec: the first argument is the ds4 weight type).
usage: python3 dev/ncu_sum.py ncu.csv"""
import csv
import re
import sys
from collections import defaultdict

tot, cnt, byt = defaultdict(float), defaultdict(int), defaultdict(float)
with open(sys.argv[1], newline="") as f:
    rows = [r for r in csv.reader(f) if r]
head = next((i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Value" in r), None)
if head is None:
    sys.exit("no ncu table in " + sys.argv[1])
h = rows[head]
ki, ui, vi, mi = h.index("Kernel Name"), h.index("Metric Unit"), h.index("Metric Value"), h.index("Metric Name")
for r in rows[head + 1:]:
    if len(r) <= vi:
        continue
    name = r[ki].replace("void ", "").split("(")[0].strip()
    name = re.sub(r"\s+", "", name).replace("(ds4_type)", "")
    v = float(r[vi].replace(",", ""))
    unit, metric = r[ui], r[mi]
    if metric.startswith("gpu__time_duration"):
        us = v / 1e3 if unit in ("ns", "nsecond") else v * 1e3 if unit in ("ms", "msecond") else v
        tot[name] += us
        cnt[name] += 1
    elif metric.startswith("dram__bytes_read"):
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1)
        byt[name] += v * scale
all_us = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_us / 1e3:.3f} ms, {sum(byt.values()) / 1e9:.3f} GB read")
for k in sorted(tot, key=tot.get, reverse=True):
    bw = f"{byt[k] / tot[k] / 1e3:8.0f} GB/s {byt[k] / cnt[k] / 1e6:8.2f} MB/call" if byt[k] else ""
    print(f"  {k[:40]:40s} {cnt[k]:6d} calls {tot[k] / 1e3:8.3f} ms {100 * tot[k] / all_us:5.1f}% "
          f"{tot[k] / cnt[k]:8.2f} us/call {bw}")
