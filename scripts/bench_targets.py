#!/usr/bin/env python3
"""`make bench`, last step: every target row of the runs above in one table;
exits non-zero naming each target missed.

Each bench script writes its rows to target/bench/targets-<name>.json when
it gets that far (and removes the file when it starts), so a script that
stopped early shows as a missed target of its own rather than as silence.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import OUT  # noqa: E402

SCRIPTS = {
    "bench": "scripts/bench.py",
    "isolation": "scripts/bench_isolation.py",
    "endpoints": "scripts/bench_endpoints.py",
    "cluster": "scripts/bench_cluster.py",
    "operator": "scripts/bench_operator.py",
}


def main():
    rows = []
    for name, script in SCRIPTS.items():
        path = OUT / f"targets-{name}.json"
        if path.exists():
            rows += json.loads(path.read_text())
        else:
            rows.append({"row": f"{script} ran to its targets", "value": "stopped", "target": "finished", "ok": False})
    print()
    print("make bench: every target")
    for r in rows:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'}  {r['row']:52s} {r['value']:>14s}   target {r['target']}")
    missed = [r["row"] for r in rows if not r["ok"]]
    if missed:
        sys.exit(f"make bench: {len(missed)} target(s) missed: " + "; ".join(missed))
    print("make bench: every target met")


if __name__ == "__main__":
    main()
