#!/usr/bin/env python3
"""`make bench`, the operator at scale: 10,000 WebhookEndpoints in a real
kube-apiserver (with etcd), reconciled by `herald operator` into NATS.

1. nats-server (JetStream) and the tests' control plane
   (`herald-test-control-plane`: etcd and kube-apiserver on loopback, from
   `make control-plane`); the WebhookEndpoint CRD; namespace `default`
   granted every user (its `herald.dev/users` annotation).
2. `kubectl create` of 10,000 WebhookEndpoints, one user each, no signing
   secret given: the API server's own write rate, the reference the
   operator's is read against.
3. `herald operator` started on them, as on a cluster it first meets: it
   generates a signing Secret per endpoint, writes each record into
   `herald-endpoints`, and reports Ready in each status.
4. Measured: records written per second (from the operator's start until
   the bucket holds all of them), the time until every resource's status
   says Ready, and the operator's peak RSS.

Target (issue 13): the operator writes >= 5,000 endpoints/s. The time to
reconcile them all is reported (the issue asks for it measured). Rows go
to target/bench/targets-operator.json. Loopback only; bounded in count
and time.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    OUT, ROOT, TARGET, TOOLS, Processes, cpu_seconds, endpoint_doc, free_port, herald_env, prepare, report_targets,
    rss_mib, stop, target, wait_for, wait_port, write_endpoint_docs,
)

COUNT = int(os.environ.get("BENCH_OPERATOR_ENDPOINTS", "10000"))
DEADLINE_S = 900
BUCKET_STREAM = "KV_herald-endpoints"


def records(mon_port):
    """Endpoint records in the bucket now (one subject per endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mon_port}/jsz?streams=true", timeout=10) as answer:
        jsz = json.load(answer)
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] == BUCKET_STREAM:
                return stream["state"].get("num_subjects", 0)
    return 0


def reconciles(port):
    """herald_operator_reconciles_total of the operator whose /metrics is on `port`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("herald_operator_reconciles_total "):
            return float(line.split()[1])
    return 0


def children(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def process_name(pid):
    return Path(f"/proc/{pid}/comm").read_text().strip()


def main():
    nats_bin, herald, _ = prepare("operator")
    print("bench: building herald-test-control-plane (release)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "herald-testkit", "--bin", "herald-test-control-plane"],
                   cwd=ROOT, check=True)
    kubectl_bin = TOOLS / "bin" / "kubectl"
    if not kubectl_bin.exists():
        sys.exit(f"bench: {kubectl_bin} missing: run `make control-plane`")

    store = Path(tempfile.mkdtemp(prefix="herald-bench-operator-"))
    processes = Processes("operator-")
    results = {"endpoints": COUNT}
    try:
        nats_port, mon_port = free_port(), free_port()
        nats = processes.spawn([nats_bin, "-a", "127.0.0.1", "-p", nats_port, "-m", mon_port, "-js",
                                "-sd", store / "nats"], name="nats")
        wait_port(nats_port)

        # It prints where it is on stdout, and stops at SIGTERM.
        plane = processes.spawn([TARGET / "release" / "herald-test-control-plane"], name="control-plane", piped=True)
        started = plane.stdout.readline()
        if not started:
            sys.exit(f"bench: the control plane did not start; see {OUT / 'operator-control-plane.log'}")
        kubeconfig = json.loads(started)["kubeconfig"]

        def kubectl(*args):
            run = subprocess.run([str(kubectl_bin), "--kubeconfig", kubeconfig, *args], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"bench: kubectl {' '.join(args[:3])} failed:\n{run.stderr[-3000:]}")
            return run.stdout

        kubectl("apply", "-f", str(ROOT / "crds" / "webhookendpoints.herald.dev.yaml"))
        kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/webhookendpoints.herald.dev")
        kubectl("annotate", "--overwrite", "namespace", "default", "herald.dev/users=*")

        print(f"bench: kubectl create of {COUNT} WebhookEndpoints")
        path = store / "endpoints.yaml"
        write_endpoint_docs(path, (endpoint_doc(f"e{u}", f"u{u}", f"https://hooks.example.com/u{u}")
                                   for u in range(1, COUNT + 1)))
        created = time.monotonic()
        kubectl("create", "-f", str(path), "-o", "name")
        results["kubectl_create_per_s"] = COUNT / (time.monotonic() - created)

        env = {
            **herald_env(herald, f"nats://127.0.0.1:{nats_port}"),
            "KUBECONFIG": kubeconfig,
            "HERALD_OPERATOR__LEASE_NAMESPACE": "default",
        }

        def start_operator(name):
            port = free_port()
            operator = processes.spawn([herald, "operator"],
                                       {**env, "POD_NAME": f"operator-{name}", "HERALD_HEALTH__LISTEN": f"127.0.0.1:{port}"},
                                       name)
            return operator, port

        # Where the CPU goes while the operator reconciles: the operator,
        # and the control plane's two servers.
        measured = {process_name(pid): pid for pid in children(plane.pid)}
        measured["nats-server"] = nats.pid
        cpu_before = {name: cpu_seconds(pid) for name, pid in measured.items()}
        print("bench: herald operator started on them")
        began = time.monotonic()
        operator, _ = start_operator("first")
        measured["operator"] = operator.pid
        cpu_before["operator"] = 0.0
        wait_for(lambda: records(mon_port) > 0, "a first endpoint record", DEADLINE_S)
        first = time.monotonic()
        wait_for(lambda: records(mon_port) >= COUNT, f"{COUNT} endpoint records", DEADLINE_S)
        written = time.monotonic()
        results["first_record_s"] = first - began
        results["records_s"] = written - began
        results["records_per_s"] = COUNT / (written - first)

        def all_ready():
            items = json.loads(kubectl("get", "webhookendpoints", "-n", "default", "-o", "json"))["items"]
            ready = sum(
                1 for item in items
                if any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in (item.get("status") or {}).get("conditions", []))
            )
            return ready >= COUNT
        wait_for(all_ready, f"{COUNT} WebhookEndpoints Ready", DEADLINE_S, every_s=2)
        results["ready_s"] = time.monotonic() - began
        results["cpu_seconds"] = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in measured.items()}
        results["operator_rss_mib"] = rss_mib(operator.pid)

        # A restart (a new leader, an upgrade): every resource is reconciled
        # again, with its Secret, finalizer and record already there.
        stop(operator)
        print("bench: a second operator started on the reconciled resources")
        began = time.monotonic()
        operator, metrics_port = start_operator("restarted")
        wait_for(lambda: reconciles(metrics_port) >= COUNT, f"{COUNT} reconciles after the restart", DEADLINE_S,
                 every_s=0.5)
        results["restart_s"] = time.monotonic() - began
        results["restart_rss_mib"] = rss_mib(operator.pid)
    finally:
        processes.end(grace_s=30)
        shutil.rmtree(store, ignore_errors=True)

    (OUT / "results-operator.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"operator at scale ({COUNT} WebhookEndpoints, one user each, signing secrets generated)")
    print(f"  kubectl create            {results['kubectl_create_per_s']:>8.0f} resources/s (the API server's own rate)")
    print(f"  first record              {results['first_record_s']:>8.1f} s after the operator started (leader election, list)")
    print(f"  all records in NATS       {results['records_s']:>8.1f} s after it started: {results['records_per_s']:.0f} records/s")
    print(f"  all Ready in status       {results['ready_s']:>8.1f} s after it started")
    print(f"  operator RSS              {results['operator_rss_mib']:>8.1f} MiB")
    print("  CPU seconds until all Ready: " + ", ".join(f"{n} {s:.0f}" for n, s in results["cpu_seconds"].items()))
    print(f"  restarted operator        {results['restart_s']:>8.1f} s to reconcile all {COUNT} again "
          f"({COUNT / results['restart_s']:.0f}/s, lease handover included), RSS {results['restart_rss_mib']:.1f} MiB")
    missed = report_targets("operator", [
        target("operator, records written/s", f"{results['records_per_s']:.0f}", ">= 5000",
               results["records_per_s"] >= 5000),
    ])
    if missed:
        sys.exit("bench: target missed: " + ", ".join(missed))


if __name__ == "__main__":
    main()
