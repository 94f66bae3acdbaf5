#!/usr/bin/env python3
"""`make bench`: the whole pipeline on this machine, measured.

Starts a nats-server (JetStream, file storage), Herald as three processes
(api; worker tasks; worker webhooks,mail) and drives it with the independent
harness ../shared/bench/e2e, which also runs the receiver. Three runs:

1. closed loop, 20,000 tasks, 50 in flight: ingest tasks/s, deliveries/s,
   accept-to-delivery latency;
2. open loop at 1,000 tasks/s: p99 latency at a realistic rate;
3. the baseline, in the same session: bare two-hop JetStream
   (../shared/bench/jetstream-bound pipeline, Nats-Msg-Id on), so results
   can be read as a ratio on this shared, noisy machine.

Prints a summary and writes every JSON result to target/bench/.
Only loopback is used; every run is bounded in count and time.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
TOOLS = Path(os.environ.get("HERALD_TOOLS", Path.home() / ".cache" / "herald-tools"))
OUT = ROOT / "target" / "bench"
TASKS = int(os.environ.get("BENCH_TASKS", "20000"))
RATE = int(os.environ.get("BENCH_RATE", "1000"))
USERS = 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: nothing listening on port {port} after {deadline}s")


def build(manifest, target_dir):
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", str(manifest), "--target-dir", str(target_dir)],
        check=True,
    )


def rss_mib(pid):
    """Peak resident memory (VmHWM) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_json(output):
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in:\n" + output[-2000:])


def endpoint_doc(name, user, url, extra=""):
    """A WebhookEndpoint document for `herald endpoints`."""
    return (
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{userId: '{user}', url: '{url}'{extra}}}\n"
    )


def load_endpoints(herald, store, url, docs):
    """Writes the endpoints into NATS with `herald endpoints`; returns the
    environment every Herald process of the run needs."""
    endpoints = store / "endpoints.yaml"
    endpoints.write_text("---\n".join(docs))
    # Endpoint records are sealed: every role that reads or writes them
    # needs the same key.
    key = subprocess.run(
        [str(herald), "secrets", "new-key", "--id", "bench"], check=True, capture_output=True, text=True
    ).stdout.strip()
    keyed = {**os.environ, "HERALD_SECRETS__KEY": key}
    subprocess.run([str(herald), "endpoints", str(endpoints), "--nats-url", url], env=keyed, check=True, capture_output=True)
    return {
        "HERALD_LOG__FILTER": "warn",
        "HERALD_NATS__URL": url,
        # The receivers are on loopback, which the SSRF guard refuses
        # unless the allow-list opens it.
        "HERALD_WEBHOOKS__SSRF__ALLOW": '["127.0.0.0/8"]',
        "HERALD_SECRETS__KEY": key,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    nats_bin = TOOLS / "bin" / "nats-server"
    if not nats_bin.exists():
        sys.exit(f"bench: {nats_bin} missing: run `make tools`")
    print("bench: building herald and the harnesses (release)")
    build(ROOT / "Cargo.toml", ROOT / "target")
    build(SHARED / "e2e" / "Cargo.toml", TOOLS / "bench-target")
    build(SHARED / "jetstream-bound" / "Cargo.toml", TOOLS / "bench-target")
    herald = ROOT / "target" / "release" / "herald"
    e2e = TOOLS / "bench-target" / "release" / "e2e-bench"
    jsbound = TOOLS / "bench-target" / "release" / "jetstream-bound"

    store = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    nats_port, mon_port, api_port, receiver_port = free_port(), free_port(), free_port(), free_port()
    procs = []

    def spawn(args, env=None, name=""):
        log = open(OUT / f"{name}.log", "w")
        p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        nats = spawn([str(nats_bin), "-a", "127.0.0.1", "-p", str(nats_port), "-m", str(mon_port), "-js", "-sd", str(store)], name="nats")
        wait_port(nats_port)
        url = f"nats://127.0.0.1:{nats_port}"

        docs = [
            endpoint_doc(f"user-{u}", u, f"http://127.0.0.1:{receiver_port}/webhooks/{u}", f", email: 'user{u}@example.com'")
            for u in range(1, USERS + 1)
        ]
        env = load_endpoints(herald, store, url, docs)
        api = spawn([str(herald), "api", "--listen", f"127.0.0.1:{api_port}"], env, name="api")
        tasks = spawn([str(herald), "worker", "tasks"], env, name="worker-tasks")
        hooks = spawn([str(herald), "worker", "webhooks,mail"], env, name="worker-webhooks")
        wait_port(api_port)
        # No wait for the workers: tasks posted before they have loaded the
        # endpoints simply wait in HERALD_TASKS.

        task_url = f"http://127.0.0.1:{api_port}/users/{{user}}/tasks/{{type}}"
        common = [
            "--url", task_url, "-u", str(USERS), "--types", "echo", "--port", str(receiver_port),
            "--correlate", r'"task_id":"([A-Za-z0-9:_-]+)"', "--timeout-s", "300",
        ]
        results = {}
        print(f"bench: closed loop, {TASKS} tasks, 50 in flight")
        # Where the two cores go during the closed loop: CPU seconds of each
        # process (the load driver, which also runs the receiver, counted as
        # a finished child).
        measured = {"nats-server": nats, "api": api, "worker-tasks": tasks, "worker-webhooks": hooks}
        cpu_before = {name: cpu_seconds(p.pid) for name, p in measured.items()}
        driver_before = children_cpu_seconds()
        started = time.monotonic()
        run = subprocess.run([str(e2e), "run", "-n", str(TASKS), "-c", "50", *common], capture_output=True, text=True, check=True)
        wall = time.monotonic() - started
        results["closed"] = last_json(run.stdout)
        cpu = {name: cpu_seconds(p.pid) - cpu_before[name] for name, p in measured.items()}
        cpu["load driver + receiver"] = children_cpu_seconds() - driver_before
        results["closed_cpu_seconds"] = {"wall": wall, **cpu}
        print(f"bench: open loop, {RATE} tasks/s for {TASKS // RATE}s")
        run = subprocess.run(
            [str(e2e), "run", "-n", str(TASKS), "--rate", str(RATE), "-c", "200", *common], capture_output=True, text=True, check=True
        )
        results["open"] = last_json(run.stdout)
        results["rss_mib"] = {"api": rss_mib(api.pid), "worker-tasks": rss_mib(tasks.pid), "worker-webhooks": rss_mib(hooks.pid)}
        for p in (api, tasks, hooks):
            p.send_signal(signal.SIGTERM)
        for p in (api, tasks, hooks):
            p.wait(timeout=30)

        print("bench: baseline, bare two-hop JetStream pipeline (jetstream-bound)")
        run = subprocess.run(
            [str(jsbound), "--url", url, "--monitor", f"127.0.0.1:{mon_port}", "--server-pid", str(nats.pid),
             "pipeline", "-n", "100000", "-s", "1", "-i", "256", "--msg-id"],
            capture_output=True, text=True, check=True,
        )
        results["baseline"] = last_json(run.stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(store, ignore_errors=True)

    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    c, o, b = results["closed"], results["open"], results["baseline"]
    base = b["msgs_per_s"]
    print()
    print(f"closed loop ({TASKS} tasks, 50 in flight)")
    print(f"  ingest            {c['ingest_tasks_per_s']:10.0f} tasks/s")
    print(f"  deliveries        {c['e2e_deliveries_per_s']:10.0f} /s   ({c['e2e_deliveries_per_s'] / base:.2f} x bare JetStream two-hop)")
    print(f"  latency p50/p99   {c['latency_ms']['p50']:.1f} / {c['latency_ms']['p99']:.1f} ms (accept -> webhook, under backlog)")
    print(f"  missing/duplicates {c['missing']} / {c['duplicates']}")
    cpu = dict(results["closed_cpu_seconds"])
    cpu.pop("wall")
    # The driver's run also includes its start-up and a grace period after
    # the last webhook; the busy cores are reckoned over the measured span.
    span = c["e2e_s"]
    print(f"  CPU (whole run; {sum(cpu.values()) / span:.2f} cores busy over the {span:.1f} s from first accept to last webhook):")
    for name, seconds in cpu.items():
        per_delivery = seconds / TASKS * 1e6
        print(f"    {name:24s} {seconds:6.2f} s  {100 * seconds / sum(cpu.values()):4.0f}%  {per_delivery:5.0f} us/delivery")
    print(f"open loop ({RATE} tasks/s)")
    print(f"  deliveries        {o['e2e_deliveries_per_s']:10.0f} /s, late sends {o.get('late_sends')}")
    print(f"  latency p50/p99   {o['latency_ms']['p50']:.1f} / {o['latency_ms']['p99']:.1f} ms (accept -> webhook)")
    print(f"  missing/duplicates {o['missing']} / {o['duplicates']}")
    print("peak RSS (MiB)     " + ", ".join(f"{k} {v:.1f}" for k, v in results["rss_mib"].items()))
    print(f"baseline           {base:10.0f} msgs/s bare two-hop JetStream (same nats-server, same session)")
    print(f"results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
