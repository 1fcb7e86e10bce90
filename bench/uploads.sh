#!/usr/bin/env bash
# RSS while many clients upload at once: the own HTTP/1 loop, which
# streams a body over 16 KiB through a one-slot channel, against hyper's
# server (SCOPEGATE_HTTP1_SERVER=hyper), in alternating rounds of one run.
# Each round starts a fresh gateway, runs wrk for DUR seconds with CONNS
# connections each POSTing BODY bytes, samples VmRSS every 0.25 s, and
# prints the idle RSS, the most under load, the RSS after, and req/s.
#
# The allocator is set as deployed (MIMALLOC_PURGE_DELAY=0, deploy/):
# with mimalloc's default delay freed pages are returned later, and the
# peak reads several MB higher for both servers.
#
# Needs: apt-get install wrk
# Usage: [BODY=1048576] [CONNS=256] [DUR=10] [ROUNDS=2] bench/uploads.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BODY=${BODY:-1048576}
CONNS=${CONNS:-256}
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-2}
command -v wrk >/dev/null || { echo "missing wrk: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin scopegate --example fast_upstream
. bench/common.sh
start_work
UP=18381 SG=18384
"$BIN/examples/fast_upstream" "127.0.0.1:$UP" 1 2>/dev/null & PIDS+=($!)
wait_port $UP
PAT=$(mint_pat "$WORK")
gateway_conf "$WORK/gateway.yaml" $SG $UP
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = string.rep("m", $BODY)
wrk.headers["Authorization"] = "Bearer $PAT"
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

# round SERVER -> "idle_kB max_kB after_kB req/s"
round() {
  MIMALLOC_PURGE_DELAY=${MIMALLOC_PURGE_DELAY:-0} SCOPEGATE_HTTP1_SERVER=$1 SCOPEGATE_LOG=warn \
    "$BIN/scopegate" serve --config "$WORK/gateway.yaml" >/dev/null 2>&1 & local pid=$!
  wait_port $SG
  local rss="awk '/^VmRSS/ { print \$2 }' /proc/$pid/status"
  local idle max now
  idle=$(eval "$rss"); max=$idle
  wrk -t2 -c"$CONNS" -d"${DUR}s" -s "$WORK/post.lua" "http://127.0.0.1:$SG$PATH_OK" > "$WORK/wrk.out" 2>&1 & local w=$!
  while kill -0 $w 2>/dev/null; do
    sleep 0.25
    now=$(eval "$rss"); [ "$now" -gt "$max" ] && max=$now
  done
  wait $w
  # A denial reads no body.
  if wrk_failed "$WORK/wrk.out" "$1"; then kill $pid; exit 1; fi
  now=$(eval "$rss")
  kill $pid; wait $pid 2>/dev/null || true
  echo "$idle $max $now $(awk '/^Requests\/sec/ { print $2 }' "$WORK/wrk.out")"
}

echo "$CONNS connections uploading $BODY-byte bodies, ${DUR}s a round (RSS in MB)"
printf '%-6s %-6s %8s %8s %8s %10s\n' round server idle max after req/s
declare -a OWN_MAX HYP_MAX OWN_RPS HYP_RPS
for ((r = 1; r <= ROUNDS; r++)); do
  for srv in own hyper; do
    read -r idle max after rps <<<"$(round $srv)"
    printf '%-6s %-6s %8.1f %8.1f %8.1f %10.0f\n' "$r" "$srv" \
      "$(awk -v k="$idle" 'BEGIN { print k / 1024 }')" "$(awk -v k="$max" 'BEGIN { print k / 1024 }')" \
      "$(awk -v k="$after" 'BEGIN { print k / 1024 }')" "$rps"
    if [ $srv = own ]; then OWN_MAX+=("$max"); OWN_RPS+=("$rps"); else HYP_MAX+=("$max"); HYP_RPS+=("$rps"); fi
  done
done
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
awk -v a="$(med "${OWN_MAX[@]}")" -v b="$(med "${HYP_MAX[@]}")" -v c="$(med "${OWN_RPS[@]}")" -v d="$(med "${HYP_RPS[@]}")" \
  'BEGIN { printf "medians, own loop / hyper'"'"'s server: max RSS %.2fx, req/s %.2fx\n", a / b, c / d }'
