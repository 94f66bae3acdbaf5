#!/usr/bin/env python3
"""`make bench`: the whole pipeline on this machine, measured.

Starts a nats-server (JetStream, file storage), Herald as three processes
(api; worker tasks; worker webhooks,mail) and drives it with the project's
own load driver, `herald-bench load` (crates/herald-bench), which also runs
the webhook receiver and counts every non-201, missing, duplicate and stray
webhook. Three runs:

1. closed loop, 20,000 tasks, 50 in flight: ingest tasks/s, deliveries/s,
   accept-to-delivery latency, CPU of each process;
2. open loop at 1,000 tasks/s: p99 latency at a realistic rate;
   then closed loops with tracing off and on, alternating, every trace
   exported to a Jaeger on this machine (the cost of tracing, as a ratio);
3. the baseline, in the same session: bare two-hop JetStream
   (`herald-bench jetstream-bound`: publish with Nats-Msg-Id and ack to A,
   consume, publish to B and await its ack before acking A, consume B), so
   results can be read as a ratio on this shared, noisy machine.

Where ../shared/bench/ exists (next to the repository), its independent
e2e driver and jetstream-bound run the same three measurements as a
cross-check, printed next to the project's own.

Prints every figure, then the target rows; exits non-zero when a target is
missed. JSON results go to target/bench/ (results.json, targets-bench.json).
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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The independent harness, when the repository sits next to it; a clone
# does without. BENCH_SHARED points elsewhere (a git worktree, say).
SHARED = Path(os.environ.get("BENCH_SHARED", ROOT.parent / "shared" / "bench"))
TOOLS = Path(os.environ.get("HERALD_TOOLS", Path.home() / ".cache" / "herald-tools"))
OUT = ROOT / "target" / "bench"
# Where cargo puts the project's binaries: the user's CARGO_TARGET_DIR if
# set, as `cargo build` itself would.
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
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


def wait_for(condition, what, deadline_s, every_s=0.2):
    """Polls `condition` until it returns something true (returned), or the
    bench stops naming `what` after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            sys.exit(f"bench: {what} not within {deadline_s} s")
        time.sleep(every_s)


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


def nats_counters(mon_port):
    """What nats-server has handled so far: messages in and out (every
    publish, ack, pull request and API call is one in), and JetStream API
    requests (stream, consumer and bucket calls; the server does not count
    pull requests among them)."""
    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{mon_port}/{path}", timeout=10) as answer:
            return json.load(answer)
    varz, jsz = get("varz"), get("jsz")
    return {"in_msgs": varz["in_msgs"], "out_msgs": varz["out_msgs"], "js_api": jsz["api"]["total"]}


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


def write_endpoint_docs(path, docs):
    """Writes WebhookEndpoint documents (from `endpoint_doc`) to one YAML
    file as they come, so a million of them are never all in memory."""
    with open(path, "w") as out:
        for doc in docs:
            out.write("---\n")
            out.write(doc)


def load_endpoints(herald, store, url, docs):
    """Writes the endpoints into NATS with `herald endpoints`; returns the
    environment every Herald process of the run needs."""
    endpoints = store / "endpoints.yaml"
    endpoints.write_text("---\n".join(docs))
    env = herald_env(herald, url)
    write_endpoints(herald, env, endpoints)
    return env


def herald_env(herald, url):
    """The environment of every Herald process of a run against `url`,
    with a new key: endpoint records are sealed, and every role that reads
    or writes them needs the same one."""
    key = subprocess.run(
        [str(herald), "secrets", "new-key", "--id", "bench"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return {
        "HERALD_LOG__FILTER": "warn",
        "HERALD_NATS__URL": url,
        # The receivers are on loopback, which the SSRF guard refuses
        # unless the allow-list opens it.
        "HERALD_WEBHOOKS__SSRF__ALLOW": '["127.0.0.0/8"]',
        "HERALD_SECRETS__KEY": key,
    }


def write_endpoints(herald, env, path):
    """`herald endpoints <path>` into the run's NATS."""
    run = subprocess.run([str(herald), "endpoints", str(path)], env={**os.environ, **env}, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bench: herald endpoints failed ({run.returncode}):\n{run.stderr[-3000:]}")


def build_own():
    """herald and herald-bench, release, from this workspace: all a clone needs."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "herald", "-p", "herald-bench"], cwd=ROOT, check=True)
    return TARGET / "release" / "herald", TARGET / "release" / "herald-bench"


def build_shared():
    """The independent harness's binaries, or None when it is not there."""
    manifests = [SHARED / "e2e" / "Cargo.toml", SHARED / "jetstream-bound" / "Cargo.toml"]
    if not all(m.exists() for m in manifests):
        print(f"bench: no independent harness at {SHARED}: cross-check skipped, the project's own driver and baseline only")
        return None
    for manifest in manifests:
        build(manifest, TOOLS / "bench-target")
    release = TOOLS / "bench-target" / "release"
    return {"e2e": release / "e2e-bench", "jetstream-bound": release / "jetstream-bound"}


def run_json(args):
    """Runs a measuring program; its last JSON line, or the bench stops with
    its error output."""
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bench: {Path(str(args[0])).name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return last_json(run.stdout)


def own_load(driver, api_port, receiver_port, tasks, concurrency, rate=None, users=USERS, first_user=1):
    """`herald-bench load`: its JSON result (see crates/herald-bench/src/tally.rs)."""
    args = [
        driver, "load", "--url", f"http://127.0.0.1:{api_port}/users/{{user}}/tasks/{{type}}",
        "-n", tasks, "-c", concurrency, "-u", users, "--first-user", first_user, "--type", "echo",
        "--listen", f"127.0.0.1:{receiver_port}", "--timeout-s", 300,
    ]
    if rate is not None:
        args += ["--rate", rate]
    return run_json(args)


def own_figures(r):
    """The figures compared across drivers, from a `herald-bench load` result."""
    latency = r.get("accept_to_webhook_ms") or {}
    return {
        "ingest_per_s": r["ingest_per_s"],
        "deliveries_per_s": r["deliveries_per_s"],
        "span_s": r["span_s"],
        "p50": latency.get("p50", float("inf")),
        "p99": latency.get("p99", float("inf")),
        # Non-201, no answer, 201 without an id, and never sent (past the deadline).
        "refused": r["sent"] - r["accepted"] + r["unsent"],
        "missing": r["missing"],
        "duplicates": r["duplicates"],
        "strays": r["strays"] + r["unreadable"],
        "late_sends": r["late_sends"],
    }


def shared_figures(r):
    """The same figures from the independent e2e driver's result."""
    return {
        "ingest_per_s": r["ingest_tasks_per_s"],
        "deliveries_per_s": r["e2e_deliveries_per_s"],
        "span_s": r["e2e_s"],
        "p50": r["latency_ms"]["p50"],
        "p99": r["latency_ms"]["p99"],
        "refused": r["sent"] - r["accepted"],
        "missing": r["missing"],
        "duplicates": r["duplicates"],
        "strays": r["strays"],
        "late_sends": r.get("late_sends", 0),
    }


def report_targets(name, rows):
    """Prints the target rows, writes them to target/bench/targets-<name>.json
    for `make bench`'s last line, and returns the names of those missed."""
    print()
    print("targets")
    for r in rows:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'}  {r['row']:52s} {r['value']:>14s}   target {r['target']}")
    (OUT / f"targets-{name}.json").write_text(json.dumps(rows, indent=2))
    return [r["row"] for r in rows if not r["ok"]]


def target(row, value, goal, ok):
    return {"row": row, "value": value, "target": goal, "ok": bool(ok)}


def prepare(name):
    """The start of every bench script: target/bench/ without a stale
    targets-<name>.json (it would report a previous run's targets if this
    one stops), nats-server from `make tools`, and herald and herald-bench
    built; returns their paths."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"targets-{name}.json").unlink(missing_ok=True)
    nats_bin = TOOLS / "bin" / "nats-server"
    if not nats_bin.exists():
        sys.exit(f"bench: {nats_bin} missing: run `make tools`")
    print("bench: building herald and herald-bench (release)")
    herald, driver = build_own()
    return nats_bin, herald, driver


def main():
    nats_bin, herald, driver = prepare("bench")
    shared = build_shared()

    store = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    nats_port, mon_port, api_port, receiver_port = free_port(), free_port(), free_port(), free_port()
    processes = Processes()
    spawn = processes.spawn

    results = {}
    try:
        nats = spawn([str(nats_bin), "-a", "127.0.0.1", "-p", str(nats_port), "-m", str(mon_port), "-js", "-sd", str(store)], name="nats")
        wait_port(nats_port)
        url = f"nats://127.0.0.1:{nats_port}"

        docs = [
            endpoint_doc(f"user-{u}", u, f"http://127.0.0.1:{receiver_port}/webhooks/{u}", f", email: 'user{u}@example.com'")
            for u in range(1, USERS + 1)
        ]
        env = load_endpoints(herald, store, url, docs)
        api, tasks, hooks = start_herald(spawn, herald, api_port, env)
        # No wait for the workers: tasks posted before they have loaded the
        # endpoints simply wait in HERALD_TASKS.

        shared_args = [
            "--url", f"http://127.0.0.1:{api_port}/users/{{user}}/tasks/{{type}}", "-u", str(USERS), "--types", "echo",
            "--port", str(receiver_port), "--correlate", r'"task_id":"([A-Za-z0-9:_-]+)"', "--timeout-s", "300",
        ]
        # Where the two cores go during a closed loop: CPU seconds of each
        # process (the load driver, which also runs the receiver, counted as
        # a finished child).
        measured = {"nats-server": nats, "api": api, "worker-tasks": tasks, "worker-webhooks": hooks}

        def with_cpu(run):
            nats_before = nats_counters(mon_port)
            before = {name: cpu_seconds(p.pid) for name, p in measured.items()}
            driver_before = children_cpu_seconds()
            started = time.monotonic()
            result = run()
            cpu = {name: cpu_seconds(p.pid) - before[name] for name, p in measured.items()}
            cpu["load driver + receiver"] = children_cpu_seconds() - driver_before
            nats_after = nats_counters(mon_port)
            result["nats_per_delivery"] = {
                k: (nats_after[k] - nats_before[k]) / max(result.get("delivered") or result.get("e2e_delivered") or TASKS, 1)
                for k in nats_after
            }
            return result, {"wall": time.monotonic() - started, **cpu}

        # Unmeasured: the workers load the endpoints and open their
        # connections, so neither driver's first run pays for the start.
        print("bench: warm-up, 500 tasks (not measured)")
        own_load(driver, api_port, receiver_port, 500, 50)
        print(f"bench: closed loop, {TASKS} tasks, 50 in flight (herald-bench load)")
        results["closed"], results["closed_cpu_seconds"] = with_cpu(lambda: own_load(driver, api_port, receiver_port, TASKS, 50))
        if shared:
            print(f"bench: closed loop, {TASKS} tasks, 50 in flight (cross-check: shared e2e)")
            results["shared_closed"], results["shared_closed_cpu_seconds"] = with_cpu(
                lambda: run_json([shared["e2e"], "run", "-n", TASKS, "-c", 50, *shared_args])
            )
        print(f"bench: open loop, {RATE} tasks/s for {TASKS // RATE}s (herald-bench load)")
        results["open"] = own_load(driver, api_port, receiver_port, TASKS, 200, rate=RATE)
        if shared:
            print(f"bench: open loop, {RATE} tasks/s for {TASKS // RATE}s (cross-check: shared e2e)")
            results["shared_open"] = run_json([shared["e2e"], "run", "-n", TASKS, "--rate", RATE, "-c", 200, *shared_args])
        results["rss_mib"] = {"api": rss_mib(api.pid), "worker-tasks": rss_mib(tasks.pid), "worker-webhooks": rss_mib(hooks.pid)}
        stop(api, tasks, hooks)

        results["tracing"] = tracing_cost(driver, api_port, receiver_port, lambda extra: start_herald(spawn, herald, api_port, {**env, **extra}), spawn)

        print("bench: baseline, bare two-hop JetStream pipeline (herald-bench jetstream-bound)")
        results["baseline"] = run_json([driver, "jetstream-bound", "--url", url, "-n", 100000, "--window", 256, "--inflight", 256])
        if shared:
            print("bench: baseline, bare two-hop JetStream pipeline (cross-check: shared jetstream-bound)")
            results["shared_baseline"] = run_json([
                shared["jetstream-bound"], "--url", url, "--monitor", f"127.0.0.1:{mon_port}", "--server-pid", nats.pid,
                "pipeline", "-n", 100000, "-s", 1, "-i", 256, "--msg-id",
            ])
    finally:
        processes.end()
        shutil.rmtree(store, ignore_errors=True)

    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    missed = summarise(results, shared is not None)
    if missed:
        sys.exit("bench: target missed: " + ", ".join(missed))


def start_herald(spawn, herald, api_port, env):
    """Herald as three processes (api; worker tasks; worker webhooks,mail);
    returns them once the API listens."""
    api = spawn([str(herald), "api", "--listen", f"127.0.0.1:{api_port}"], env, name="api")
    tasks = spawn([str(herald), "worker", "tasks"], env, name="worker-tasks")
    hooks = spawn([str(herald), "worker", "webhooks,mail"], env, name="worker-webhooks")
    wait_port(api_port)
    return api, tasks, hooks


class Processes:
    """The processes a bench script starts, each writing its output to
    target/bench/<prefix><name>.log; `end` stops those still running."""

    def __init__(self, prefix=""):
        self.prefix = prefix
        self.started = []

    def spawn(self, args, env=None, name="", piped=False):
        """`piped`: stdin and stdout are pipes to this script (text), only
        stderr goes to the log."""
        log = open(OUT / f"{self.prefix}{name}.log", "w")
        streams = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True} if piped else {"stdout": log}
        p = subprocess.Popen([str(a) for a in args], env={**os.environ, **(env or {})}, stderr=log if piped else
                             subprocess.STDOUT, **streams)
        self.started.append(p)
        return p

    def end(self, grace_s=0):
        """SIGTERM and up to `grace_s` to exit (0: SIGKILL at once), then SIGKILL."""
        running = [p for p in self.started if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM if grace_s else signal.SIGKILL)
        for p in running:
            try:
                p.wait(timeout=grace_s or None)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def stop(*procs):
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


# The collector's configuration, shared with the tests' Jaeger harness.
JAEGER_CONFIG = ROOT / "crates" / "herald-testkit" / "src" / "jaeger.yaml"


def jaeger_config(ports):
    text = JAEGER_CONFIG.read_text()
    for name, port in ports.items():
        text = text.replace("{" + name + "}", str(port))
    return text


def tracing_cost(driver, api_port, receiver_port, start, spawn):
    """Closed loops with tracing off, on (every trace kept, exported over
    OTLP/gRPC to a Jaeger on this machine) and on with 10% of the traces
    kept, in turn, each on freshly started processes after a warm-up:
    deliveries/s of each as a ratio of off. The collector shares the two
    cores, so its own work is in the cost too."""
    jaeger_bin = TOOLS / "bin" / "jaeger"
    if not jaeger_bin.exists():
        sys.exit(f"bench: {jaeger_bin} missing: run `make tools`")
    ports = {k: free_port() for k in ("otlp_grpc", "otlp_http", "query_http", "query_grpc", "health")}
    config = OUT / "jaeger.yaml"
    config.write_text(jaeger_config(ports))
    jaeger = spawn([str(jaeger_bin), f"--config={config}"], name="jaeger")
    wait_port(ports["otlp_grpc"], deadline=60)
    wait_port(ports["query_http"], deadline=60)
    traced = {
        "HERALD_TRACING__OTLP_ENDPOINT": f"http://127.0.0.1:{ports['otlp_grpc']}",
        "HERALD_TRACING__PROTOCOL": "grpc",
        "HERALD_TRACING__SERVICE_NAME": "herald-bench",
    }
    tasks = max(TASKS // 2, 1000)
    # "sampled": new traces kept at 10% (tracing.sample_ratio), the setting
    # for a busy installation.
    modes = {"off": {}, "on": traced, "sampled": {**traced, "HERALD_TRACING__SAMPLE_RATIO": "0.1"}}
    runs = {mode: [] for mode in modes}
    # CPU per delivery of Herald's three processes, and of the collector.
    herald_cpu = {mode: 0.0 for mode in modes}
    jaeger_cpu = 0.0
    faults = {"refused": 0, "missing": 0, "duplicates": 0, "strays": 0}
    for mode in ("off", "on", "sampled") * 2:
        print(f"bench: tracing {mode}, closed loop, {tasks} tasks, 50 in flight (fresh processes, after a warm-up)")
        procs = start(modes[mode])
        own_load(driver, api_port, receiver_port, 500, 50)
        herald_before = sum(cpu_seconds(p.pid) for p in procs)
        jaeger_before = cpu_seconds(jaeger.pid)
        result = own_load(driver, api_port, receiver_port, tasks, 50)
        herald_cpu[mode] += (sum(cpu_seconds(p.pid) for p in procs) - herald_before) / max(result["delivered"], 1)
        if mode == "on":
            jaeger_cpu += (cpu_seconds(jaeger.pid) - jaeger_before) / max(result["delivered"], 1)
        figures = own_figures(result)
        runs[mode].append(figures["deliveries_per_s"])
        for k in faults:
            faults[k] += figures[k]
        stop(*procs)
    # Proof the spans went somewhere: the traced runs' traces are in Jaeger.
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['query_http']}/api/traces?service=herald-bench&limit=5&lookback=1h", timeout=30) as answer:
        exported = len(json.load(answer).get("data") or [])
    jaeger.send_signal(signal.SIGTERM)
    jaeger.wait(timeout=30)
    return {"tasks_per_run": tasks, **runs, "traces_found": exported,
            "ratio": sum(runs["on"]) / sum(runs["off"]),
            "sampled_ratio": sum(runs["sampled"]) / sum(runs["off"]), "faults": faults,
            "herald_cpu_us_per_delivery": {m: 1e6 * v / len(runs[m]) for m, v in herald_cpu.items()},
            "jaeger_cpu_us_per_delivery": 1e6 * jaeger_cpu / len(runs["on"])}


def summarise(results, cross_check):
    """Prints every figure (the cross-check's in a second column) and the
    target rows; returns the targets missed."""
    c, o = own_figures(results["closed"]), own_figures(results["open"])
    base = results["baseline"]["msgs_per_s"]
    ratio = c["deliveries_per_s"] / base
    columns = [("herald-bench", c, o, base)]
    if cross_check:
        columns.append((
            "shared e2e", shared_figures(results["shared_closed"]), shared_figures(results["shared_open"]),
            results["shared_baseline"]["msgs_per_s"],
        ))

    def line(label, cell):
        print(f"  {label:34s}" + "".join(f"{cell(*col[1:]):>18s}" for col in columns))

    print()
    print(f"{'':36s}" + "".join(f"{col[0]:>18s}" for col in columns))
    print(f"closed loop ({TASKS} tasks, 50 in flight)")
    line("ingest tasks/s", lambda c, o, b: f"{c['ingest_per_s']:.0f}")
    line("deliveries/s", lambda c, o, b: f"{c['deliveries_per_s']:.0f}")
    line("ratio to bare two-hop JetStream", lambda c, o, b: f"{c['deliveries_per_s'] / b:.3f}")
    line("accept -> webhook p50 / p99 ms", lambda c, o, b: f"{c['p50']:.1f} / {c['p99']:.1f}")
    line("refused / missing / duplicates", lambda c, o, b: f"{c['refused']} / {c['missing']} / {c['duplicates']}")
    print(f"open loop ({RATE} tasks/s)")
    line("deliveries/s", lambda c, o, b: f"{o['deliveries_per_s']:.0f}")
    line("accept -> webhook p50 / p99 ms", lambda c, o, b: f"{o['p50']:.1f} / {o['p99']:.1f}")
    line("late sends", lambda c, o, b: f"{o['late_sends']}")
    line("refused / missing / duplicates", lambda c, o, b: f"{o['refused']} / {o['missing']} / {o['duplicates']}")
    print("baseline (same nats-server, same session)")
    line("bare two-hop JetStream msgs/s", lambda c, o, b: f"{b:.0f}")
    if cross_check:
        print("  (each column's ratio is to its own baseline: the two drivers and the two baselines cross-check each other)")

    cpu = dict(results["closed_cpu_seconds"])
    cpu.pop("wall")
    # The driver's run also includes its start-up and a grace period after
    # the last webhook; the busy cores are reckoned over the measured span.
    span = c["span_s"]
    delivered = results["closed"]["delivered"] or 1
    print(f"CPU in the closed loop (herald-bench; {sum(cpu.values()) / span:.2f} cores busy over the {span:.1f} s from first POST to last webhook):")
    for name, seconds in cpu.items():
        print(f"  {name:24s} {seconds:6.2f} s  {100 * seconds / sum(cpu.values()):4.0f}%  {seconds / delivered * 1e6:5.0f} us/delivery")
    if cross_check:
        other = results["shared_closed_cpu_seconds"]["load driver + receiver"]
        print(f"  (the shared e2e driver used {other:.2f} s in its closed loop: {other / TASKS * 1e6:.0f} us/delivery)")
    per = results["closed"]["nats_per_delivery"]
    print(f"nats-server per delivery in the closed loop (herald-bench): {per['in_msgs']:.1f} messages in, "
          f"{per['out_msgs']:.1f} out, {per['js_api']:.2f} JetStream API requests (pulls not counted)")
    tracing = results["tracing"]
    print(f"tracing ({tracing['tasks_per_run']} tasks per run, off and on alternating, every trace exported to Jaeger over OTLP/gRPC):")
    print("  deliveries/s off   " + ", ".join(f"{d:.0f}" for d in tracing["off"]))
    print("  deliveries/s on    " + ", ".join(f"{d:.0f}" for d in tracing["on"]))
    print("  on, 10% sampled    " + ", ".join(f"{d:.0f}" for d in tracing["sampled"]))
    print(f"  on / off           {tracing['ratio']:.3f}   (traces found in Jaeger: {tracing['traces_found']})")
    print(f"  10% sampled / off  {tracing['sampled_ratio']:.3f}")
    cpu_of = tracing["herald_cpu_us_per_delivery"]
    print(f"  Herald CPU per delivery off / on / 10% sampled: {cpu_of['off']:.0f} / {cpu_of['on']:.0f} / {cpu_of['sampled']:.0f} us; "
          f"the collector on the same cores: {tracing['jaeger_cpu_us_per_delivery']:.0f} us")
    rss = results["rss_mib"]
    print("peak RSS (MiB)     " + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()))
    print(f"results: {OUT / 'results.json'}")

    # The tracing runs deliver too: nothing of theirs may go missing either.
    faults = {k: c[k] + o[k] + results["tracing"]["faults"][k] for k in ("refused", "missing", "duplicates", "strays")}
    rows = [
        target("deliveries/s / bare two-hop JetStream (issue 13)", f"{ratio:.3f}", ">= 0.35", ratio >= 0.35),
        target(f"p99 accept -> webhook at {RATE} tasks/s", f"{o['p99']:.1f} ms", "< 100 ms", o["p99"] < 100),
        target("tasks not accepted (non-201, no answer, unsent)", str(faults["refused"]), "0", faults["refused"] == 0),
        target("webhooks missing", str(faults["missing"]), "0", faults["missing"] == 0),
        target("webhooks duplicated", str(faults["duplicates"]), "0", faults["duplicates"] == 0),
        target("webhooks for no accepted task", str(faults["strays"]), "0", faults["strays"] == 0),
        *[target(f"peak RSS, {role}", f"{mib:.1f} MiB", "< 50 MiB", mib < 50) for role, mib in rss.items()],
        target("deliveries/s tracing on / off (issue 12)", f"{tracing['ratio']:.3f}", ">= 0.9",
               tracing["ratio"] >= 0.9 and tracing["traces_found"] > 0),
        target("deliveries/s tracing 10% sampled / off", f"{tracing['sampled_ratio']:.3f}", ">= 0.9",
               tracing["sampled_ratio"] >= 0.9),
    ]
    return report_targets("bench", rows)


if __name__ == "__main__":
    main()
