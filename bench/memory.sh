#!/usr/bin/env bash
# RSS of scopegate serving 1,000 routes, 10,000 tenants and 100,000 PAT
# records, then over a soak under wrk load (RSS sampled every 30 s).
#
# TLS=1 terminates TLS 1.3 (a self-signed P-256 certificate) and, before
# the soak, fills the TLS session cache: `openssl s_time` makes new
# connections for FILL seconds (default 20), each a full handshake that
# leaves two sessions in the cache (16,384 at most, SECURITY.md 10), and
# the soak then runs over TLS. RSS is printed after the fill too.
#
# Needs: apt-get install wrk; for TLS=1 openssl
# Usage: [SCOPEGATE_LOG=info] [TLS=1 [FILL=20]] bench/memory.sh [SOAK_SECONDS]
#        (default 600; SCOPEGATE_LOG=info turns the access log on, to
#        /dev/null)
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK=${1:-600}
TLS=${TLS:-0}
FILL=${FILL:-20}
command -v wrk >/dev/null || { echo "missing wrk: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin scopegate --example fast_upstream
. bench/common.sh
start_work
UP=18281 SG=18284
LISTEN="{ addr: \"127.0.0.1:$SG\" }"
SCHEME=http
CURL_TLS=()
if [ "$TLS" = 1 ]; then
  tls_cert "$WORK"
  LISTEN="{ addr: \"127.0.0.1:$SG\", tls: { cert: $WORK/cert.pem, key: $WORK/key.pem } }"
  SCHEME=https
  CURL_TLS=(--cacert "$WORK/cert.pem")
fi

"$BIN/scopegate" token new --config /nonexistent --id soak \
  --cube '{"methods":["GET"],"tags":["t7"],"tenants":["tenant-42"],"accounts":["acct-42"]}' > "$WORK/pat.out"
PAT=$(grep -o 'abx_pat_[0-9A-Za-z]*' "$WORK/pat.out" | head -1)
python3 - "$WORK" "$UP" "$LISTEN" <<'PY'
import sys, hashlib
work, up, listen = sys.argv[1], sys.argv[2], sys.argv[3]
g = [f'listen: {listen}', f'upstream: {{ url: "http://127.0.0.1:{up}" }}',
     'tokens: { pat_file: tokens.yaml }',
     'plans:', '  pro:', '    - { tags: ["*"], methods: ["*"] }', 'accounts:']
g += [f'  acct-{a}: {{ plan: pro }}' for a in range(1000)]
g += ['tenants:'] + [f'  tenant-{t}: {{ account: acct-{t % 1000} }}' for t in range(10000)]
g += ['routes:'] + [f'  - {{ path: "/v1/tenants/{{tenant}}/r{r}/{{id}}", tag: t{r % 50}, methods: [GET, POST] }}' for r in range(1000)]
open(f'{work}/gateway.yaml', 'w').write('\n'.join(g) + '\n')
t = ['tokens:']
for i in range(100000 - 1):
    sha = hashlib.sha256(f'record-{i}'.encode()).hexdigest()
    t.append(f'  - id: tok_{i}\n    sha256: {sha}\n    cube: {{ methods: [GET], tags: [t{i % 50}], tenants: [tenant-{i % 10000}], accounts: [acct-{i % 10000 % 1000}] }}')
open(f'{work}/tokens.yaml', 'w').write('\n'.join(t) + '\n')
PY
sed -n '/Record to paste/,$p' "$WORK/pat.out" | tail -n +2 >> "$WORK/tokens.yaml"

"$BIN/examples/fast_upstream" "127.0.0.1:$UP" 1 2>/dev/null & PIDS+=($!)
# As deployed (deploy/): MIMALLOC_PURGE_DELAY=0 unless the caller sets it
# (MIMALLOC_PURGE_DELAY=1000 bench/memory.sh measures mimalloc's default).
MIMALLOC_PURGE_DELAY=${MIMALLOC_PURGE_DELAY:-0} SCOPEGATE_LOG=${SCOPEGATE_LOG:-warn} "$BIN/scopegate" serve --config "$WORK/gateway.yaml" >/dev/null & SGPID=$!; PIDS+=($SGPID)
for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$SG") 2>/dev/null && break; sleep 0.05; done
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$SGPID/status"; }
URL="$SCHEME://127.0.0.1:$SG/v1/tenants/tenant-42/r7/item-1"
code=$(curl -s "${CURL_TLS[@]}" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $PAT" "$URL")
[ "$code" = 200 ] || { echo "the soak request answered $code" >&2; exit 1; }
START=$(rss)
echo "loaded: 1000 routes, 10000 tenants, 100000 PATs: RSS ${START} kB (peak so far $(awk '/^VmHWM/ { print $2 }' "/proc/$SGPID/status") kB)"
MAX=$START
if [ "$TLS" = 1 ]; then
  # Full handshakes, one after another (the answer is a 401: no token).
  n=$(openssl s_time -connect "127.0.0.1:$SG" -new -time "$FILL" -www /v1/tenants/tenant-42/r7/item-1 2>&1 \
    | awk '/connections in [0-9.]+s;/ { print $1; exit }')
  [ "${n:-0}" -gt 0 ] || { echo "no TLS connection was made" >&2; exit 1; }
  NOW=$(rss); [ "$NOW" -gt "$MAX" ] && MAX=$NOW
  echo "after $n full handshakes (up to $((2 * n)) sessions; the cache keeps 16384): RSS ${NOW} kB"
fi
for ((t = 30; t <= SOAK; t += 30)); do
  wrk -t1 -c32 -d30s -H "Authorization: Bearer $PAT" "$URL" > "$WORK/wrk.out"
  if wrk_failed "$WORK/wrk.out" "t=${t}s"; then exit 1; fi
  NOW=$(rss); [ "$NOW" -gt "$MAX" ] && MAX=$NOW
  echo "t=${t}s  RSS ${NOW} kB  $(awk '/^Requests\/sec/ { print $2 " req/s" }' "$WORK/wrk.out")"
done
END=$(rss)
echo "soak ${SOAK}s: start ${START} kB, max ${MAX} kB, end ${END} kB, end/start $(awk -v a="$END" -v b="$START" 'BEGIN { printf "%.2f", a / b }'), peak $(awk '/^VmHWM/ { print $2 }' "/proc/$SGPID/status") kB"
