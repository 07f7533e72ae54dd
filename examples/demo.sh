#!/usr/bin/env bash
# The main job, on one machine: a local 3-node shim cluster on loopback. It
# spawns example services, shows the table, kills a node (its shimd and every
# process it ran, as if the host died) and shows the table again, with the
# lost processes running elsewhere. Needs root (cgroups). Run: make demo
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
DATA=$(mktemp -d /tmp/shim-demo.XXXXXX)
export SHIM_ADDR=127.0.0.1:7070,127.0.0.1:7080,127.0.0.1:7090
# The bootstrap node writes the admin token, the CA and the join token here;
# the CLI reads its credentials from $SHIM_DATA_DIR.
export SHIM_DATA_DIR=$DATA/node-a
pids=()

cleanup() {
  echo; echo "== cleaning up"
  "$BIN/shim" ps -o json 2>/dev/null | grep -o '"id": *"[^"]*"' | cut -d'"' -f4 | xargs -r "$BIN/shim" kill >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # node-c died with its guard, so nothing removed its (now empty) cgroups.
  for d in /sys/fs/cgroup/*/shim/node-c /sys/fs/cgroup/unified/shim/node-c; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  rm -rf "$DATA"
}
trap cleanup EXIT

start() { # name api raft [join]
  local join=()
  [ -n "${4:-}" ] && join=(--join "$4" --join-token-file "$DATA/node-a/join.token")
  "$BIN/shimd" --name "$1" --data-dir "$DATA/$1" --api "$2" --raft "$3" "${join[@]}" >"$DATA/$1.log" 2>&1 &
  pids+=($!)
}

echo "== starting 3 shimd servers (logs in $DATA)"
start node-a 127.0.0.1:7070 127.0.0.1:7071
for _ in $(seq 100); do [ -f "$DATA/node-a/join.token" ] && break; sleep 0.1; done
start node-b 127.0.0.1:7080 127.0.0.1:7081 127.0.0.1:7070
start node-c 127.0.0.1:7090 127.0.0.1:7091 127.0.0.1:7070
for _ in $(seq 100); do
  [ "$("$BIN/shim" nodes 2>/dev/null | grep -c ' up')" = 3 ] && break
  sleep 0.1
done
"$BIN/shim" nodes

echo; echo "== spawning example services"
"$BIN/shim" spawn --name ticker --count 3 --cpu 0.05:0.2 --mem 4M:32M --restart always -- \
  /bin/sh -c 'while true; do echo "tick $(date +%T)"; sleep 1; done' >/dev/null
"$BIN/shim" spawn --name sleeper --count 6 --cpu 0.01:0.1 --mem 1M:16M -- /bin/sleep 3600 >/dev/null
"$BIN/shim" spawn --name burst --cpu 0.1:0.5:1 --mem 8M:64M --pids 32 -- /bin/sleep 3600 >/dev/null
"$BIN/shim" spawn --name typo -- /no/such/binary >/dev/null
sleep 1
"$BIN/shim" ps -a

echo; echo "== killing node-c: its shimd, its guard and every process it ran, as if the host died"
lost=$("$BIN/shim" ps --node node-c -o json | grep -o '"id": *"[^"]*"' | cut -d'"' -f4)
kill -9 "$(cat "$DATA/node-c/guard.pid")" "${pids[2]}"
for f in /sys/fs/cgroup/pids/shim/node-c/*/cgroup.procs; do
  [ -f "$f" ] && xargs -r kill -9 <"$f" 2>/dev/null || true
done
start_ns=$(date +%s%N)
n=$(echo "$lost" | grep -c . || true)
for _ in $(seq 200); do
  # Done when every process node-c ran is running on another node.
  [ "$n" = 0 ] && break
  running=$("$BIN/shim" ps $lost 2>/dev/null | awk 'NR > 1 && / running / && !/ node-c /' | wc -l)
  [ "$running" -ge "$n" ] && break
  sleep 0.05
done
echo "node-c's $n processes were running elsewhere after $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
sleep 0.5
"$BIN/shim" nodes
echo
"$BIN/shim" ps

echo; echo "== node-c is not coming back: remove it for good (its Raft vote too)"
"$BIN/shim" node rm node-c
"$BIN/shim" nodes
echo; echo "== what happened, from the event ring (shim events; the web map at /ui/ shows it live)"
"$BIN/shim" events --type node. --type process.moved
