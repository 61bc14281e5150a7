#!/usr/bin/env bash
# Starts a complete local trust domain and shows an SVID fetched through the
# SPIFFE Workload API:
#   - sigil-server for trust domain example.org, with its embedded store;
#   - one sigil-agent, attested with a join token generated for it;
#   - a registration entry for the invoking user's uid;
#   - `sigil-agent api fetch x509`, as a workload of that user.
# Then it keeps running until Ctrl-C, printing how to point a SPIFFE client at
# it. With --once it stops after showing the SVID.
#
# Environment: SIGIL_BIN_DIR (use these binaries instead of building release
# ones), SIGIL_QUICKSTART_DIR (working directory; default: a new temporary one).
set -euo pipefail

once=false
[[ "${1:-}" == "--once" ]] && once=true

root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${SIGIL_BIN_DIR:-}" ]]; then
    echo "==> building sigil-server and sigil-agent (release)"
    cargo build --release --locked --manifest-path "$root/Cargo.toml" -p sigil-server -p sigil-agent
    bin="$root/target/release"
else
    bin="$SIGIL_BIN_DIR"
fi
work="${SIGIL_QUICKSTART_DIR:-$(mktemp -d /tmp/sigil-quickstart.XXXXXX)}"
mkdir -p "$work"
chmod 755 "$work"

td=example.org
admin="$work/server-admin.sock"
socket="$work/agent/api.sock"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # file, pid, what
    for _ in $(seq 1 600); do
        [[ -e "$1" ]] && return 0
        kill -0 "$2" 2>/dev/null || { echo "$3 exited; see its log in $work" >&2; exit 1; }
        sleep 0.05
    done
    echo "$3 not ready after 30 s; see its log in $work" >&2
    exit 1
}

echo "==> starting sigil-server for trust domain $td (data in $work/server)"
"$bin/sigil-server" run --trust-domain "$td" --bind-address 127.0.0.1:0 \
    --data-dir "$work/server" --admin-socket-path "$admin" 2>"$work/server.log" &
pids+=($!)
wait_for "$work/server/ready" "${pids[-1]}" sigil-server
address="$(cat "$work/server/agent-api.addr")"
echo "    agent API on $address, admin socket $admin"

agent_id="spiffe://$td/node/$(hostname -s 2>/dev/null || echo local)"
token="$("$bin/sigil-server" token generate --socket-path "$admin" --spiffe-id "$agent_id" | awk '/^Token:/ {print $2}')"
user_id="spiffe://$td/user/$(id -un)"
echo "==> registering $user_id for uid $(id -u), under the agent $agent_id"
"$bin/sigil-server" entry create --socket-path "$admin" \
    --spiffe-id "$user_id" --parent-id "$agent_id" --selector "unix:uid:$(id -u)" >/dev/null
"$bin/sigil-server" bundle show --socket-path "$admin" > "$work/bootstrap.pem"

echo "==> starting sigil-agent (attests with a one-time join token)"
"$bin/sigil-agent" run --trust-domain "$td" --server-address "$address" \
    --trust-bundle-path "$work/bootstrap.pem" --join-token "$token" \
    --data-dir "$work/agent/data" --socket-path "$socket" 2>"$work/agent.log" &
pids+=($!)
wait_for "$work/agent/data/ready" "${pids[-1]}" sigil-agent

echo "==> fetching an X.509-SVID through the Workload API, as $(id -un)"
"$bin/sigil-agent" api fetch x509 --socket-path "$socket" --write "$work/svid"
echo
echo "==> the SVID, checked by openssl against the trust bundle"
openssl verify -x509_strict -CAfile "$work/svid/bundle.0.pem" "$work/svid/svid.0.pem"
openssl x509 -in "$work/svid/svid.0.pem" -noout -ext subjectAltName

if $once; then
    exit 0
fi
echo
echo "The trust domain keeps running. Point any SPIFFE client at it:"
echo "    export SPIFFE_ENDPOINT_SOCKET=unix://$socket"
echo "Logs are in $work. Press Ctrl-C to stop."
wait
