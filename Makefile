# The two commands of the README: `make dev` runs Herald, `make test` runs
# every test. Both install what they need first (`make tools`).
SHELL := /bin/bash
export HERALD_TOOLS ?= $(HOME)/.cache/herald-tools

.PHONY: tools dev test lint unit bench

## tools: pinned nats-server, mailpit and the Standard Webhooks verifier, into $(HERALD_TOOLS)
tools:
	scripts/install-tools.sh

## dev: mailpit, the demo receiver and `herald dev` on 127.0.0.1 (Ctrl-C stops them)
dev: tools
	scripts/dev.sh

## test: formatting, clippy, then every test against real servers
test: tools lint
	cargo test --workspace --locked

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## bench: the whole pipeline under load (docs/benchmarks.md)
bench: tools
	python3 scripts/bench.py
