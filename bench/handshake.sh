#!/usr/bin/env bash
# CPU time per new TLS connection: what a client that does not keep its
# connection costs the proxy. nginx (plain proxy) and scopegate each
# terminate TLS 1.3 with the same self-signed P-256 certificate, alone on
# CPU 1. `openssl s_time` on CPU 0 opens connections one after another
# for DUR seconds; on each it sends one `GET /v1/health HTTP/1.0` (a
# public route in scopegate's config, forwarded to the upstream by both)
# and reads the answer. Two modes, in interleaved rounds:
#
#   new    a full handshake every time (ECDHE and the certificate's
#          signature)
#   reuse  every connection after the first resumes the first one's
#          session (a PSK handshake with ECDHE, no signature)
#
# It prints the proxy's CPU µs (user + system, including the kernel's TCP
# set-up and tear-down) per connection, and nginx / scopegate round by
# round with a 90% interval: above 1, scopegate spends less a connection.
#
# Needs: apt-get install nginx-light openssl; python3
# Usage: [ROUNDS=5] [DUR=4] bench/handshake.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-4}
[ "$(nproc)" -ge 2 ] || { echo "needs two CPUs" >&2; exit 1; }
for tool in nginx openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx-light openssl" >&2; exit 1; }
done
cargo build --release --quiet --bin scopegate --example fast_upstream
. bench/common.sh
start_work

UP=18781 NG=18782 SG=18784
tls_cert "$WORK"
export NGINX_CERT=$WORK/cert.pem NGINX_KEY=$WORK/key.pem SG_CERT=$WORK/cert.pem SG_KEY=$WORK/key.pem
pinned_upstream_and_nginx $UP $NG
mint_pat "$WORK" >/dev/null
gateway_conf "$WORK/gateway.yaml" $SG $UP
echo '  - { path: /v1/health, public: true }' >> "$WORK/gateway.yaml"
SCOPEGATE_WORKERS=1 SCOPEGATE_LOG=warn taskset -c 1 "$BIN/scopegate" serve --config "$WORK/gateway.yaml" >/dev/null & SGP=$!; PIDS+=($SGP)
for p in $NG $SG; do wait_port $p; done
NGW=$(pgrep -P "$NGINX_MASTER" | head -1)
tls_negotiated $NG $SG

declare -A ALL
one() { # name port pid mode
  local c0 c1 out n
  c0=$(cpu "$3")
  out=$(taskset -c 0 openssl s_time -connect "127.0.0.1:$2" "-$4" -time "$DUR" -www /v1/health 2>&1)
  c1=$(cpu "$3")
  n=$(awk '/connections in [0-9.]+s;/ { print $1; exit }' <<<"$out")
  [ "${n:-0}" -gt 0 ] || { echo "$1 $4: no connections" >&2; echo "$out" >&2; exit 1; }
  # s_time marks a resumed connection `r` and a full handshake `*`.
  if [ "$4" = reuse ] && grep -q '^[r*]*\*' <<<"$out"; then
    echo "$1: a connection was not resumed" >&2; exit 1
  fi
  # Each answer must be the upstream's 200, not an error page.
  local s
  s=$(openssl s_client -connect "127.0.0.1:$2" -quiet -ign_eof <<<$'GET /v1/health HTTP/1.0\r\n\r' 2>/dev/null | head -1)
  case $s in "HTTP/1."?" 200"*) ;; *) echo "$1: answered $s" >&2; exit 1 ;; esac
  ALL[$1-$4]+=" $(per_each "$c0" "$c1" "$n")"
}
for _ in $(seq 1 "$ROUNDS"); do
  for mode in new reuse; do
    one nginx $NG "$NGW" $mode
    one scopegate $SG $SGP $mode
  done
done
echo "CPU µs per TLS 1.3 connection (one HTTP/1.0 GET each), proxy alone on CPU 1, $ROUNDS interleaved rounds of ${DUR}s"
for k in nginx-new scopegate-new nginx-reuse scopegate-reuse; do
  printf '%-16s median %7.1f   [%s ]\n' "$k" "$(median <<<"${ALL[$k]}")" "${ALL[$k]}"
done
for mode in new reuse; do
  echo "nginx / scopegate, $mode:"
  paired "${ALL[nginx-$mode]}" "${ALL[scopegate-$mode]}"
done
