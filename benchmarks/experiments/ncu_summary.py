"""Sums an ``ncu --csv --metrics gpu__time_duration.sum`` log by kernel name.

  python benchmarks/experiments/ncu_summary.py ncu.csv
"""

import collections
import csv
import sys


def main(path: str) -> None:
  with open(path) as f:
    lines = [line for line in f if line.startswith('"')]
  totals, counts = collections.Counter(), collections.Counter()
  for row in csv.DictReader(lines):
    if row.get("Metric Name") != "gpu__time_duration.sum":
      continue
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[row["Metric Unit"]]
    name = row["Kernel Name"][:60]
    totals[name] += float(row["Metric Value"].replace(",", "")) * scale
    counts[name] += 1
  print(f"{sum(counts.values())} kernels, {sum(totals.values()):.1f} us in all")
  for name, us in totals.most_common(12):
    print(f"  {us:9.1f} us  {counts[name]:4d} x  {name}")


if __name__ == "__main__":
  main(sys.argv[1])
