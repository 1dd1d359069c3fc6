#!/usr/bin/env bash
# `make demo`: six agents in three regions on loopback, each fronting a small app.
# Shows the cluster converging, `agent status`, where sessions route from each region, real HTTP
# and WebSocket traffic entering us-east and crossing to other regions over QUIC with mutual
# TLS, sticky sessions, a health check failing and healing, an event, and what moves when an
# instance's agent is killed. Everything it starts is stopped on exit. It drives the `agent`
# binary exactly as a user would.
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
dns() { echo "127.0.0.1:$((18600 + $1))"; }

"$AGENT" keygen > "$WORK/cluster.key"
"$AGENT" ca init --out "$WORK/pki" --cluster demo > /dev/null
NODES=(east-1 east-2 west-1 west-2 eu-1 eu-2)
REGIONS=(us-east us-east us-west us-west eu-central eu-central)
ZONES=(us-east-1a us-east-1b us-west-2a us-west-2b eu-central-1a eu-central-1b)

INGRESS=127.0.0.1:18080
say "starting 6 agents in 3 regions; each fronts one instance of 'profile'; eu-central also runs 'chat'"
declare -A AGENT_PID
for i in "${!NODES[@]}"; do
  n=$((i + 1)); node=${NODES[$i]}; app_port=$((18080 + n))
  "$AGENT" cert issue --ca "$WORK/pki" --node "$node" --out "$WORK/pki" > /dev/null
  python3 scripts/demo_backend.py "$node" "$app_port" "$WORK/$node.down" &
  PIDS+=($!)
  extra=()
  [ "$n" -gt 1 ] && extra+=(--join 127.0.0.1:17941)
  [ "${REGIONS[$i]}" = eu-central ] && extra+=(--service "chat=$app_port")
  [ "$node" = west-1 ] && extra+=(--upstream chat=127.0.0.1:18090)
  [ "$node" = east-1 ] && extra+=(--ingress-listen "$INGRESS" --ingress-route path_prefix=/chat,service=chat \
    --ingress-route path_prefix=/,service=profile --ingress-affinity-cookie meteor_login_token)
  "$AGENT" run --node-id "$node" --region "${REGIONS[$i]}" --zone "${ZONES[$i]}" \
    --cluster demo --cluster-key-file "$WORK/cluster.key" --data-dir "$WORK/$node" \
    --ca-file "$WORK/pki/ca.pem" --cert-file "$WORK/pki/$node.pem" --key-file "$WORK/pki/$node.key" \
    --gossip-addr "127.0.0.1:$((17940 + n))" --data-addr "127.0.0.1:$((17950 + n))" --admin-addr "$(admin $n)" \
    --dns-addr "$(dns $n)" \
    --service "profile=$app_port,check=http://127.0.0.1:$app_port/healthz,interval=1s,timeout=500ms,rise=2,fall=2" \
    "${extra[@]}" 2> "$WORK/$node.log" &
  PIDS+=($!)
  AGENT_PID[$node]=$!
  echo "  $node (${REGIONS[$i]}/${ZONES[$i]}): admin $(admin $n), DNS $(dns $n), gossip :$((17940 + n)), QUIC :$((17950 + n)), app :$app_port"
done
echo "  ingress on east-1: http://$INGRESS (/chat -> chat, / -> profile; sticky by cookie meteor_login_token)"

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
wait_for "all six agents see eight healthy instances (6 profile, 2 chat)" 60 all_see 8

say "agent status (asked of east-1)"
"$AGENT" status --admin-addr "$(admin 1)"

say "discovery by DNS, asked of west-1: profile's instances nearest first (SRV: priority = region rank, weight, port, node), and west-1's local port for chat"
echo "  \$ dig @127.0.0.1 -p 18603 +short SRV profile.service.grapevine"
dig @127.0.0.1 -p 18603 +short +time=2 SRV profile.service.grapevine | sed 's/^/  /'
echo "  \$ dig @127.0.0.1 -p 18603 +short SRV chat.upstream.grapevine"
dig @127.0.0.1 -p 18603 +short +time=2 SRV chat.upstream.grapevine | sed 's/^/  /'

say "where sessions go: the same key reaches the same instance from every agent of a region"
for key in alice bob carol; do
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
"$AGENT" route profile --key alice --admin-addr "$(admin 3)"

say "real traffic: HTTP through the ingress on east-1 stays in us-east and sticks to its instance"
USERS=(alice bob carol dave erin frank grace heidi)
served_by() { curl -s --max-time 5 --cookie "meteor_login_token=$1" "http://$INGRESS/" | sed 's/hello from //'; }
declare -A BEFORE
for u in "${USERS[@]}"; do
  BEFORE[$u]=$(served_by "$u")
  again=$(served_by "$u"); third=$(served_by "$u")
  echo "  $u -> ${BEFORE[$u]} (again: $again, $third)"
done

say "a WebSocket through the ingress on east-1, to the chat service that runs only in eu-central"
python3 scripts/demo_ws.py 127.0.0.1 18080 /chat "hello from us-east" | sed 's/^/  /'

victim=${BEFORE[alice]}
say "kill -9 of $victim's agent: only the sessions on $victim move"
{ kill -9 "${AGENT_PID[$victim]}"; wait "${AGENT_PID[$victim]}"; } 2>/dev/null || true
for u in "${USERS[@]}"; do
  start=$(date +%s.%N)
  now=$(served_by "$u")
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
  if [ "$now" = "${BEFORE[$u]}" ]; then note="stays"; else note="moved: its instance is gone"; fi
  echo "  $u -> $now  ($note; answered in ${took}s)"
done
dead_seen() { "$AGENT" members --admin-addr "$(admin 1)" | grep -q "$victim .* dead"; }
wait_for "east-1 marks $victim dead" 20 dead_seen

victim=west-1
say "failing the health check of $victim (its /healthz now answers 503)"
touch "$WORK/$victim.down"
all_see_from() { for n in "${@:2}"; do [ "$(healthy_count "$n")" = "$1" ] || return 1; done; }
LIVE=(1 3 4 5 6); [ "${BEFORE[alice]}" = east-1 ] && LIVE=(2 3 4 5 6)
wait_for "every agent routes around $victim" 30 all_see_from 6 "${LIVE[@]}"
"$AGENT" services --admin-addr "$(admin 1)"
echo
echo "alice's session from west-2 now:"
"$AGENT" route profile --key alice --admin-addr "$(admin 4)"

say "healing $victim"
rm -f "$WORK/$victim.down"
wait_for "$victim is back in rotation everywhere" 30 all_see_from 7 "${LIVE[@]}"
"$AGENT" route profile --key alice --admin-addr "$(admin 4)"

say "a cluster event, fired on eu-2, seen by a watcher on west-1"
"$AGENT" event watch --admin-addr "$(admin 3)" > "$WORK/events.txt" &
PIDS+=($!)
sleep 0.5
"$AGENT" event fire cache-flush users --admin-addr "$(admin 6)"
wait_for "the event arrives" 10 grep -q cache-flush "$WORK/events.txt"
cat "$WORK/events.txt"

say "west-2 leaves (SIGTERM): it drains, and the others see it as 'left', not failed"
kill -TERM "${AGENT_PID[west-2]}"
left_seen() { "$AGENT" members --admin-addr "$(admin 5)" | grep -q "west-2 .* left"; }
wait_for "eu-1 sees west-2 left" 20 left_seen
"$AGENT" members --admin-addr "$(admin 5)"

say "done; stopping everything"
