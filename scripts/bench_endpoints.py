#!/usr/bin/env python3
"""`make bench`, endpoint scale: what the number of endpoints costs.

For 10, 10,000 and 1,000,000 endpoints (one per user), each on its own
nats-server (JetStream, file storage):

1. load rate: `herald endpoints <file>` writes them all (parse, seal,
   compare-and-set per record), endpoints per second;
2. ready time: a task worker and a webhook worker started on the full
   bucket, until their /readyz answers 200;
3. deliveries/s: closed loops of 20,000 tasks spread over every user
   (round-robin, so with a million users nearly every lookup is a miss of
   the workers' bounded endpoint cache), three rounds with the scales
   taking turns (all three stay up), the median of each as a ratio of the
   10-endpoint median;
4. worker RSS: peak resident memory of each worker after the loop.

Targets (issue 13): worker RSS <= 150 MiB and ready <= 5 s whatever the
count, >= 5,000 endpoints/s written, deliveries/s with a million endpoints
>= 0.8 of ten. Rows go to target/bench/targets-endpoints.json; exits
non-zero when one is missed. Loopback only; bounded in count and time.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    OUT, Processes, endpoint_doc, free_port, herald_env, own_load, prepare, report_targets, rss_mib, target, wait_port,
    write_endpoint_docs, write_endpoints,
)

SCALES = [int(n) for n in os.environ.get("BENCH_ENDPOINT_SCALES", "10,10000,1000000").split(",")]
TASKS = int(os.environ.get("BENCH_ENDPOINT_TASKS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ENDPOINT_ROUNDS", "3"))
READY_DEADLINE_S = 120


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def cache_lookups(port):
    """`herald_endpoint_cache_lookups_total` of one worker, by result."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("herald_endpoint_cache_lookups_total{"):
            labels, value = line.rsplit(" ", 1)
            result = labels.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = int(float(value))
    return counts


def wait_ready(ports, started):
    """Seconds from `started` until every port's /readyz answers 200."""
    waiting = set(ports)
    seconds = {}
    while waiting:
        if time.monotonic() - started > READY_DEADLINE_S:
            sys.exit(f"bench: workers on {sorted(waiting)} not ready after {READY_DEADLINE_S}s")
        for port in list(waiting):
            if ready(port):
                seconds[port] = time.monotonic() - started
                waiting.discard(port)
        time.sleep(0.02)
    return max(seconds.values())


class Scale:
    """One scale's nats-server, endpoints and Herald processes, kept up
    for every round so the rounds of all scales can alternate."""

    def __init__(self, herald, nats_bin, count):
        self.count = count
        self.store = Path(tempfile.mkdtemp(prefix="herald-bench-endpoints-"))
        self.processes = Processes(f"endpoints-{count}-")
        nats_port, self.api_port, self.receiver_port = free_port(), free_port(), free_port()
        tasks_health, hooks_health = free_port(), free_port()
        self.health_ports = {"worker-tasks": tasks_health, "worker-webhooks": hooks_health}
        self.processes.spawn([nats_bin, "-a", "127.0.0.1", "-p", nats_port, "-js", "-sd", self.store], {}, "nats")
        wait_port(nats_port)
        url = f"nats://127.0.0.1:{nats_port}"
        env = herald_env(herald, url)
        docs = self.store / "endpoints.yaml"
        receiver = f"http://127.0.0.1:{self.receiver_port}/webhooks"
        write_endpoint_docs(docs, (endpoint_doc(f"e{u}", u, f"{receiver}/{u}") for u in range(1, count + 1)))
        print(f"bench: {count} endpoints: herald endpoints")
        started = time.monotonic()
        write_endpoints(herald, env, docs)
        self.load_s = time.monotonic() - started
        docs.unlink()

        started = time.monotonic()
        self.api = self.processes.spawn([herald, "api", "--listen", f"127.0.0.1:{self.api_port}"], env, "api")
        self.tasks = self.processes.spawn(
            [herald, "worker", "tasks"], {**env, "HERALD_HEALTH__LISTEN": f"127.0.0.1:{tasks_health}"}, "worker-tasks")
        self.hooks = self.processes.spawn(
            [herald, "worker", "webhooks,mail"], {**env, "HERALD_HEALTH__LISTEN": f"127.0.0.1:{hooks_health}"},
            "worker-webhooks")
        self.ready_s = wait_ready([tasks_health, hooks_health], started)
        wait_port(self.api_port)
        self.rounds = []

    def warm_up(self, driver):
        # Connections open and code paths warm, on the first 500 users.
        own_load(driver, self.api_port, self.receiver_port, 500, 50, users=min(self.count, 500), first_user=1)

    def run(self, driver):
        print(f"bench: {self.count} endpoints: closed loop, {TASKS} tasks over {self.count} users")
        self.rounds.append(own_load(driver, self.api_port, self.receiver_port, TASKS, 50, users=self.count, first_user=1))

    def row(self):
        per_s = sorted(r["deliveries_per_s"] for r in self.rounds)
        return {
            "endpoints": self.count,
            "load_per_s": self.count / self.load_s,
            "load_s": self.load_s,
            "ready_s": self.ready_s,
            "deliveries_per_s": per_s[len(per_s) // 2],
            "deliveries_per_s_rounds": [r["deliveries_per_s"] for r in self.rounds],
            "missing": sum(r["missing"] for r in self.rounds),
            "duplicates": sum(r["duplicates"] for r in self.rounds),
            "rss_mib": {"worker-tasks": rss_mib(self.tasks.pid), "worker-webhooks": rss_mib(self.hooks.pid)},
            "cache_lookups": {role: cache_lookups(port) for role, port in self.health_ports.items()},
        }

    def close(self):
        try:
            self.processes.end(grace_s=30)
        finally:
            shutil.rmtree(self.store, ignore_errors=True)


def main():
    nats_bin, herald, driver = prepare("endpoints")
    scales = []
    try:
        for count in SCALES:
            scales.append(Scale(herald, nats_bin, count))
        for scale in scales:
            scale.warm_up(driver)
        # The scales take turns, round after round: this machine's speed
        # drifts with its neighbours, and each ratio compares medians of
        # loops run side by side.
        for _ in range(ROUNDS):
            for scale in scales:
                scale.run(driver)
        rows = [scale.row() for scale in scales]
    finally:
        for scale in scales:
            scale.close()
    (OUT / "results-endpoints.json").write_text(json.dumps(rows, indent=2))

    base = rows[0]["deliveries_per_s"]
    print()
    print(f"endpoint scale (one endpoint per user; {ROUNDS} rounds of {TASKS} tasks over every user, closed loop of 50, scales taking turns; median)")
    print(f"  {'endpoints':>10s} {'load/s':>9s} {'ready s':>8s} {'deliveries/s':>13s} {'ratio':>6s} {'RSS tasks':>10s} {'RSS webhooks':>13s} {'lost':>5s} {'dup':>4s}")
    for r in rows:
        print(f"  {r['endpoints']:>10d} {r['load_per_s']:>9.0f} {r['ready_s']:>8.2f} {r['deliveries_per_s']:>13.0f} "
              f"{r['deliveries_per_s'] / base:>6.2f} {r['rss_mib']['worker-tasks']:>10.1f} {r['rss_mib']['worker-webhooks']:>13.1f} "
              f"{r['missing']:>5d} {r['duplicates']:>4d}")
    print("  endpoint lookups by result (herald_endpoint_cache_lookups_total, warm-up included):")
    for r in rows:
        print(f"  {r['endpoints']:>10d} " + "  ".join(
            f"{role}: " + ", ".join(f"{result} {n}" for result, n in sorted(counts.items()))
            for role, counts in r["cache_lookups"].items()))

    largest = rows[-1]
    ratio = largest["deliveries_per_s"] / base
    rss = max(largest["rss_mib"].values())
    ready = max(r["ready_s"] for r in rows)
    lost = sum(r["missing"] + r["duplicates"] for r in rows)
    missed = report_targets("endpoints", [
        target(f"worker RSS, {largest['endpoints']} endpoints (MiB)", f"{rss:.1f}", "<= 150", rss <= 150),
        target("worker ready, slowest scale (s)", f"{ready:.2f}", "<= 5", ready <= 5),
        target("herald endpoints, writes/s (largest scale)", f"{largest['load_per_s']:.0f}", ">= 5000",
               largest["load_per_s"] >= 5000),
        target(f"deliveries/s, {largest['endpoints']} / {rows[0]['endpoints']} endpoints", f"{ratio:.2f}", ">= 0.8",
               ratio >= 0.8),
        target("endpoint scale: lost + duplicated", str(lost), "0", lost == 0),
    ])
    if missed:
        sys.exit("bench: target missed: " + ", ".join(missed))

if __name__ == "__main__":
    main()
