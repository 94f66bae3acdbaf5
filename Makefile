# The two commands of the README: `make dev` runs Herald, `make test` runs
# every test. Both install what they need first.
SHELL := /bin/bash
export HERALD_TOOLS ?= $(HOME)/.cache/herald-tools

.PHONY: tools control-plane images dev test lint bench soak

## tools: pinned nats-server, mailpit, the Standard Webhooks verifier, schemathesis,
## cargo-deny, promtool and Jaeger (the trace collector), into $(HERALD_TOOLS)
tools:
	scripts/install-tools.sh

## control-plane: etcd, kube-apiserver, kubectl, helm and a node (controller-manager,
## scheduler, kubelet, kube-proxy, CoreDNS; containerd from Debian) built from
## pinned Go modules, for the Kubernetes tests (about 30 minutes the first time;
## docs/kubernetes-node.md)
control-plane:
	scripts/install-control-plane.sh

## images: containerd and runc (apt), then the OCI archives of the Herald,
## nats-server, mailpit and test receiver images, into ~/.cache/herald-images
## (scripts/build-images.sh; no container engine, cached by content)
images: tools
	scripts/install-containerd.sh
	scripts/build-images.sh

## dev: mailpit, the demo receiver and `herald dev` on 127.0.0.1 (Ctrl-C stops them)
dev: tools
	scripts/dev.sh

## test: formatting, clippy, the Helm chart's checks, then every test against
## real servers (NATS, SMTP, receivers, a Kubernetes API server)
test: tools control-plane images lint
	cargo test --workspace --locked

## lint: formatting, clippy, the Helm chart's checks, and cargo-deny on the
## dependency tree (licenses, bans, sources; offline: see deny.toml)
lint: tools control-plane
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	scripts/check-chart.sh
# cargo-deny reads every platform's dependencies from the local cache
# (--offline: it must never fetch its advisory database, see deny.toml).
	cargo fetch --locked
	$(HERALD_TOOLS)/bin/cargo-deny --offline --locked check licenses bans sources

## bench: the whole pipeline under load, then isolation between endpoints and
## shared rate limits, then 10 to 1,000,000 endpoints, then a node of a
## three-server JetStream cluster killed mid-run, then the operator on 10,000
## WebhookEndpoints in a real API server (docs/benchmarks.md);
## every run happens, then it fails naming each target missed
bench: tools control-plane
	@status=0; \
	python3 scripts/bench.py || status=1; \
	python3 scripts/bench_isolation.py || status=1; \
	python3 scripts/bench_endpoints.py || status=1; \
	python3 scripts/bench_cluster.py || status=1; \
	python3 scripts/bench_operator.py || status=1; \
	python3 scripts/bench_targets.py || status=1; \
	exit $$status

## soak: a few minutes of hostile and normal traffic with workers killed;
## fails on any 5xx and on any accepted task lost, altered or stuck
soak: tools
	python3 scripts/soak.py
