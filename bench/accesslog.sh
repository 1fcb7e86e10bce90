#!/usr/bin/env bash
# What the JSON access log costs, on one pinned core: scopegate (ES256 JWT)
# with the access log on and off, and optionally a baseline binary with the
# log on, side by side. Each round runs wrk at full speed, then the paced
# generator at RATE, and prints req/s, how busy the proxy's process was
# while paced, and the paced p50/p99. The proxy gets CPU 1; wrk, the paced
# generator and the upstream CPU 0. stdout of each gateway goes to
# /dev/null.
#
# Needs: apt-get install wrk
# Usage: [ROUNDS=4] [DUR=5] [RATE=7000] bench/accesslog.sh [BASELINE_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4} DUR=${DUR:-5} RATE=${RATE:-7000}
BASELINE=${1:-}
command -v wrk >/dev/null || { echo "missing wrk: apt-get install wrk" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs two CPUs" >&2; exit 1; }
cargo build --release --quiet --bin scopegate --example fast_upstream --example mint_jwt --example paced
. bench/common.sh
start_work
UP=18581
taskset -c 0 "$BIN/examples/fast_upstream" "127.0.0.1:$UP" 1 2>/dev/null & PIDS+=($!)
wait_port $UP
JWT=$(mint_jwt)
mint_pat "$WORK" >/dev/null
declare -A PORT PID
start() { # name binary SCOPEGATE_LOG port
  gateway_conf "$WORK/gateway-$4.yaml" "$4" $UP
  SCOPEGATE_WORKERS=1 SCOPEGATE_LOG=$3 taskset -c 1 "$2" serve --config "$WORK/gateway-$4.yaml" >/dev/null 2>&1 & PIDS+=($!)
  PORT[$1]=$4 PID[$1]=$!
  wait_port "$4"
}
TARGETS=(log-on log-off)
start log-on "$BIN/scopegate" info 18585
start log-off "$BIN/scopegate" warn 18586
if [ -n "$BASELINE" ]; then start baseline-log-on "$BASELINE" info 18584; TARGETS=(baseline-log-on "${TARGETS[@]}"); fi
HZ=$(getconf CLK_TCK)
echo "access log cost: ES256, proxy pinned to CPU 1; wrk -t1 -c32 ${DUR}s, then paced at $RATE req/s for ${DUR}s; $ROUNDS interleaved rounds"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    taskset -c 0 wrk -t1 -c32 -d"${DUR}s" -H "Authorization: Bearer $JWT" "http://127.0.0.1:${PORT[$t]}$PATH_OK" > "$WORK/wrk.out"
    # A refused token would measure the cost of a 401.
    if wrk_failed "$WORK/wrk.out" "$t"; then exit 1; fi
    rps=$(awk '/^Requests\/sec/ { printf "%d", $2 }' "$WORK/wrk.out")
    a=$(awk '{ print $14 + $15 }' "/proc/${PID[$t]}/stat")
    out=$(taskset -c 0 "$BIN/examples/paced" "127.0.0.1:${PORT[$t]}" "$PATH_OK" "$RATE" "$DUR" 32 "$JWT")
    b=$(awk '{ print $14 + $15 }' "/proc/${PID[$t]}/stat")
    grep -q "errors=0 " <<<"$out" || { echo "$t: errors at $RATE req/s: $out" >&2; exit 1; }
    printf 'round %s  %-16s req/s %6s   busy while paced %3s%%   %s\n' "$r" "$t" "$rps" "$(( (b - a) * 100 / HZ / DUR ))" "$(sed -E 's/.*(p50_us=[0-9]+ p99_us=[0-9]+).*/\1/' <<<"$out")"
  done
done
