#!/usr/bin/env bash
# Every script in bench/ once, at its shortest: they are issue 5's
# evidence, and nothing else runs them between the sessions that measure.
# A script that stops fails this (a switch serve no longer accepts, an
# example that moved, an answer that is not the upstream's 200); the
# figures a second or two a target prints are not read, only that each
# script gets to its summary line.
#
# Built without LTO and with 16 codegen units, in target/bench-smoke so
# a measured build in target/release is left alone: about a minute of
# build on two cores instead of four. The figures are not kept anyway.
#
# Needs: apt-get install wrk haproxy nginx-light valgrind nghttp2-client
#        apache2-utils openssl
# Usage: bench/smoke.sh   (about 4 minutes after the build; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/bench-smoke}
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT
failed=0

# run NAME LAST_LINE_PATTERN [VAR=value...] SCRIPT [ARGS...]: the script's
# output in $LOG/NAME; it must exit 0 and print a line matching the
# pattern.
run() {
  local name=$1 want=$2 t0=$SECONDS rc=0
  shift 2
  env "$@" > "$LOG/$name" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ] || ! grep -qE "$want" "$LOG/$name"; then
    echo "FAIL $name (exit $rc, $((SECONDS - t0)) s):"
    tail -20 "$LOG/$name" | sed 's/^/  /'
    failed=$((failed + 1))
  else
    echo "ok   $name ($((SECONDS - t0)) s)"
  fi
}

# The first one builds (every script builds what it needs; the rest find
# it built).
run load '^p99 added over direct' RUNS=1 PACED_RUNS=1 bash bench/load.sh 1 8
run cputime '^nginx / sg-pat' PAIRS=2 DUR=1 bash bench/cputime.sh
run cputime-post '^nginx / sg-pat' PAIRS=2 DUR=1 METHOD=POST bash bench/cputime.sh
run cputime-close '^nginx / sg-pat' PAIRS=2 DUR=1 CONN=close bash bench/cputime.sh
run cputime-h1.0 '^nginx / sg-pat' PAIRS=2 DUR=1 PROTO=h1.0 bash bench/cputime.sh
run cputime-h2 '^nginx / sg-pat' PAIRS=2 DUR=1 PROTO=h2 bash bench/cputime.sh
run cputime-tls '^nginx / sg-pat' PAIRS=2 DUR=1 TLS=1 bash bench/cputime.sh
run cputime-base '^sg-pat / sg-base' PAIRS=2 DUR=1 SG_BASE="$CARGO_TARGET_DIR/release/scopegate" bash bench/cputime.sh
# One target of each kind the script tells apart: each switch serve
# reads, the JWT, h2, a connection each, a late body, Expect.
run instructions '^access log on vs off, PAT' \
  TARGETS="nginx sg-pat sg-jwt sg-pat-log sg-pat-hyper sg-pat-hyper-srv nginx-h2 sg-h2 nginx-close sg-close sg-10 sg-post-late sg-post-expect" \
  bash bench/instructions.sh 2 4
run floor '^p99 added over direct' CYCLES=2 bash bench/floor.sh
run handshake '^nginx / scopegate, reuse' ROUNDS=1 DUR=1 bash bench/handshake.sh
run uploads '^medians, own loop' ROUNDS=1 DUR=1 CONNS=8 BODY=65536 bash bench/uploads.sh
run accesslog '^round 1 +log-off' ROUNDS=1 DUR=1 bash bench/accesslog.sh
run memory '^soak 30s' bash bench/memory.sh 30
run memory-tls '^soak 30s' TLS=1 FILL=2 bash bench/memory.sh 30

[ "$failed" -eq 0 ] || { echo "bench smoke: $failed script(s) failed"; exit 1; }
echo "bench smoke: every script ran"
