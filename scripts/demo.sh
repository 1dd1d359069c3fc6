#!/usr/bin/env bash
# `make demo`: six agents in three regions on loopback, each fronting a small app that answers
# with its node and region. Shows the cluster converging, `agent status`, DNS, where sessions
# route from each region, HTTP and WebSocket traffic entering one region and served in another
# (through the ingress on east-1 and through west-1's upstream port), sticky sessions, kill -9 of
# a session's instance moving that session and no other (checked: the demo fails otherwise), a
# health check failing and healing, an event, and a leave. Everything it starts is stopped on
# every exit path. It drives the `agent` binary exactly as a user would.
#
# AGENT=/path/to/agent bash scripts/demo.sh uses that binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${AGENT:-}" ]; then
  [ -x "$AGENT" ] || { echo "demo: AGENT=$AGENT is not an executable" >&2; exit 2; }
else
  cargo build --quiet -p grapevine-agent --bin agent
  AGENT="$PWD/target/debug/agent"
fi
WORK=$(mktemp -d /tmp/grapevine-demo.XXXXXX)
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  local p left
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # Agents drain on SIGTERM; give them a few seconds, then kill what is left.
  for _ in $(seq 50); do
    left=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

T_START=$(date +%s.%N)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
  printf '\033[1;31mdemo: FAILED: %s\033[0m\n' "$*" >&2
  for node in "${NODES[@]}"; do # what each agent saw, before cleanup removes the logs
    pid=${AGENT_PID[$node]:-}
    state=$( [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo running || echo "not running")
    echo "  $node: agent $state, sees $(healthy_count "${NUM[$node]}") healthy instances; last log lines:" >&2
    tail -n 4 "$WORK/$node.log" 2>/dev/null | cut -c1-240 | sed 's/^/    /' >&2
  done
  exit 1
}
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$(date +%s.%N)"; }
admin() { echo "127.0.0.1:$((17070 + $1))"; }
dns() { echo "127.0.0.1:$((18600 + $1))"; }

"$AGENT" keygen > "$WORK/cluster.key"
"$AGENT" ca init --out "$WORK/pki" --cluster demo > /dev/null
NODES=(east-1 east-2 west-1 west-2 eu-1 eu-2)
REGIONS=(us-east us-east us-west us-west eu-central eu-central)
ZONES=(us-east-1a us-east-1b us-west-2a us-west-2b eu-central-1a eu-central-1b)
declare -A NUM REGION_OF AGENT_PID
for i in "${!NODES[@]}"; do NUM[${NODES[$i]}]=$((i + 1)); REGION_OF[${NODES[$i]}]=${REGIONS[$i]}; done

INGRESS_NODE=east-1
INGRESS=127.0.0.1:18080
CHAT_UPSTREAM=127.0.0.1:18090 # west-1's local port for chat
say "starting 6 agents in 3 regions; each fronts one instance of 'profile'; eu-central also runs 'chat'"
for i in "${!NODES[@]}"; do
  n=$((i + 1)); node=${NODES[$i]}; app_port=$((18080 + n))
  "$AGENT" cert issue --ca "$WORK/pki" --node "$node" --out "$WORK/pki" > /dev/null
  python3 scripts/demo_backend.py "$node" "$app_port" "$WORK/$node.down" "${REGIONS[$i]}" &
  PIDS+=($!)
  extra=()
  [ "$n" -gt 1 ] && extra+=(--join 127.0.0.1:17941)
  [ "${REGIONS[$i]}" = eu-central ] && extra+=(--service "chat=$app_port")
  [ "$node" = west-1 ] && extra+=(--upstream "chat=$CHAT_UPSTREAM")
  [ "$node" = "$INGRESS_NODE" ] && extra+=(--ingress-listen "$INGRESS" --ingress-route path_prefix=/chat,service=chat \
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
echo "  ingress on $INGRESS_NODE: http://$INGRESS (/chat -> chat, / -> profile; sticky by cookie meteor_login_token)"
echo "  upstream on west-1: $CHAT_UPSTREAM -> chat (what an app in us-west connects to)"

healthy_count() {
  "$AGENT" services --json --admin-addr "$(admin "$1")" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(s["healthy"] for s in d))' 2>/dev/null || echo 0
}
wait_for() { # wait_for WHAT SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  local start
  start=$(date +%s.%N)
  until "$@"; do
    if (( $(date +%s) - ${start%.*} > secs )); then fail "timed out after $secs s waiting for $what"; fi
    sleep 0.25
  done
  echo "  ($what after $(since "$start") s)"
}
all_see_from() { for n in "${@:2}"; do [ "$(healthy_count "$n")" = "$1" ] || return 1; done; }
all_up_and_see() {
  for node in "${NODES[@]}"; do kill -0 "${AGENT_PID[$node]}" 2>/dev/null || fail "$node's agent exited"; done
  all_see_from "$@"
}
wait_for "all six agents see eight healthy instances (6 profile, 2 chat)" 60 all_up_and_see 8 1 2 3 4 5 6

# route SERVICE KEY N: "CHOSEN FAILOVER..." as agent N routes it (node ids).
route() {
  "$AGENT" route "$1" --key "$2" --json --admin-addr "$(admin "$3")" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["chosen"]["node"], *[t["node"] for t in r["failover"]])'
}
# get URL [KEY]: "NODE REGION MS" of the instance that answered (the app says who it is).
get() {
  local args=(-sS --max-time 10 -w ' %{time_total}' "$1")
  [ $# -gt 1 ] && args+=(--cookie "meteor_login_token=$2")
  curl "${args[@]}" | tr -d '()\n' | awk '$1 == "hello" { printf "%s %s %.1f\n", $3, $4, $5 * 1000; ok = 1 } END { exit !ok }'
}

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
    read -r chosen f1 f2 f3 _ <<< "$(route profile "$key" "$n")"
    printf '  from %-7s -> %-7s (%s), then %s, %s, %s\n' "${NODES[$((n - 1))]}" "$chosen" "${REGION_OF[$chosen]}" "$f1" "$f2" "$f3"
  done
done

say "HTTP crossing regions: /chat through the ingress on east-1 (us-east) reaches chat, which only eu-central runs"
echo "  each session key asked 3 times; 'route' is what \`agent route chat --key KEY\` on east-1 predicts"
for key in alice bob carol dave; do
  read -r want _ <<< "$(route chat "$key" 1)"
  answers=(); times=()
  for _ in 1 2 3; do
    out=$(get "http://$INGRESS/chat" "$key") || fail "GET /chat for $key through the ingress failed"
    read -r node region ms <<< "$out"
    [ "$region" = eu-central ] || fail "/chat for $key was answered by $node in $region, not eu-central"
    answers+=("$node"); times+=("$ms")
  done
  [ "${answers[*]}" = "$want $want $want" ] || fail "/chat for $key went to ${answers[*]}, route says $want"
  printf '  %-6s -> %s (eu-central) 3/3, route: %s; %s / %s / %s ms\n' "$key" "$want" "$want" "${times[@]}"
done

say "an app in us-west calls chat through west-1's upstream port $CHAT_UPSTREAM: plain TCP over QUIC to eu-central"
echo "  (no session key on an upstream port: the less loaded of two random eu-central instances)"
for i in 1 2 3 4; do
  out=$(get "http://$CHAT_UPSTREAM/") || fail "GET through west-1's upstream port failed"
  read -r node region ms <<< "$out"
  [ "$region" = eu-central ] || fail "west-1's upstream answered from $node in $region, not eu-central"
  echo "  request $i -> $node ($region), $ms ms"
done

say "WebSocket crossing regions: into us-east through the ingress, and into us-west through west-1's upstream port"
for via in "ingress on east-1|127.0.0.1 18080 /chat|hello from us-east" "upstream on west-1|127.0.0.1 18090 /|hello from us-west"; do
  IFS='|' read -r label target msg <<< "$via"
  # shellcheck disable=SC2086 # target is "HOST PORT PATH"
  reply=$(python3 scripts/demo_ws.py $target "$msg") || fail "WebSocket through the $label failed"
  [[ "$reply" == *"(eu-central) echoes: $msg" ]] || fail "WebSocket through the $label answered: $reply"
  echo "  via $label: sent '$msg', got '$reply'"
done

# Sticky sessions. The session to follow is the first candidate key that the ingress agent routes
# to another instance, so killing that instance never takes the ingress down.
say "sticky sessions through the ingress on east-1: 20 sampled keys plus one followed session"
KEY=; VICTIM=
for k in alice bob carol dave erin frank grace heidi; do
  read -r chosen _ <<< "$(route profile "$k" 1)"
  if [ "$chosen" != "$INGRESS_NODE" ]; then KEY=$k; VICTIM=$chosen; break; fi
done
[ -n "$KEY" ] || fail "no candidate key routes away from $INGRESS_NODE"
echo "  followed session: '$KEY', which east-1 routes to $VICTIM (not the ingress agent, so it can be killed)"
SAMPLE=("$KEY")
for i in $(seq -w 1 20); do SAMPLE+=("user-$i"); done
declare -A BEFORE NEXT
for k in "${SAMPLE[@]}"; do
  read -r -a order <<< "$(route profile "$k" 1)"
  want=${order[0]}
  for _ in 1 2 3; do
    out=$(get "http://$INGRESS/" "$k") || fail "GET / for $k through the ingress failed"
    read -r node _ _ <<< "$out"
    [ "$node" = "$want" ] || fail "session $k went to $node, route says $want"
  done
  BEFORE[$k]=$want
  NEXT[$k]=
  for o in "${order[@]}"; do [ "$o" != "$VICTIM" ] && { NEXT[$k]=$o; break; }; done
done
declare -A COUNT
for k in "${SAMPLE[@]}"; do COUNT[${BEFORE[$k]}]=$(( ${COUNT[${BEFORE[$k]}]:-0} + 1 )); done
ON_VICTIM=(); for k in "${SAMPLE[@]}"; do [ "${BEFORE[$k]}" = "$VICTIM" ] && ON_VICTIM+=("$k"); done
echo "  ${#SAMPLE[@]} sessions, each answered 3 times by the same instance, the one agent route predicts:"
for node in "${NODES[@]}"; do [ -n "${COUNT[$node]:-}" ] && echo "    ${COUNT[$node]} on $node"; done
echo "  on $VICTIM: ${ON_VICTIM[*]}"

say "kill -9 of $VICTIM's agent: '$KEY' and the other sessions on $VICTIM move, no other session does"
T_KILL=$(date +%s.%N)
{ kill -9 "${AGENT_PID[$VICTIM]}"; wait "${AGENT_PID[$VICTIM]}"; } 2>/dev/null || true
# Survivors (the ingress agent and one in another region) note when they see the death.
for watcher in "$INGRESS_NODE" eu-1; do
  ( until "$AGENT" members --admin-addr "$(admin "${NUM[$watcher]}")" 2>/dev/null | grep -q "^ *$VICTIM .* dead"; do sleep 0.1; done
    since "$T_KILL" > "$WORK/seen-dead.$watcher" ) &
  PIDS+=($!)
done
out=$(get "http://$INGRESS/" "$KEY") || fail "GET / for $KEY failed after the kill"
read -r node _ ms <<< "$out"
[ "$node" != "$VICTIM" ] || fail "'$KEY' still answered by the killed $VICTIM"
[ "$node" = "${NEXT[$KEY]}" ] || fail "'$KEY' moved to $node, not to the next in its failover order (${NEXT[$KEY]})"
echo "  '$KEY': $VICTIM -> $node, the next instance in its failover order; the first request took $ms ms ($(since "$T_KILL") s after the kill)"
moved=0; stayed=0; times=()
for k in "${SAMPLE[@]}"; do
  out=$(get "http://$INGRESS/" "$k") || fail "GET / for $k failed after the kill"
  read -r node _ ms <<< "$out"
  times+=("$ms")
  if [ "${BEFORE[$k]}" = "$VICTIM" ]; then
    [ "$node" = "${NEXT[$k]}" ] || fail "session $k was on $VICTIM and went to $node, not ${NEXT[$k]}"
    moved=$((moved + 1))
  else
    [ "$node" = "${BEFORE[$k]}" ] || fail "session $k was on ${BEFORE[$k]} (alive) and moved to $node"
    stayed=$((stayed + 1))
  fi
done
echo "  then all ${#SAMPLE[@]} again: $moved of ${#ON_VICTIM[@]} on $VICTIM moved, each to its next instance; $stayed of $stayed elsewhere stayed"
python3 -c '
import sys
t = [float(x) for x in sys.argv[1:]]
slow = [x for x in t if x >= 1000]
fast = sorted(x for x in t if x < 1000)
print(f"  answer times: {len(slow)} of {len(t)} waited out the dead agent (2 s answer timeout, then retried)" if slow else f"  answer times: none of {len(t)} waited on the dead agent", end="")
print(f"; the rest {fast[0]:.1f}-{fast[-1]:.1f} ms" if fast else "")' "${times[@]}"
seen() { [ -s "$WORK/seen-dead.$INGRESS_NODE" ] && [ -s "$WORK/seen-dead.eu-1" ]; }
for _ in $(seq 100); do seen && break; sleep 0.2; done
seen || fail "$INGRESS_NODE and eu-1 did not list $VICTIM as dead within 20 s"
echo "  seen dead by $INGRESS_NODE (us-east) $(cat "$WORK/seen-dead.$INGRESS_NODE") s and by eu-1 (eu-central) $(cat "$WORK/seen-dead.eu-1") s after the kill"
LIVE=(); for n in 1 2 3 4 5 6; do [ "$n" != "${NUM[$VICTIM]}" ] && LIVE+=("$n"); done

sick=west-1
say "failing the health check of $sick (its /healthz now answers 503)"
touch "$WORK/$sick.down"
wait_for "every agent routes around $sick" 30 all_see_from 6 "${LIVE[@]}"
"$AGENT" services --admin-addr "$(admin 1)"
echo
echo "'$KEY' as routed from west-2 now:"
"$AGENT" route profile --key "$KEY" --admin-addr "$(admin 4)"

say "healing $sick"
rm -f "$WORK/$sick.down"
wait_for "$sick is back in rotation everywhere" 30 all_see_from 7 "${LIVE[@]}"
"$AGENT" route profile --key "$KEY" --admin-addr "$(admin 4)"

say "a cluster event, fired on eu-2, seen by a watcher on west-1"
"$AGENT" event watch --admin-addr "$(admin 3)" > "$WORK/events.txt" &
PIDS+=($!)
sleep 0.5
"$AGENT" event fire cache-flush users --admin-addr "$(admin 6)"
wait_for "the event arrives" 10 grep -q cache-flush "$WORK/events.txt"
cat "$WORK/events.txt"

say "rotating the gossip key of the running cluster: install, use, remove, each asked of another region"
"$AGENT" keygen > "$WORK/new.key"
OLD_FP=$("$AGENT" keys list --json --admin-addr "$(admin 1)" |
  python3 -c 'import json, sys; print(next(k["fingerprint"] for k in json.load(sys.stdin)["keys"] if k["here"] == "primary"))')
"$AGENT" keys install - --admin-addr "$(admin 1)" < "$WORK/new.key" || fail "agent keys install"
"$AGENT" keys use - --admin-addr "$(admin 3)" < "$WORK/new.key" || fail "agent keys use"
"$AGENT" keys remove "$OLD_FP" --admin-addr "$(admin 5)" || fail "agent keys remove"
one_key_everywhere() {
  "$AGENT" keys list --json --admin-addr "$(admin 6)" |
    python3 -c 'import json, sys; d = json.load(sys.stdin); sys.exit(not (len(d["keys"]) == 1 and d["keys"][0]["primary"] == d["members"]))'
}
wait_for "eu-2 sees every member on the new key alone" 20 one_key_everywhere
"$AGENT" keys list --admin-addr "$(admin 6)"

say "west-2 leaves (SIGTERM): it drains, and the others see it as 'left', not failed"
kill -TERM "${AGENT_PID[west-2]}"
left_seen() { "$AGENT" members --admin-addr "$(admin 5)" | grep -q "west-2 .* left"; }
wait_for "eu-1 sees west-2 left" 20 left_seen
"$AGENT" members --admin-addr "$(admin 5)"

say "demo passed in $(since "$T_START") s; stopping everything"
