#!/usr/bin/env bash
# `make dev`: Herald on this machine, as the README's walk-through uses it.
#
#   mailpit        SMTP on 127.0.0.1:1025, inbox at http://127.0.0.1:8025
#   herald receiver  the demo webhook receiver on 127.0.0.1:8080
#   herald dev     nats-server (127.0.0.1:4222, temporary store), the API on
#                  127.0.0.1:9000 and every worker, endpoints from
#                  examples/endpoints.yaml
#
# Ctrl-C stops all three. Tools come from scripts/install-tools.sh (make
# tools, which `make dev` runs first).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
# The signing secret of examples/endpoints.yaml's demo-signing-secret.
DEMO_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw

for port in 1025 8025 8080 9000 4222; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "make dev: port $port on 127.0.0.1 is in use; stop whatever holds it (another make dev?)" >&2
        exit 1
    fi
done

cargo build --bin herald
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
HERALD=$TARGET_DIR/debug/herald
STATE=$(mktemp -d -t herald-dev.XXXXXX)
children=()
cleanup() {
    trap - EXIT INT TERM HUP
    for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
    rm -rf "$STATE"
}
trap cleanup EXIT
# A closed terminal (SIGHUP) stops everything as Ctrl-C does.
trap 'exit 130' INT TERM HUP

"$TOOLS/bin/mailpit" --smtp 127.0.0.1:1025 --listen 127.0.0.1:8025 \
    --database "$STATE/mailpit.db" --disable-version-check --quiet &
children+=($!)
"$HERALD" receiver --port 8080 --secret "$DEMO_SECRET" &
RECEIVER_PID=$!
children+=($RECEIVER_PID)
HERALD_NATS_SERVER="$TOOLS/bin/nats-server" "$HERALD" dev \
    --endpoints examples/endpoints.yaml --store-dir "$STATE/jetstream" &
children+=($!)

cat <<BANNER
make dev: starting
  API        http://127.0.0.1:9000   curl -X POST localhost:9000/users/1/tasks/transcode -H 'content-type: application/json' -d '{"file":"movie.mp4"}'
  receiver   http://127.0.0.1:8080   (prints each webhook and whether its signature is valid)
  mail       http://127.0.0.1:8025   (mailpit: the failure emails; API at /api/v1/messages)
  To see retries and the failure email, stop only the receiver: kill $RECEIVER_PID
  Ctrl-C stops everything.
BANNER

# Runs until Ctrl-C, or until mailpit or herald dev stops (a failed start:
# its message is above). The receiver may be stopped alone, for the demo.
while kill -0 "${children[0]}" 2>/dev/null && kill -0 "${children[2]}" 2>/dev/null; do
    wait -n || true
done
