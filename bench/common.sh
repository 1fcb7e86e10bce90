# Shared by the bench/ scripts: one definition of the request, the token,
# nginx's plain proxy and scopegate's config, so they always measure the
# same thing. Source it after `cd` to the repository root; it sets BIN,
# PATH_OK, KEY_PUB, KEY_PRIV and TARGET_US.
# Where cargo put the release build (bench/smoke.sh builds into a directory
# of its own).
BIN=${CARGO_TARGET_DIR:-target}/release
# Issue 5's p99 target: added over direct at half of peak, in µs (the
# verdicts of load.sh and floor.sh).
TARGET_US=250
PATH_OK=/v1/tenants/acme-prod/markers
KEY_PUB=$PWD/tests/fixtures/es256.pub.pem
KEY_PRIV=$PWD/tests/fixtures/es256.key.pem

# start_work: a temporary directory in WORK and a PIDS list, both cleaned
# up when the script exits: every process started as `... & PIDS+=($!)` is
# killed and waited for.
start_work() {
  WORK=$(mktemp -d)
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

# wrk_failed FILE LABEL: whether wrk's output in FILE counts an answer
# other than 2xx, or a socket error (told on stderr after LABEL): every
# answer measured must be the upstream's, not a denial's.
wrk_failed() {
  grep -qE "Non-2xx|Socket errors" "$1" || return 1
  echo "$2: $(grep -E "Non-2xx|Socket errors" "$1" | tr '\n' ' ')" >&2
}

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# nginx_conf DIR PORT UPSTREAM_PORT [MAIN_DIRECTIVE...]: a plain reverse
# proxy, one worker, with a keep-alive upstream pool, in DIR/nginx.conf.
# NGINX_LISTEN=http2 makes it listen for HTTP/2 without TLS (h2c, prior
# knowledge) instead of HTTP/1. NGINX_CERT and NGINX_KEY (PEM files) make it
# terminate TLS (then NGINX_LISTEN="http2" is HTTP/2 by ALPN), TLS 1.3 only
# as scopegate would negotiate: nginx 1.22's default stops at TLS 1.2.
# NGINX_STREAM=1: nginx passes request bodies on as they come
# (`proxy_request_buffering off`), as scopegate does, instead of its
# default of reading a body whole first, to a temporary file past
# `client_body_buffer_size` (16 KiB).
nginx_conf() {
  local dir=$1 port=$2 up=$3
  shift 3
  mkdir -p "$dir"
  {
    printf '%s\n' "$@"
    cat <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$up; keepalive 64; }
  server {
    listen 127.0.0.1:$port${NGINX_CERT:+ ssl}${NGINX_LISTEN:+ $NGINX_LISTEN};
${NGINX_CERT:+    ssl_certificate $NGINX_CERT; ssl_certificate_key $NGINX_KEY; ssl_protocols TLSv1.3;}
    keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";${NGINX_STREAM:+ proxy_request_buffering off;} }
  }
}
CONF
  } > "$dir/nginx.conf"
}

# pinned_upstream_and_nginx UP NG: the upstream on CPU 0 and nginx's plain
# proxy to it on CPU 1 (bench/load.sh's PIN=1 layout); sets NGINX_MASTER.
pinned_upstream_and_nginx() {
  taskset -c 0 "$BIN/examples/fast_upstream" "127.0.0.1:$1" 1 2>/dev/null & PIDS+=($!)
  wait_port "$1"
  nginx_conf "$WORK/nginx" "$2" "$1"
  taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" & PIDS+=($!)
  NGINX_MASTER=$!
}

# mint_pat DIR: a PAT for the benchmarked route; its record goes to
# DIR/tokens.yaml and the secret to stdout.
mint_pat() {
  "$BIN/scopegate" token new --config /nonexistent --id bench \
    --cube '{"methods":["GET","POST"],"tags":["markers"],"tenants":["acme-prod"],"accounts":["acme"]}' > "$1/pat.out"
  { echo "tokens:"; sed -n '/Record to paste/,$p' "$1/pat.out" | tail -n +2; } > "$1/tokens.yaml"
  grep -o 'abx_pat_[0-9A-Za-z]*' "$1/pat.out" | head -1
}

# mint_jwt: the ES256 JWT for the same route, valid for a day.
mint_jwt() {
  "$BIN/examples/mint_jwt" "$KEY_PRIV" es-bench \
    "{\"iss\":\"https://auth.bench.example\",\"aud\":\"airbrx-api\",\"sub\":\"bench\",\"jti\":\"bench-1\",\"exp\":$(( $(date +%s) + 86400 )),\"cube\":{\"methods\":[\"GET\"],\"tags\":[\"markers\"],\"tenants\":[\"acme-prod\"],\"accounts\":[\"acme\"]}}"
}

# tls_cert DIR: a self-signed P-256 certificate for 127.0.0.1, valid for a
# day, in DIR/cert.pem and DIR/key.pem.
tls_cert() {
  command -v openssl >/dev/null || { echo "missing openssl: apt-get install openssl" >&2; exit 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# gateway_conf FILE PORT UPSTREAM_PORT: scopegate with the same key, the
# PAT file beside FILE, and the same route. SG_CERT and SG_KEY (PEM files)
# make it terminate TLS.
gateway_conf() {
  cat > "$1" <<CONF
listen: { addr: "127.0.0.1:$2"${SG_CERT:+, tls: { cert: $SG_CERT, key: $SG_KEY \}} }
upstream: { url: "http://127.0.0.1:$3" }
tokens:
  pat_file: tokens.yaml
  jwt:
    issuer: https://auth.bench.example
    audience: airbrx-api
    keys: [ { kid: es-bench, alg: ES256, public_key: $KEY_PUB } ]
plans: { pro: [ { tags: ["*"], methods: ["*"] } ] }
accounts: { acme: { plan: pro } }
tenants: { acme-prod: { account: acme } }
routes:
  - { path: "/v1/tenants/{tenant}/markers", tag: markers, methods: [GET, POST] }
CONF
}

# CPU time of a process so far, in clock ticks (TCK a second): user and
# system (cpu), user alone (ucpu).
TCK=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
ucpu() { awk '{ print $14 }' "/proc/$1/stat"; }

# per_each T0 T1 N: the µs of CPU from tick count T0 to T1, per one of N.
per_each() { awk -v a="$1" -v b="$2" -v n="$3" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t * 1e6 / n }'; }

# tls_negotiated PORT...: the TLS version and cipher suite OpenSSL's client
# gets from each port; a comparison is fair only when the lines agree.
tls_negotiated() {
  for p; do
    printf 'port %s: ' "$p"
    openssl s_client -connect "127.0.0.1:$p" </dev/null 2>/dev/null | awk '/^New,/ { print $2, $NF; exit }'
  done
}

# median: the median of the numbers on stdin (spaces or lines).
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# paired "A1 A2 ..." "B1 B2 ...": A/B round by round, and a 90% bootstrap
# interval for the median of those ratios (bench/stats.py).
paired() {
PYTHONPATH=bench python3 - "$1" "$2" <<'PY'
import random, sys
from stats import median_interval
r = [float(a) / float(b) for a, b in zip(sys.argv[1].split(), sys.argv[2].split())]
m, lo, hi = median_interval(r, random.Random(1))
print("  per round:", " ".join(f"{x:.2f}" for x in r), f"; median {m:.2f}, 90% interval [{lo:.2f}, {hi:.2f}]")
PY
}
