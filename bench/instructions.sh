#!/usr/bin/env bash
# User-space instructions per proxied request, counted by cachegrind: a
# figure that does not move with the neighbours of a shared VM, for A/B
# work on the hot path where wrk's req/s swings by 10-25% run to run.
#
#   nginx     plain reverse proxy, no auth (the same config as bench/load.sh)
#   sg-pat    scopegate, PAT
#   sg-jwt    scopegate, the ES256 JWT (cached after the first request)
#   sg-pat-hyper  scopegate, PAT, with SCOPEGATE_UPSTREAM_CLIENT=hyper: the
#             baseline for the in-future upstream client (src/h1.rs)
#   sg-pat-hyper-srv  scopegate, PAT, with SCOPEGATE_HTTP1_SERVER=hyper: the
#             baseline for the own HTTP/1 server loop (src/server/fast.rs)
#   nginx-post, sg-post, sg-post-hyper-srv  the same with POST and a
#             256-byte JSON body in the same write as the head
#   nginx-post-late, sg-post-late, sg-post-late-hyper-srv  the same body
#             written 5 ms after its head, as clients that write the two
#             separately send it (the own loop streams it)
#   nginx-post-64k, sg-post-64k, sg-post-64k-hyper-srv  a 64 KiB body in
#             the same write as the head: over the 16 KiB the own loop
#             takes whole, so streamed
#   nginx-post-expect, sg-post-expect, sg-post-expect-hyper-srv  the
#             256-byte body with `Expect: 100-continue`, sent once the
#             proxy answers `100 Continue`, as curl sends a large upload
#   sg-pat-log, sg-jwt-log  sg-pat and sg-jwt with the access log on, as
#             it is by default (SCOPEGATE_LOG=info; the others run with
#             warn); the lines go to /dev/null
#   nginx-close, sg-close, sg-close-hyper-srv  GET with `Connection: close`,
#             each request on a connection of its own: the cost of a
#             client that does not keep its connection (accepting, the
#             connection's task and state, closing)
#   nginx-10, sg-10, sg-10-hyper-srv  GET in HTTP/1.0 without keep-alive,
#             a connection each: what `ab` sends by default
#   nginx-head, sg-head, sg-head-hyper-srv  HEAD on one keep-alive
#             connection: what health checks send
#   nginx-h2, sg-h2  GET over HTTP/2 without TLS (h2c, prior knowledge),
#             sent by h2load one at a time on one connection; the upstream
#             side stays HTTP/1.1 for both
#
# Each target runs twice under valgrind, serving N1 and then N2 requests
# one after another on one keep-alive connection (the -close and -10 targets: on
# a new connection each); (I(N2) - I(N1)) / (N2 - N1)
# is the cost of one request with start-up and shutdown cancelled out.
# Kernel time is not counted: `strace -c` shows the same four socket calls
# per request for both proxies (2 recvfrom, 2 writev).
#
# valgrind does not emulate the SHA extensions, so the sha2 crate takes its
# portable path under it (about ten times the instructions of SHA-NI). The
# column "w/o sha256" leaves those functions out.
#
# Needs: apt-get install valgrind nginx-light nghttp2-client
# Usage: [TARGETS="..."] [SG_BIN=path] bench/instructions.sh [N1] [N2]
#        (default 200 2200; SG_BIN: another scopegate binary to count, as
#        an A/B baseline, instead of this tree's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${1:-200}
N2=${2:-2200}
for tool in valgrind cg_annotate nginx python3 h2load; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install valgrind nginx-light nghttp2-client" >&2; exit 1; }
done
cargo build --release --quiet --bin scopegate --example fast_upstream --example mint_jwt
. bench/common.sh
start_work
SG_BIN=${SG_BIN:-$BIN/scopegate}

UP=18181 NG=18182 SG=18184 NG2=18183

"$BIN/examples/fast_upstream" "127.0.0.1:$UP" 1 2>/dev/null & PIDS+=($!)
wait_port $UP

# nginx must stay in the foreground process for valgrind to count it.
nginx_conf "$WORK/nginx" $NG $UP "master_process off;"
NGINX_LISTEN=http2 nginx_conf "$WORK/nginx-h2" $NG2 $UP "master_process off;"
PAT=$(mint_pat "$WORK")
gateway_conf "$WORK/gateway.yaml" $SG $UP
JWT=$(mint_jwt)

# N requests in sequence on one keep-alive connection, or with "close" each
# on a connection of its own with `Connection: close`; every answer must be
# 200.
cat > "$WORK/client.py" <<'PY'
import socket, sys, time
port, n, path, token, method, conn, version = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
auth = f"Authorization: Bearer {token}\r\n" if token else ""
# HTTP/1.0 closes without being asked.
close = "Connection: close\r\n" if conn == "close" and version == "1.1" else ""
late = None
expect = False
if method.startswith("POST"):
    body = ('{"marker": "' + "m" * 242 + '"}').encode()
    assert len(body) == 256
    if method == "POST-64k":
        body = ('{"marker": "' + "m" * (65536 - 14) + '"}').encode()
        assert len(body) == 65536
    req = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}{close}content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    if method == "POST-expect":
        req = req.replace(b"content-type:", b"Expect: 100-continue\r\ncontent-type:")
    if method in ("POST-late", "POST-expect"):
        req, late = req[:-len(body)], body
    expect = method == "POST-expect"
    method = "POST"
else:
    req = f"{method} {path} HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n{auth}{close}\r\n".encode()

def continue_(s, buf):
    """Read `100 Continue` from s (after buf); return what follows it."""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed before 100 Continue")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 100"):
        sys.exit(f"answered before 100 Continue: {head.splitlines()[0]!r}")
    return rest

def answer(s, buf):
    """Read one answer from s (after buf); return what follows it."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, v = line.split(":", 1)
                # An answer to HEAD has no body, whatever its length says.
                if k.strip().lower() == "content-length" and method != "HEAD":
                    length = int(v)
            if len(buf) >= end + 4 + length:
                # nginx answers HTTP/1.0 in HTTP/1.1, hyper in HTTP/1.0.
                if not (head.startswith("HTTP/1.1 200") or head.startswith("HTTP/1.0 200")):
                    sys.exit(f"answered: {head.splitlines()[0]}")
                return buf[end + 4 + length:]
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed")
        buf += data

if conn == "close":
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        answer(s, b"")
        # The proxy closes: nothing may follow the answer.
        if s.recv(65536):
            sys.exit("bytes after the answer")
        s.close()
else:
    s = socket.create_connection(("127.0.0.1", port))
    buf = b""
    for _ in range(n):
        s.sendall(req)
        if late and expect:
            buf = continue_(s, buf)
            s.sendall(late)
        elif late:
            time.sleep(0.005)
            s.sendall(late)
        buf = answer(s, buf)
PY

# count NAME N -> "total sha256" instructions of one run serving N requests.
count() {
  local name=$1 n=$2 port pid out="$WORK/cg.$1.$2"
  case $name in
    nginx*)
      local conf=nginx
      port=$NG
      [ "$name" = nginx-h2 ] && { conf=nginx-h2; port=$NG2; }
      valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out" \
        nginx -p "$WORK/$conf" -c "$WORK/$conf/nginx.conf" 2>"$WORK/vg.err" & pid=$! ;;
    sg-*)
      port=$SG
      local client=in-future server=own
      local log=warn
      [ "$name" = sg-pat-hyper ] && client=hyper
      case $name in *-hyper-srv) server=hyper ;; esac
      case $name in *-log) log=info ;; esac
      SCOPEGATE_UPSTREAM_CLIENT=$client SCOPEGATE_HTTP1_SERVER=$server SCOPEGATE_WORKERS=1 SCOPEGATE_LOG=$log valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out" \
        "$SG_BIN" serve --config "$WORK/gateway.yaml" >/dev/null 2>"$WORK/vg.err" & pid=$! ;;
  esac
  wait_port "$port"
  local token=""
  case $name in
    sg-pat | sg-pat-log | sg-pat-hyper | sg-pat-hyper-srv | sg-post | sg-post-hyper-srv | sg-h2 | sg-close | sg-close-hyper-srv | sg-10 | sg-10-hyper-srv | sg-head | sg-head-hyper-srv | sg-post-late | sg-post-late-hyper-srv | sg-post-64k | sg-post-64k-hyper-srv | sg-post-expect | sg-post-expect-hyper-srv) token=$PAT ;;
    sg-jwt | sg-jwt-log) token=$JWT ;;
  esac
  local method=GET conn=keep version=1.1
  case $name in *post-late*) method=POST-late ;; *post-64k*) method=POST-64k ;; *post-expect*) method=POST-expect ;; *post*) method=POST ;; *head*) method=HEAD ;; esac
  case $name in *-close* | *-10*) conn=close ;; esac
  case $name in *-10*) version=1.0 ;; esac
  case $name in
    *-h2)
      # One connection, one request at a time, like the HTTP/1 client;
      # every answer must be 2xx.
      h2load -n "$n" -c 1 -m 1 ${token:+-H "Authorization: Bearer $token"} \
        "http://127.0.0.1:$port$PATH_OK" > "$WORK/h2load" 2>&1 || { kill $pid; return 1; }
      grep -q "^status codes: $n 2xx" "$WORK/h2load" || { sed -n '/^requests:/,/^status/p' "$WORK/h2load" >&2; kill $pid; return 1; } ;;
    *) python3 "$WORK/client.py" "$port" "$n" "$PATH_OK" "$token" "$method" "$conn" "$version" || { kill $pid; return 1; } ;;
  esac
  case $name in nginx*) kill -QUIT $pid ;; *) kill -TERM $pid ;; esac
  wait $pid || true
  local total sha
  total=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }' < <(cg_annotate "$out" 2>/dev/null))
  sha=$(cg_annotate "$out" 2>/dev/null | awk '/sha2::sha256/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
  echo "$total $sha"
}

declare -A PER NOSHA
TARGETS=${TARGETS:-"nginx sg-pat sg-jwt sg-pat-log sg-jwt-log sg-pat-hyper sg-pat-hyper-srv nginx-post sg-post sg-post-hyper-srv nginx-h2 sg-h2 nginx-close sg-close sg-close-hyper-srv nginx-10 sg-10 sg-10-hyper-srv nginx-head sg-head sg-head-hyper-srv nginx-post-late sg-post-late sg-post-late-hyper-srv nginx-post-64k sg-post-64k sg-post-64k-hyper-srv nginx-post-expect sg-post-expect sg-post-expect-hyper-srv"}
for t in $TARGETS; do
  # An assignment keeps the status of its substitution: a failed client
  # stops the script instead of printing nonsense.
  r1=$(count $t "$N1")
  r2=$(count $t "$N2")
  read -r a1 s1 <<<"$r1"
  read -r a2 s2 <<<"$r2"
  PER[$t]=$(( (a2 - a1) / (N2 - N1) ))
  NOSHA[$t]=$(( (a2 - s2 - a1 + s1) / (N2 - N1) ))
done

echo
echo "user-space instructions per request (cachegrind; $N1 and $N2 requests on one keep-alive connection, -close and -10 targets a connection each)"
printf '%-17s %12s %12s %16s\n' target "instr/req" "w/o sha256" "vs nginx (w/o)"
for t in $TARGETS; do
  # POST targets against nginx with POST, h2 against nginx over h2.
  base=nginx
  case $t in *post-late*) base=nginx-post-late ;; *post-64k*) base=nginx-post-64k ;; *post-expect*) base=nginx-post-expect ;; *post*) base=nginx-post ;; *-h2) base=nginx-h2 ;; *close*) base=nginx-close ;; *-10*) base=nginx-10 ;; *head*) base=nginx-head ;; esac
  # Without its nginx target in TARGETS, the last column is left empty.
  vs=""
  [ -n "${NOSHA[$base]:-}" ] && vs=$(awk -v a="${NOSHA[$t]}" -v b="${NOSHA[$base]}" 'BEGIN { printf "%.2fx", a / b }')
  printf '%-17s %12d %12d %16s\n' "$t" "${PER[$t]}" "${NOSHA[$t]}" "$vs"
done
ratio() {
  [ -n "${NOSHA[$2]:-}" ] && [ -n "${NOSHA[$3]:-}" ] || return 0
  printf '%s (%s / %s, w/o sha256): %.2fx\n' "$1" "$2" "$3" "$(awk -v a="${NOSHA[$2]}" -v b="${NOSHA[$3]}" 'BEGIN { print a / b }')"
}
ratio "in-future client vs hyper client" sg-pat sg-pat-hyper
ratio "own HTTP/1 loop vs hyper server" sg-pat sg-pat-hyper-srv
ratio "own HTTP/1 loop vs hyper server, POST" sg-post sg-post-hyper-srv
ratio "own HTTP/1 loop vs hyper server, a connection each" sg-close sg-close-hyper-srv
ratio "own HTTP/1 loop vs hyper server, HTTP/1.0" sg-10 sg-10-hyper-srv
ratio "own HTTP/1 loop vs hyper server, HEAD" sg-head sg-head-hyper-srv
ratio "own HTTP/1 loop vs hyper server, POST with a late body" sg-post-late sg-post-late-hyper-srv
ratio "own HTTP/1 loop vs hyper server, POST of 64 KiB" sg-post-64k sg-post-64k-hyper-srv
ratio "own HTTP/1 loop vs hyper server, POST with Expect: 100-continue" sg-post-expect sg-post-expect-hyper-srv
ratio "access log on vs off, PAT" sg-pat-log sg-pat
ratio "access log on vs off, ES256" sg-jwt-log sg-jwt
