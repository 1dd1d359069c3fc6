#!/usr/bin/env bash
# `make demo`: six agents in three regions on loopback, each fronting a small HTTP app.
# Shows the cluster converging, `agent status`, where sessions route from each region, and the
# cluster routing around an instance whose health check starts failing. Everything it starts is
# stopped on exit. It drives the `agent` binary exactly as a user would.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p grapevine-agent --bin agent
AGENT="$PWD/target/debug/agent"
WORK=$(mktemp -d /tmp/grapevine-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
admin() { echo "127.0.0.1:$((17070 + $1))"; }

"$AGENT" keygen > "$WORK/cluster.key"
NODES=(east-1 east-2 west-1 west-2 eu-1 eu-2)
REGIONS=(us-east us-east us-west us-west eu-central eu-central)
ZONES=(us-east-1a us-east-1b us-west-2a us-west-2b eu-central-1a eu-central-1b)

say "starting 6 agents in 3 regions, each fronting one instance of the 'profile' app"
for i in "${!NODES[@]}"; do
  n=$((i + 1)); node=${NODES[$i]}; app_port=$((18080 + n))
  python3 scripts/demo_backend.py "$node" "$app_port" "$WORK/$node.down" &
  PIDS+=($!)
  join=(); [ "$n" -gt 1 ] && join=(--join 127.0.0.1:17941)
  "$AGENT" run --node-id "$node" --region "${REGIONS[$i]}" --zone "${ZONES[$i]}" \
    --cluster demo --cluster-key-file "$WORK/cluster.key" --data-dir "$WORK/$node" \
    --gossip-addr "127.0.0.1:$((17940 + n))" --admin-addr "$(admin $n)" \
    --gossip-interval 500ms "${join[@]}" \
    --service "profile=$app_port,check=http://127.0.0.1:$app_port/healthz,interval=1s,timeout=500ms,rise=2,fall=2" \
    2> "$WORK/$node.log" &
  PIDS+=($!)
  echo "  $node (${REGIONS[$i]}/${ZONES[$i]}): admin $(admin $n), gossip 127.0.0.1:$((17940 + n)), app 127.0.0.1:$app_port"
done

healthy_count() {
  "$AGENT" services --json --admin-addr "$(admin "$1")" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(s["healthy"] for s in d))' 2>/dev/null || echo 0
}
wait_for() { # wait_for WHAT SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  local start=$SECONDS
  until "$@"; do
    if (( SECONDS - start > secs )); then echo "demo: timed out waiting for $what" >&2; exit 1; fi
    sleep 0.5
  done
  echo "  ($what after $((SECONDS - start)) s)"
}
all_see() { for n in 1 2 3 4 5 6; do [ "$(healthy_count $n)" = "$1" ] || return 1; done; }
wait_for "all six agents see six healthy instances" 60 all_see 6

say "agent status (asked of east-1)"
"$AGENT" status --admin-addr "$(admin 1)"

say "where sessions go: the same key reaches the same instance from every agent of a region"
for key in "meteor_login_token=alice" "meteor_login_token=bob" "meteor_login_token=carol"; do
  echo "key $key"
  for n in 1 2 3 5; do
    "$AGENT" route profile --key "$key" --json --admin-addr "$(admin $n)" | python3 -c '
import json, sys
r = json.load(sys.stdin)
c = r["chosen"]
src, node, region = r["from"], c["node"], c["region"]
then = ", ".join(t["node"] for t in r["failover"][:3])
print(f"  from {src:<7} -> {node:<7} ({region}), then {then}")'
  done
done

say "full route for alice from west-1"
"$AGENT" route profile --key meteor_login_token=alice --admin-addr "$(admin 3)"

victim=$("$AGENT" route profile --key meteor_login_token=alice --json --admin-addr "$(admin 1)" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["chosen"]["node"])')
say "failing the health check of $victim (its /healthz now answers 503)"
touch "$WORK/$victim.down"
wait_for "every agent routes around $victim" 30 all_see 5
"$AGENT" services --admin-addr "$(admin 1)"
echo
echo "alice's session from east-1 now:"
"$AGENT" route profile --key meteor_login_token=alice --admin-addr "$(admin 1)"

say "healing $victim"
rm -f "$WORK/$victim.down"
wait_for "$victim is back in rotation everywhere" 30 all_see 6
"$AGENT" route profile --key meteor_login_token=alice --admin-addr "$(admin 1)"

say "a cluster event, fired on eu-2, seen by a watcher on east-1"
"$AGENT" event watch --admin-addr "$(admin 1)" > "$WORK/events.txt" &
PIDS+=($!)
sleep 0.5
"$AGENT" event fire cache-flush users --admin-addr "$(admin 6)"
wait_for "the event arrives" 10 grep -q cache-flush "$WORK/events.txt"
cat "$WORK/events.txt"

say "east-2 leaves (SIGTERM): the others see it as 'left', not failed"
kill -TERM "${PIDS[3]}"
left_seen() { "$AGENT" members --admin-addr "$(admin 1)" | grep -q "east-2 .* left"; }
wait_for "east-1 sees east-2 left" 20 left_seen
"$AGENT" members --admin-addr "$(admin 1)"

say "done; stopping everything"
