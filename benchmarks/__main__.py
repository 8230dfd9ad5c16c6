"""Runs every `benchmarks/bench_*.py`, prints a table and writes `bench/results.json` ({name: number}).

Figures are ratios measured within one run on the same machine, medians over repeats: the
machines we run on are small and noisy, so absolute times only make sense next to their bound.

    make bench                      # all benchmarks
    python -m benchmarks restore    # only bench_restore.py
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys
import time


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    wanted = [f"bench_{a}" if not a.startswith("bench_") else a for a in argv] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {names}", file=sys.stderr)
        return 2
    out_path = pathlib.Path("bench/results.json")
    results: dict[str, float] = {}
    if out_path.exists():
        results.update(json.loads(out_path.read_text()))
    for name in wanted:
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        figures = module.run()
        results.update(figures)
        print(f"\n{name} ({time.perf_counter() - start:.0f} s)")
        for key, value in figures.items():
            print(f"  {key:<34} {value:.4g}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
