"""The largest buffers of a compiled XLA program, from its buffer assignment.

Run a program with ``XLA_FLAGS=--xla_dump_to=DIR``; XLA writes
``*buffer-assignment.txt`` files there. This prints, per file (the largest
programs first), its allocations by size: kind (parameter, output, temp,
...), size, and the values living in it (instruction and shape), so one
can see what a step keeps on the device beside parameters, gradients and
state (an ``updates`` buffer, a copy of the old state, ...)::

  python benchmarks/experiments/buffer_summary.py DIR [--top 12] [--min-gb 0.1]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s+value: <\d+ (\S+) @[^>]*> \(size=(\d+),offset=(\d+)\): (\S+)")


def parse(path: str) -> list[dict]:
  allocations, current = [], None
  with open(path) as f:
    for line in f:
      match = _ALLOCATION.match(line)
      if match:
        current = dict(index=int(match.group(1)), bytes=int(match.group(2)),
                       kind=match.group(3).strip(" ,:"), values=[])
        allocations.append(current)
        continue
      match = _VALUE.match(line)
      if match and current is not None:
        current["values"].append(dict(name=match.group(1),
                                      bytes=int(match.group(2)),
                                      shape=match.group(4)))
  return allocations


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dir")
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--min-gb", type=float, default=0.1)
  parser.add_argument("--files", type=int, default=3,
                      help="the largest programs to show")
  parser.add_argument("--values", type=int, default=6,
                      help="the largest values shown per allocation")
  parser.add_argument("--json")
  args = parser.parse_args()
  files = glob.glob(os.path.join(args.dir, "**", "*buffer-assignment.txt"),
                    recursive=True)
  programs = []
  for path in files:
    allocations = parse(path)
    total = sum(a["bytes"] for a in allocations)
    programs.append(dict(file=os.path.basename(path), total_gb=total / 1e9,
                         allocations=sorted(allocations, key=lambda a: -a["bytes"])))
  programs.sort(key=lambda p: -p["total_gb"])
  out = []
  for program in programs[:args.files]:
    print(f"== {program['file']}: {program['total_gb']:.2f} GB in all")
    shown = []
    for a in program["allocations"][:args.top]:
      if a["bytes"] / 1e9 < args.min_gb:
        break
      values = sorted(a["values"], key=lambda v: -v["bytes"])[:args.values]
      print(f"  {a['bytes'] / 1e9:8.3f} GB  {a['kind'][:60]:60s}  "
            + "; ".join(f"{v['name']} {v['shape']}" for v in values))
      shown.append(dict(gb=a["bytes"] / 1e9, kind=a["kind"], values=values))
    out.append(dict(file=program["file"], total_gb=program["total_gb"],
                    largest=shown))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
