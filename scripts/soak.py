#!/usr/bin/env python3
"""`make soak`: hostile and normal traffic together, with workers killed.

Herald's promise under a few minutes of abuse: every task answered `201` is
delivered exactly as it was sent (or, for a failing endpoint, ends mailed to
its owner), every hostile request gets a 4xx that says why (never a 5xx),
and nothing is left stuck. The run:

- a nats-server (JetStream, file storage), mailpit, a loopback receiver
  (this script), the API, two task workers and two webhook+mail workers;
- for SOAK_SECONDS (default 180) several client threads post, SOAK_RATE
  (default 200) requests a second in all, a mix of
  normal tasks (JSON with unsorted keys, escapes, unicode and odd number
  spellings that must arrive byte-for-byte), tasks for a user whose
  endpoint always fails, and hostile requests (deep nesting, numbers out of
  range, lone surrogates, malformed JSON, oversized and wrongly typed
  bodies, bad users, bad idempotency keys);
- every SOAK_KILL_EVERY seconds (default 15) one worker process is killed
  with SIGKILL and started again;
- then every accepted task must reach its end: the receiver holds its exact
  bytes, or its state is `mailed` and the owner's mail is in mailpit.

Exits non-zero on any 5xx, any lost, altered or stuck task. Loopback only;
bounded in time and count.
"""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench import ROOT, TOOLS, build, endpoint_doc, free_port, load_endpoints, wait_port

OUT = ROOT / "target" / "soak"
SECONDS = int(os.environ.get("SOAK_SECONDS", "180"))
KILL_EVERY = float(os.environ.get("SOAK_KILL_EVERY", "15"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "6"))
# Requests per second from all clients together: a steady load the machine
# carries with room to spare, so a slow receiver is not what is measured.
RATE = float(os.environ.get("SOAK_RATE", "200"))
HEALTHY_USERS = ["u1", "u2", "u3", "u4"]
FAILING_USER = "f1"
SETTLE_SECONDS = 180


class Receiver:
    """Keeps every webhook body it is sent; the failing user's path answers 500."""

    def __init__(self):
        self.bodies = {}  # task id -> list of bodies
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path.startswith("/fail/"):
                    self.send_response(500)
                else:
                    task = json.loads(body)["data"]["task_id"]
                    with receiver.lock:
                        receiver.bodies.setdefault(task, []).append(body)
                    self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def random_scalar(rng):
    return rng.choice([
        '"plain"', '"quote \\" and backslash \\\\"', '"tab\\tnew\\nline"', '"\\u00e9t\\u00e9"',
        '"ünïcödé ✓"', '"\\ud83d\\ude00"', "1.50", "1e2", "-0", "0.1e-3", "12345678901234567890",
        "true", "false", "null", '""',
    ])


def random_document(rng, depth=0):
    """A JSON text whose exact bytes a re-serialising parser would change:
    keys out of order, escapes, number spellings, spacing."""
    if depth > 3 or rng.random() < 0.3:
        return random_scalar(rng)
    sep = rng.choice([",", ", ", " , "])
    if rng.random() < 0.5:
        keys = rng.sample(["zeta", "alpha", "mid", "b", "a", "Z", "_x"], rng.randint(1, 5))
        inner = sep.join(f'"{k}":{rng.choice(["", " "])}{random_document(rng, depth + 1)}' for k in keys)
        return "{" + inner + "}"
    return "[" + sep.join(random_document(rng, depth + 1) for _ in range(rng.randint(0, 4))) + "]"


# (name, path user, body, headers): every one must get a 4xx.
def hostile_requests():
    deep = "[" * 500 + "]" * 500
    return [
        ("deep nesting", "u1", deep.encode(), {}),
        ("number out of range", "u1", b'{"n":1e400}', {}),
        ("lone surrogate", "u1", b'{"s":"\\ud800"}', {}),
        ("malformed", "u1", b'{"a":', {}),
        ("trailing garbage", "u1", b'{"a":1} x', {}),
        ("oversized", "u1", b'"' + b"x" * (3 * 1024 * 1024) + b'"', {}),
        ("not json content type", "u1", b"{}", {"content-type": "text/plain"}),
        ("bad user", "bad%20user!", b"{}", {}),
        ("bad idempotency key", "u1", b"{}", {"idempotency-key": "\x01" * 10}),
        ("idempotency key too long", "u1", b"{}", {"idempotency-key": "k" * 300}),
    ]


class Traffic:
    def __init__(self, api_port):
        self.api_port = api_port
        self.accepted = {}  # task id -> (user, exact body)
        self.failing = set()
        self.hostile_answers = {}  # name -> set of statuses
        self.server_errors = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def post(self, user, body, headers):
        """One request on its own connection (a refused oversized body may
        close it); returns (status, answer), or (None, error) when the
        connection broke before an answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        try:
            conn.request("POST", f"/users/{user}/tasks/echo", body=body,
                         headers={"content-type": "application/json", **headers})
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as e:
            return None, str(e).encode()
        finally:
            conn.close()

    def task(self, rng, user, kind):
        """A task that must be accepted: posted with an Idempotency-Key, so a
        connection that breaks before the answer can be retried safely."""
        body = random_document(rng).encode()
        key = {"idempotency-key": f"soak-{rng.getrandbits(64):016x}"}
        status, answer = self.post(user, body, key)
        if status is None:
            status, answer = self.post(user, body, key)
        with self.lock:
            if status is None or status >= 500 or status != 201:
                self.server_errors.append(f"{kind} task: {status} {answer[:200]!r}")
                return
            task = json.loads(answer)["id"]
            self.accepted[task] = (user, body)
            if kind == "failing":
                self.failing.add(task)

    def client(self, seed):
        rng = random.Random(seed)
        hostile = hostile_requests()
        interval = CLIENTS / RATE
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            roll = rng.random()
            if roll < 0.7:
                self.task(rng, rng.choice(HEALTHY_USERS), "normal")
            elif roll < 0.75:
                self.task(rng, FAILING_USER, "failing")
            else:
                name, user, body, headers = rng.choice(hostile)
                status, answer = self.post(user, body, headers)
                with self.lock:
                    if status is not None and status >= 500:
                        self.server_errors.append(f"{name}: {status} {answer[:200]!r}")
                    # A connection closed before the answer is a refusal too
                    # (the server need not read an oversized body).
                    self.hostile_answers.setdefault(name, set()).add(status or 0)


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    nats_bin, mailpit_bin = TOOLS / "bin" / "nats-server", TOOLS / "bin" / "mailpit"
    for tool in (nats_bin, mailpit_bin):
        if not tool.exists():
            sys.exit(f"soak: {tool} missing: run `make tools`")
    print("soak: building herald (release)")
    build(ROOT / "Cargo.toml", ROOT / "target")
    herald = ROOT / "target" / "release" / "herald"

    store = Path(tempfile.mkdtemp(prefix="herald-soak-"))
    nats_port, api_port, smtp_port, mail_http = free_port(), free_port(), free_port(), free_port()
    procs = []

    def spawn(args, env=None, name=""):
        log = open(OUT / f"{name}.log", "a")
        p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    receiver = Receiver()
    failures = []
    try:
        spawn([str(nats_bin), "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(store / "js")], name="nats")
        spawn([str(mailpit_bin), "--smtp", f"127.0.0.1:{smtp_port}", "--listen", f"127.0.0.1:{mail_http}",
               "--database", str(store / "mailpit.db"), "--disable-version-check", "--quiet",
               # Keep every mail: each failing task's mail is counted.
               "--max", "0"], name="mailpit")
        wait_port(nats_port)
        wait_port(mail_http)
        url = f"nats://127.0.0.1:{nats_port}"
        base = f"http://127.0.0.1:{receiver.port}"
        # A request the receiver answers late is retried soon, not in five
        # minutes: every retry ends inside the settling time.
        quick = ", retry: {schedule: ['200ms', '1s', '2s', '5s', '10s', '20s']}"
        docs = [endpoint_doc(f"ep-{u}", u, f"{base}/ok/{u}", quick) for u in HEALTHY_USERS]
        docs.append(endpoint_doc("ep-failing", FAILING_USER, f"{base}/fail/{FAILING_USER}",
                                 ", email: 'owner@example.com', retry: {schedule: ['100ms', '200ms']}"))
        env = load_endpoints(herald, store, url, docs)
        env.update({
            "HERALD_MAIL__SMTP_PORT": str(smtp_port),
            # A short ack wait (and a request timeout below it) so a killed
            # worker's jobs come back quickly.
            "HERALD_TOPOLOGY__ACK_WAIT": "5s",
            "HERALD_WEBHOOKS__TIMEOUT": "3s",
        })
        spawn([str(herald), "api", "--listen", f"127.0.0.1:{api_port}"], env, name="api")
        workers = {
            f"tasks-{i}": (["worker", "tasks"], None) for i in range(2)
        } | {
            f"webhooks-{i}": (["worker", "webhooks,mail"], None) for i in range(2)
        }

        def start(name):
            args, _ = workers[name]
            workers[name] = (args, spawn([str(herald), *args], env, name=name))

        for name in workers:
            start(name)
        wait_port(api_port)

        traffic = Traffic(api_port)
        threads = [threading.Thread(target=traffic.client, args=(seed,)) for seed in range(CLIENTS)]
        for t in threads:
            t.start()
        print(f"soak: {SECONDS}s of mixed traffic from {CLIENTS} clients, a worker killed every {KILL_EVERY:.0f}s")
        rng = random.Random(7)
        kills = 0
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            time.sleep(min(KILL_EVERY, max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            name = rng.choice(sorted(workers))
            workers[name][1].send_signal(signal.SIGKILL)
            workers[name][1].wait()
            start(name)
            kills += 1
        traffic.stop.set()
        for t in threads:
            t.join()

        accepted = dict(traffic.accepted)
        healthy = {t: v for t, v in accepted.items() if t not in traffic.failing}
        print(f"soak: {len(accepted)} tasks accepted ({len(traffic.failing)} for the failing endpoint), "
              f"{sum(1 for _ in traffic.hostile_answers)} hostile kinds tried, {kills} workers killed; settling")

        def undelivered():
            with receiver.lock:
                return [t for t in healthy if t not in receiver.bodies]

        mailed = set()

        def unmailed():
            left = []
            for task in traffic.failing - mailed:
                state = get_json(f"http://127.0.0.1:{api_port}/users/{FAILING_USER}/tasks/{task}")["state"]
                if state == "mailed":
                    mailed.add(task)
                else:
                    left.append((task, state))
            return left

        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and (undelivered() or unmailed()):
            time.sleep(1)

        missing = undelivered()
        if missing:
            states = [
                (task, get_json(f"http://127.0.0.1:{api_port}/users/{healthy[task][0]}/tasks/{task}")["state"])
                for task in missing[:5]
            ]
            failures.append(f"{len(missing)} accepted tasks never delivered, e.g. {states}")
            task = missing[0]
            record = get_json(f"http://127.0.0.1:{api_port}/users/{healthy[task][0]}/tasks/{task}")
            (OUT / "undelivered.json").write_text(json.dumps(record, indent=2))
        stuck = unmailed()
        if stuck:
            failures.append(f"{len(stuck)} tasks for the failing endpoint did not end mailed, e.g. {stuck[:5]}")
        altered = 0
        with receiver.lock:
            for task, (_, body) in healthy.items():
                if any(body not in delivered for delivered in receiver.bodies.get(task, [])):
                    altered += 1
            duplicates = sum(len(b) - 1 for b in receiver.bodies.values())
        if altered:
            failures.append(f"{altered} tasks delivered with a body that is not the client's bytes")
        mails = get_json(f"http://127.0.0.1:{mail_http}/api/v1/messages?limit=1")["messages_count"]
        if mails < len(traffic.failing):
            failures.append(f"{mails} failure mails in mailpit for {len(traffic.failing)} mailed tasks")
        failures.extend(f"server error: {e}" for e in traffic.server_errors[:20])
        for kind, statuses in sorted(traffic.hostile_answers.items()):
            if not all(400 <= s < 500 or (s == 0 and kind == "oversized") for s in statuses):
                failures.append(f"hostile {kind!r} answered {sorted(statuses)}")

        print()
        print(f"accepted tasks         {len(accepted)} ({len(healthy)} healthy, {len(traffic.failing)} failing endpoint)")
        print(f"delivered exactly      {len(healthy) - len(missing) - altered} of {len(healthy)}")
        print(f"duplicates (same id)   {duplicates}")
        print(f"failing ended mailed   {len(traffic.failing) - len(stuck)} of {len(traffic.failing)}, {mails} mails")
        print(f"workers killed         {kills}")
        for kind, statuses in sorted(traffic.hostile_answers.items()):
            print(f"hostile {kind:24s} -> {sorted(statuses)}")
        print(f"server errors          {len(traffic.server_errors)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        receiver.server.shutdown()
        subprocess.run(["rm", "-rf", str(store)], check=False)

    if failures:
        print("\nsoak: FAILED")
        for f in failures:
            print(f"  - {f}")
        sys.exit(1)
    print("\nsoak: passed")


if __name__ == "__main__":
    main()
