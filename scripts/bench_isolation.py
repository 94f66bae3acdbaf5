#!/usr/bin/env python3
"""`make bench`, part two: isolation between endpoints, and shared rate limits.

1. Isolation. Open loop to six healthy endpoints (`herald-bench load`
   drives and receives),
   p99 accept-to-webhook latency measured twice in the same session:
   a. with nothing else going on;
   b. after a dead endpoint (connection refused) was given 10,000 deliveries
      that failed twice and now wait in its retry schedule (next try in 5
      minutes);
   b'. before that, while the first retries of those 10,000 deliveries
      (due 5 s after the first tries, which all failed) fall due together:
      the retry wave;
   c. while an endpoint that accepts connections and never answers gets a
      tenth of the traffic on top (each of its requests holds a worker until
      its 30 s timeout).
   The ratios b/a, b'/a and c/a are the figures: the target is at most 2.
2. Rate limit. Three `herald worker webhooks` processes against one endpoint
   limited to 50 deliveries/s; `herald-bench load` measures what arrives.

Loopback only; every phase is bounded in count and time. Results go to
target/bench/isolation.json, the target rows to target/bench/targets-isolation.json.
"""

import json
import os
import socket
import threading
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    OUT, Processes, endpoint_doc, free_port, load_endpoints, own_load, prepare, report_targets, target, wait_port,
)

RATE = int(os.environ.get("BENCH_ISOLATION_RATE", "500"))
HEALTHY_TASKS = int(os.environ.get("BENCH_ISOLATION_TASKS", "10000"))
DEAD_BACKLOG = int(os.environ.get("BENCH_DEAD_BACKLOG", "10000"))
LIMIT = 50
LIMITED_TASKS = 1000
HEALTHY_USERS = 6
DEAD_USER = 7
LIMITED_USER = 8
HANGING_USER = 9


def hold_connections(server):
    """Accepts connections and never answers: a hanging endpoint."""
    held = []
    while True:
        try:
            connection, _ = server.accept()
        except OSError:
            return
        held.append(connection)


def jsz(mon_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{mon_port}/jsz?streams=true&consumers=true", timeout=5) as r:
        return json.load(r)


def stream_messages(mon_port, name):
    for account in jsz(mon_port).get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] == name:
                return stream["state"]["messages"]
    return 0


def webhooks_state(mon_port):
    """(messages stored in HERALD_WEBHOOKS, pending + unacked for its consumer)."""
    for account in jsz(mon_port).get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] != "HERALD_WEBHOOKS":
                continue
            consumer = next(c for c in stream.get("consumer_detail", []) if c["name"] == "webhooks")
            return stream["state"]["messages"], consumer["num_pending"] + consumer["num_ack_pending"]
    return 0, 0


def post_tasks(api_port, user, count, rate=None):
    """POSTs `count` tasks for `user`, 32 at a time or `rate` per second;
    returns how many were accepted. These tasks build a backlog, they are
    not measured: a 503 (nothing stored, the publish ack was late on a
    loaded machine) is retried as a client would, a few times."""

    def post(i):
        for attempt in range(5):
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/users/{user}/tasks/echo",
                data=json.dumps({"seq": i}).encode(),
                headers={"content-type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    return r.status == 201
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    return False
                time.sleep(0.5 * (attempt + 1))
        return False

    with ThreadPoolExecutor(32) as pool:
        if rate is None:
            return sum(pool.map(post, range(count)))
        started = time.monotonic()
        posted = []
        for i in range(count):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            posted.append(pool.submit(post, i))
        return sum(p.result() for p in posted)


def wait_for(what, condition, deadline_s):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.5)
    sys.exit(f"bench: timed out after {deadline_s}s waiting for {what}")


def main():
    nats_bin, herald, driver = prepare("isolation")

    store = Path(tempfile.mkdtemp(prefix="herald-bench-isolation-"))
    nats_port, mon_port, api_port, receiver_port = free_port(), free_port(), free_port(), free_port()
    # Bound and closed again at once: connecting to it is refused.
    dead_port = free_port()
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(1024)
    threading.Thread(target=hold_connections, args=(hanging,), daemon=True).start()
    hanging_port = hanging.getsockname()[1]
    processes = Processes("isolation-")
    spawn = processes.spawn

    results = {}
    try:
        spawn([str(nats_bin), "-a", "127.0.0.1", "-p", str(nats_port), "-m", str(mon_port), "-js", "-sd", str(store)], {}, "nats")
        wait_port(nats_port)
        url = f"nats://127.0.0.1:{nats_port}"
        receiver = f"http://127.0.0.1:{receiver_port}"
        docs = [endpoint_doc(f"user-{u}", u, f"{receiver}/webhooks/{u}") for u in range(1, HEALTHY_USERS + 1)]
        docs.append(endpoint_doc("dead", DEAD_USER, f"http://127.0.0.1:{dead_port}/gone-away"))
        docs.append(endpoint_doc("hanging", HANGING_USER, f"http://127.0.0.1:{hanging_port}/", ", timeoutSeconds: 30"))
        docs.append(endpoint_doc("limited", LIMITED_USER, f"{receiver}/limited", f", rateLimit: {{perSecond: {LIMIT}}}"))
        env = load_endpoints(herald, store, url, docs)
        spawn([str(herald), "api", "--listen", f"127.0.0.1:{api_port}"], env, "api")
        spawn([str(herald), "worker", "tasks"], env, "worker-tasks")
        hooks = [spawn([str(herald), "worker", "webhooks"], env, f"worker-webhooks-{i}") for i in range(3)]
        wait_port(api_port)

        def open_loop(label):
            print(f"bench: open loop to healthy endpoints, {RATE}/s, {HEALTHY_TASKS} tasks ({label})")
            return own_load(driver, api_port, receiver_port, HEALTHY_TASKS, 200, rate=RATE, users=HEALTHY_USERS)

        # Unmeasured: the workers load the endpoints and open their
        # connections first, so the reference run does not pay for the start
        # (a slow reference would flatter the ratios below).
        print("bench: warm-up, 500 tasks (not measured)")
        own_load(driver, api_port, receiver_port, 500, 50, users=HEALTHY_USERS)
        results["healthy_alone"] = open_loop("no dead endpoint")

        # Rate limit: the three webhook workers share the endpoint's limit.
        print(f"bench: {LIMITED_TASKS} deliveries to an endpoint limited to {LIMIT}/s, 3 webhook workers")
        results["rate_limited"] = own_load(driver, api_port, receiver_port, LIMITED_TASKS, 50, users=1, first_user=LIMITED_USER)

        print(f"bench: {DEAD_BACKLOG} deliveries to a dead endpoint")
        attempts_before = stream_messages(mon_port, "HERALD_ATTEMPTS")
        accepted = post_tasks(api_port, DEAD_USER, DEAD_BACKLOG)
        assert accepted == DEAD_BACKLOG, f"only {accepted} of {DEAD_BACKLOG} dead-endpoint tasks accepted"

        # The retry wave: every first try has failed, and their retries
        # (5 s later, give or take the schedule's 20% jitter) fall due
        # together during the next open loop.
        def first_tries_made():
            return stream_messages(mon_port, "HERALD_ATTEMPTS") - attempts_before >= DEAD_BACKLOG

        wait_for("the dead endpoint's first tries", first_tries_made, 300)
        results["healthy_during_retry_wave"] = open_loop(f"{DEAD_BACKLOG} retries of the dead endpoint falling due")

        # Every dead delivery has failed twice (first try, then the retry
        # after 5 s) and waits for the next one, 5 minutes later, when the
        # attempts are recorded, the stream holds them all and the consumer
        # has none of them.
        def backlog_in_schedule():
            stored, consumer = webhooks_state(mon_port)
            attempts = stream_messages(mon_port, "HERALD_ATTEMPTS") - attempts_before
            return attempts >= 2 * DEAD_BACKLOG and stored >= DEAD_BACKLOG and consumer == 0

        wait_for("the dead endpoint's deliveries to wait in its schedule", backlog_in_schedule, 300)
        stored, _ = webhooks_state(mon_port)
        results["dead_backlog_in_schedule"] = stored
        results["healthy_with_dead_backlog"] = open_loop(f"{stored} dead deliveries scheduled")
        stored_after, _ = webhooks_state(mon_port)
        results["dead_backlog_after"] = stored_after

        hanging_tasks = HEALTHY_TASKS // 10
        print(f"bench: the same, with {hanging_tasks} tasks for an endpoint that never answers, {RATE // 10}/s")
        with ThreadPoolExecutor(1) as side:
            posted = side.submit(post_tasks, api_port, HANGING_USER, hanging_tasks, RATE / 10)
            results["healthy_with_hanging_endpoint"] = open_loop("an endpoint hanging")
            assert posted.result() == hanging_tasks

        for p in hooks:
            p.send_signal(signal.SIGTERM)
    finally:
        processes.end(grace_s=30)
        shutil.rmtree(store, ignore_errors=True)
        hanging.close()

    (OUT / "isolation.json").write_text(json.dumps(results, indent=2))
    alone, loaded, limited = results["healthy_alone"], results["healthy_with_dead_backlog"], results["rate_limited"]
    wave = results["healthy_during_retry_wave"]
    hung = results["healthy_with_hanging_endpoint"]

    def p99(run):
        return (run.get("accept_to_webhook_ms") or {}).get("p99", float("inf"))

    def p50(run):
        return (run.get("accept_to_webhook_ms") or {}).get("p50", float("inf"))

    ratio, hung_ratio, wave_ratio = p99(loaded) / p99(alone), p99(hung) / p99(alone), p99(wave) / p99(alone)
    print()
    print(f"isolation ({RATE} tasks/s to {HEALTHY_USERS} healthy endpoints, 3 webhook workers)")
    print(f"  alone                      p50/p99 {p50(alone):.1f} / {p99(alone):.1f} ms, missing {alone['missing']}")
    print(f"  with {results['dead_backlog_in_schedule']} dead deliveries waiting  p50/p99 {p50(loaded):.1f} / {p99(loaded):.1f} ms, missing {loaded['missing']}")
    print(f"  p99 ratio                  {ratio:.2f} (target <= 2)")
    print(f"  during {DEAD_BACKLOG} retries falling due  p50/p99 {p50(wave):.1f} / {p99(wave):.1f} ms, missing {wave['missing']}")
    print(f"  p99 ratio                  {wave_ratio:.2f} (target <= 2)")
    print(f"  with an endpoint hanging   p50/p99 {p50(hung):.1f} / {p99(hung):.1f} ms, missing {hung['missing']}")
    print(f"  p99 ratio                  {hung_ratio:.2f} (target <= 2)")
    print(f"rate limit ({LIMIT}/s, 3 webhook workers, {LIMITED_TASKS} deliveries)")
    rate = limited["deliveries_per_s"]
    print(f"  delivered                  {rate:.1f} /s ({rate / LIMIT:.3f} x the limit; target within 10%), missing {limited['missing']}")
    print(f"results: {OUT / 'isolation.json'}")
    runs = [alone, wave, loaded, hung, limited]
    missing = sum(r["missing"] for r in runs)
    duplicates = sum(r["duplicates"] for r in runs)
    refused = sum(r["sent"] - r["accepted"] + r["unsent"] for r in runs)
    rows = [
        target("healthy p99, dead endpoint's backlog / alone", f"{ratio:.2f}", "<= 2", ratio <= 2),
        target("healthy p99, a retry wave of a dead endpoint / alone (issue 13)", f"{wave_ratio:.2f}", "<= 2", wave_ratio <= 2),
        target("healthy p99, an endpoint hanging / alone", f"{hung_ratio:.2f}", "<= 2", hung_ratio <= 2),
        target(f"shared rate limit ({LIMIT}/s, 3 workers)", f"{rate:.1f} /s", "within 10%", abs(rate / LIMIT - 1) <= 0.1),
        target("webhooks missing, every phase", str(missing), "0", missing == 0),
        target("webhooks duplicated, every phase", str(duplicates), "0", duplicates == 0),
        target("tasks not accepted, every phase", str(refused), "0", refused == 0),
    ]
    missed = report_targets("isolation", rows)
    if missed:
        sys.exit("bench: target missed: " + ", ".join(missed))

if __name__ == "__main__":
    main()
