#!/usr/bin/env bash
# benches/peers.sh: portshift side by side with HAProxy (mode tcp) and nginx
# (stream module), on loopback only. See benches/peers/README.md.
#
#   bash benches/peers.sh            full run: 5 s per measurement, 3 rounds, layouts A and B
#   bash benches/peers.sh --smoke    a quick end-to-end check for CI (numbers never fail it)
#
# Exit codes: 0 ok; 1 a proxy or backend failed to start or to forward;
# 2 bad usage or missing binary; 3 a measurement tool failed to run.
set -uo pipefail

usage() {
	cat <<'EOF'
usage: bash benches/peers.sh [--smoke] [--layout A|B|AB] [--duration SECS] [--rounds N]
                             [--conns N] [--only LIST] [--keep-work]
  --smoke        tiny durations, one round, few idle connections (CI); exit 0 if the tools ran
  --layout L     A: proxy alone on CPU 1, load generators and backends on CPU 0
                 B: everything on CPU 0                     (default: AB; smoke: B)
  --duration S   seconds per wrk/iperf3 measurement         (default 5; smoke 1)
  --rounds N     interleaved rounds                         (default 3; smoke 1)
  --conns N      idle connections for the memory figure     (default 10000, capped by the fd limit)
  --only LIST    comma-separated subset of: iperf1,iperf8,ka,close,redis,redis16,tele,
                 tls_ka,tls_close,sni,alog,memory
                 (default: all), e.g. --only close --rounds 10 to narrow one row's spread
  --keep-work    keep the temp dir (configs, logs, raw outputs) for inspection
env: PORTSHIFT_BIN (default target/release/portshift), PYTHON (default python3)
EOF
}

MODE=full
LAYOUTS=""
DUR=""
ROUNDS=""
MEM_CONNS=""
KEEP_WORK=0
ONLY=""
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) MODE=smoke ;;
	--layout) LAYOUTS="${2:?}"; shift ;;
	--duration) DUR="${2:?}"; shift ;;
	--rounds) ROUNDS="${2:?}"; shift ;;
	--conns) MEM_CONNS="${2:?}"; shift ;;
	--only) ONLY="${2:?}"; shift ;;
	--keep-work) KEEP_WORK=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done
for t in ${ONLY//,/ }; do
	case "$t" in iperf1 | iperf8 | ka | close | redis | redis16 | tele | tls_ka | tls_close | sni | alog | memory) ;; *) echo "--only: unknown measurement '$t'" >&2; exit 2 ;; esac
done
# wanted NAME: is this measurement in the run (all of them without --only)?
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
case "${LAYOUTS:=$([ "$MODE" = smoke ] && echo B || echo AB)}" in A | B | AB) ;; *) echo "--layout must be A, B or AB" >&2; exit 2 ;; esac

if [ "$MODE" = smoke ]; then
	DUR=${DUR:-1}; ROUNDS=${ROUNDS:-1}
	REDIS_N_PLAIN=2000; REDIS_N_PIPE=20000   # fixed, no calibration
	MEM_WANT=${MEM_CONNS:-200}
	SETTLE=0.2
	MEM_SETTLE=0.3
	IPERF_LEN=(-n 256M)                     # wrk cannot go below 1 s, iperf3 can
else
	DUR=${DUR:-5}; ROUNDS=${ROUNDS:-3}
	REDIS_SECS=3                              # per redis-benchmark test (SET, GET), calibrated
	MEM_WANT=${MEM_CONNS:-10000}
	SETTLE=0.5
	MEM_SETTLE=1
	IPERF_LEN=(-t "$DUR")
fi
WRK_CONNS=50
REDIS_CLIENTS=50

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PS_BIN="${PORTSHIFT_BIN:-$ROOT/target/release/portshift}"
PY="${PYTHON:-python3}"
TOOL=("$PY" "$HERE/peers/peers.py")
RESULTS="$ROOT/benches/results"

log() { echo "[peers $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=peers/common.sh
source "$HERE/peers/common.sh"

[ -x "$PS_BIN" ] || { log "no portshift binary at $PS_BIN (run: cargo build --release)"; exit 2; }
command -v "$PY" >/dev/null || { log "python3 not found"; exit 2; }
# The interpreter itself, not a wrapper (pyenv shims), so signals reach it by pid.
PY="$("$PY" -c 'import sys; print(sys.executable)')"

# ------------------------------------------------------------------ tools
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
NGX_STREAM_SO=/usr/lib/nginx/modules/ngx_stream_module.so
if [ ! -e "$NGX_STREAM_SO" ] && ! { command -v nginx >/dev/null && nginx -V 2>&1 | grep -q -- '--with-stream\( \|$\)'; }; then
	need+=(libnginx-mod-stream)
fi
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v ss >/dev/null || need+=(iproute2)
command -v taskset >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
install_missing ${need[@]+"${need[@]}"}
LOAD_STREAM=""
[ -e "$NGX_STREAM_SO" ] && LOAD_STREAM="load_module $NGX_STREAM_SO;"

# ------------------------------------------------------------------ CPUs, fd limit
NPROC=$(nproc)
LG_CPU=0   # load generators and backends
if [ "$NPROC" -lt 2 ] && [[ "$LAYOUTS" == *A* ]]; then
	log "only $NPROC CPU: layout A needs 2; running layout B only"
	LAYOUTS=B
fi
proxy_cpu() { if [ "$1" = A ]; then echo 1; else echo 0; fi; }

FD_HARD=$(ulimit -Hn)
[ "$FD_HARD" = unlimited ] && FD_HARD=1048576
FD=$FD_HARD
[ "$FD" -gt 1048576 ] && FD=1048576
ulimit -n "$FD" 2>/dev/null || FD=$(ulimit -n)
# A proxy needs two fds per proxied connection (client + upstream) plus a few.
MEM_MAX=$(( (FD - 200) / 2 / 100 * 100 ))
MEM_CONNS=$MEM_WANT
NOTES=()
FAILS=()
if [ "$MEM_CONNS" -gt "$MEM_MAX" ] && wanted memory; then
	NOTES+=("fd hard limit is $FD_HARD (raising it needs CAP_SYS_RESOURCE): memory measured with $MEM_MAX idle connections instead of $MEM_WANT")
	MEM_CONNS=$MEM_MAX
fi
HAP_MAXCONN=$(( (FD - 100) / 2 ))
NGX_WORKER_CONNS=$(( FD - 100 ))

# ------------------------------------------------------------------ processes, cleanup
WORK="$(mktemp -d /tmp/portshift-peers.XXXXXX)"
# Run a private copy of the binary: a rebuild during the run cannot swap it.
PS_SRC="$PS_BIN"
PS_MTIME=$(stat -c %Y "$PS_SRC")
cp "$PS_SRC" "$WORK/portshift"
PS_BIN="$WORK/portshift"
PS_SHA=$(sha256sum "$PS_BIN" | cut -c1-16)
# One ECDSA P-256 certificate for every TLS row (the name wrk sends, and
# the one curl's forwarding check asks for); HAProxy reads it with its key.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
	-subj /CN=bench.test -addext "subjectAltName=IP:127.0.0.1,DNS:bench.test" \
	-keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>"$WORK/openssl.err" || { cat "$WORK/openssl.err" >&2; die "openssl req failed"; }
cat "$WORK/tls.pem" "$WORK/tls.key" >"$WORK/tls.both.pem"
PIDS=()
stop_pid() {
	local pid=$1
	[ -n "$pid" ] || return 0
	stop_group "$pid" 5
	local keep=() p
	for p in "${PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
	PIDS=("${keep[@]}")
	return 0
}
cleanup() {
	trap - EXIT INT TERM
	local i
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
	if [ "$KEEP_WORK" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# spawn NAME CPU CMD...: start CMD pinned to CPU in its own session; sets LAST_PID.
spawn() {
	local name=$1 cpu=$2
	shift 2
	setsid taskset -c "$cpu" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
	LAST_PID=$!
	PIDS+=("$LAST_PID")
}
listening() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
wait_listen() { # PORT PID [SECS]
	local port=$1 pid=$2 n=$(( ${3:-10} * 10 ))
	while [ $n -gt 0 ]; do
		listening "$port" && return 0
		kill -0 "$pid" 2>/dev/null || return 1
		sleep 0.1
		n=$((n - 1))
	done
	return 1
}

# ------------------------------------------------------------------ ports
USED_PORTS=" $(ss -Htan 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u | tr '\n' ' ') "
NEXT_PORT=$(( 20000 + RANDOM % 9000 ))   # below the ephemeral range (32768+)
declare -A PORT
alloc_port() { # KEY
	local p
	while :; do
		p=$NEXT_PORT
		NEXT_PORT=$((NEXT_PORT + 1))
		[[ "$USED_PORTS" == *" $p "* ]] && continue
		listening "$p" && continue
		PORT[$1]=$p
		return
	done
}
SERVICES=(iperf http redis sink)
# TLS rows: `tls` terminates TLS in front of the HTTP backend; `sni` reads
# the ClientHello's server name and passes TLS through to an HTTPS backend.
EDGE=(tls sni)
# psoff: [stats] record = false; pscopy: splice = false; psalog: access_log on.
PROXY_IDS=(ps hap ngx psoff pscopy psalog)
for s in "${SERVICES[@]}" https; do alloc_port "be.$s"; done
for p in "${PROXY_IDS[@]}"; do for s in "${SERVICES[@]}" "${EDGE[@]}"; do alloc_port "$p.$s"; done; done
declare -A NAME=([ps]=portshift [hap]=haproxy [ngx]=nginx [psoff]=portshift-record-off [pscopy]=portshift-splice-off [psalog]=portshift-access-log)

# ------------------------------------------------------------------ configs
write_portshift() { # ID RECORD SPLICE ACCESS_LOG
	local id=$1 rec=$2 splice=${3:-true} alog=${4:-false} f="$WORK/$1.toml" s
	{
		echo 'drain_timeout = "1s"'
		[ "$alog" = true ] && echo "access_log = \"$WORK/$id-access.jsonl\""
		echo
		echo '[stats]'
		echo "record = $rec"
		for s in "${SERVICES[@]}"; do
			printf '\n[[group]]\nname = "%s"\nbackends = ["127.0.0.1:%s"]\n' "$s" "${PORT[be.$s]}"
		done
		for s in "${SERVICES[@]}"; do
			printf '\n[[listener]]\nname = "%s"\nlisten = ["127.0.0.1:%s"]\nprimary = "%s"\nidle_timeout = "15m"\nsplice = %s\n' \
				"$s" "${PORT[$id.$s]}" "$s" "$splice"
		done
		printf '\n[[group]]\nname = "https"\nbackends = ["127.0.0.1:%s"]\n' "${PORT[be.https]}"
		printf '\n[[listener]]\nname = "tls"\nlisten = ["127.0.0.1:%s"]\nprimary = "http"\nidle_timeout = "15m"\n' "${PORT[$id.tls]}"
		printf 'tls = { cert = "%s", key = "%s" }\n' "$WORK/tls.pem" "$WORK/tls.key"
		printf '\n[[listener]]\nname = "sni"\nlisten = ["127.0.0.1:%s"]\nidle_timeout = "15m"\n' "${PORT[$id.sni]}"
		printf '[[listener.route]]\nname = "bench"\nsni = ["127.0.0.1", "bench.test"]\nprimary = "https"\n'
	} >"$f"
	"$PS_BIN" check -c "$f" >/dev/null 2>"$WORK/$id.check.err" || { cat "$WORK/$id.check.err" >&2; die "portshift rejected $f"; }
}
write_haproxy() {
	local s
	{
		cat <<EOF
global
    nbthread 1
    maxconn $HAP_MAXCONN

defaults
    mode tcp
    timeout connect 5s
    timeout client 15m
    timeout server 15m
    maxconn $HAP_MAXCONN
EOF
		for s in "${SERVICES[@]}"; do
			printf '\nlisten %s\n    bind 127.0.0.1:%s\n    server s1 127.0.0.1:%s\n' "$s" "${PORT[hap.$s]}" "${PORT[be.$s]}"
		done
		printf '\nlisten tls\n    bind 127.0.0.1:%s ssl crt %s\n    server s1 127.0.0.1:%s\n' \
			"${PORT[hap.tls]}" "$WORK/tls.both.pem" "${PORT[be.http]}"
		printf '\nfrontend sni\n    bind 127.0.0.1:%s\n    tcp-request inspect-delay 5s\n' "${PORT[hap.sni]}"
		printf '    tcp-request content accept if { req_ssl_hello_type 1 }\n'
		printf '    use_backend sni_bench if { req_ssl_sni -i 127.0.0.1 bench.test }\n'
		printf '\nbackend sni_bench\n    server s1 127.0.0.1:%s\n' "${PORT[be.https]}"
	} >"$WORK/hap.cfg"
	haproxy -c -q -f "$WORK/hap.cfg" >&2 || die "haproxy rejected $WORK/hap.cfg"
}
write_nginx_stream() {
	local s
	mkdir -p "$WORK/ngx"
	{
		cat <<EOF
$LOAD_STREAM
user root;
worker_processes 1;
worker_rlimit_nofile $FD;
daemon off;
master_process on;
pid $WORK/ngx/nginx.pid;
error_log $WORK/ngx/error.log warn;
events { worker_connections $NGX_WORKER_CONNS; }
stream {
    proxy_connect_timeout 5s;
    proxy_timeout 15m;
EOF
		for s in "${SERVICES[@]}"; do
			printf '    server { listen 127.0.0.1:%s; proxy_pass 127.0.0.1:%s; }\n' "${PORT[ngx.$s]}" "${PORT[be.$s]}"
		done
		printf '    server { listen 127.0.0.1:%s ssl; ssl_certificate %s; ssl_certificate_key %s; proxy_pass 127.0.0.1:%s; }\n' \
			"${PORT[ngx.tls]}" "$WORK/tls.pem" "$WORK/tls.key" "${PORT[be.http]}"
		printf '    map $ssl_preread_server_name $sni_upstream { 127.0.0.1 127.0.0.1:%s; bench.test 127.0.0.1:%s; default 127.0.0.1:1; }\n' \
			"${PORT[be.https]}" "${PORT[be.https]}"
		printf '    server { listen 127.0.0.1:%s; ssl_preread on; proxy_pass $sni_upstream; }\n' "${PORT[ngx.sni]}"
		echo "}"
	} >"$WORK/ngx.conf"
	nginx -t -q -p "$WORK/ngx/" -e "$WORK/ngx/error.log" -c "$WORK/ngx.conf" >&2 || die "nginx rejected $WORK/ngx.conf"
}
write_nginx_http() {
	write_http_backend "$WORK/http.conf" "$WORK/http" "${PORT[be.http]}" "$FD"
	nginx -t -q -p "$WORK/http/" -e "$WORK/http/error.log" -c "$WORK/http.conf" >&2 || die "nginx rejected $WORK/http.conf"
	# The HTTPS backend behind the `sni` rows: the same server over TLS.
	write_http_backend "$WORK/https.conf" "$WORK/https" "${PORT[be.https]}" "$FD"
	sed -i "s|listen 127.0.0.1:${PORT[be.https]} backlog=4096;|listen 127.0.0.1:${PORT[be.https]} ssl backlog=4096; ssl_certificate $WORK/tls.pem; ssl_certificate_key $WORK/tls.key;|" "$WORK/https.conf"
	nginx -t -q -p "$WORK/https/" -e "$WORK/https/error.log" -c "$WORK/https.conf" >&2 || die "nginx rejected $WORK/https.conf"
}

write_portshift ps true
write_portshift psoff false
write_portshift pscopy true false
write_portshift psalog true true true
write_haproxy
write_nginx_stream
write_nginx_http

# ------------------------------------------------------------------ start / stop
declare -A PXPID
start_proxy() { # ID CPU
	local id=$1 cpu=$2 s
	case "$id" in
	ps | psoff | pscopy | psalog) spawn "$id" "$cpu" env RUST_LOG=warn "$PS_BIN" run -c "$WORK/$id.toml" ;;
	hap) spawn hap "$cpu" haproxy -db -f "$WORK/hap.cfg" ;;
	ngx) spawn ngx "$cpu" nginx -p "$WORK/ngx/" -e "$WORK/ngx/error.log" -c "$WORK/ngx.conf" ;;
	esac
	PXPID[$id]=$LAST_PID
	for s in "${SERVICES[@]}" "${EDGE[@]}"; do
		wait_listen "${PORT[$id.$s]}" "$LAST_PID" 10 || {
			cat "$WORK/$id.err" "$WORK/ngx/error.log" 2>/dev/null | tail -20 >&2
			die "${NAME[$id]} did not start listening on 127.0.0.1:${PORT[$id.$s]}"
		}
	done
}
stop_proxy() { stop_pid "${PXPID[$1]:-}"; PXPID[$1]=""; }
# The process whose RSS counts: nginx's worker, otherwise the process itself.
rss_pid() {
	local pid=${PXPID[$1]}
	if [ "$1" = ngx ]; then pgrep -P "$pid" | head -1; else echo "$pid"; fi
}

start_backends() {
	spawn iperf3-server "$LG_CPU" iperf3 -s -B 127.0.0.1 -p "${PORT[be.iperf]}"
	BE_IPERF_PID=$LAST_PID
	wait_listen "${PORT[be.iperf]}" "$LAST_PID" 10 || die "iperf3 -s did not start"
	spawn http-backend "$LG_CPU" nginx -p "$WORK/http/" -e "$WORK/http/error.log" -c "$WORK/http.conf"
	wait_listen "${PORT[be.http]}" "$LAST_PID" 10 || die "nginx HTTP backend did not start"
	spawn https-backend "$LG_CPU" nginx -p "$WORK/https/" -e "$WORK/https/error.log" -c "$WORK/https.conf"
	wait_listen "${PORT[be.https]}" "$LAST_PID" 10 || die "nginx HTTPS backend did not start"
	spawn redis "$LG_CPU" redis-server --port "${PORT[be.redis]}" --bind 127.0.0.1 --save "" \
		--appendonly no --protected-mode no --dir "$WORK" --maxclients 4000
	wait_listen "${PORT[be.redis]}" "$LAST_PID" 10 || die "redis-server did not start"
}
restart_iperf_server() {
	stop_pid "$BE_IPERF_PID"
	spawn iperf3-server "$LG_CPU" iperf3 -s -B 127.0.0.1 -p "${PORT[be.iperf]}"
	BE_IPERF_PID=$LAST_PID
	wait_listen "${PORT[be.iperf]}" "$LAST_PID" 10 || die "iperf3 -s did not restart"
}

# Forwarding check: a proxy that does not forward fails the run, in every mode.
check_forward() { # ID
	local id=$1
	"${TOOL[@]}" check-http "${PORT[$id.http]}" backend || die "${NAME[$id]}: HTTP through 127.0.0.1:${PORT[$id.http]} failed"
	"${TOOL[@]}" check-redis "${PORT[$id.redis]}" || die "${NAME[$id]}: redis PING through 127.0.0.1:${PORT[$id.redis]} failed"
	timeout 20 iperf3 -c 127.0.0.1 -p "${PORT[$id.iperf]}" -n 1M >"$WORK/check-iperf.out" 2>&1 ||
		{ cat "$WORK/check-iperf.out" >&2; die "${NAME[$id]}: iperf3 through 127.0.0.1:${PORT[$id.iperf]} failed"; }
	local s got
	for s in "${EDGE[@]}"; do
		got=$(curl -s --max-time 10 --cacert "$WORK/tls.pem" --resolve "bench.test:${PORT[$id.$s]}:127.0.0.1" \
			"https://bench.test:${PORT[$id.$s]}/" 2>&1)
		[ "$got" = backend ] || die "${NAME[$id]}: HTTPS ($s) through 127.0.0.1:${PORT[$id.$s]} failed: $got"
	done
}

# ------------------------------------------------------------------ measurements
RAW="$WORK/raw.tsv"
: >"$RAW"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; }   # layout key proxy round value
fail() { FAILS+=("$*"); log "FAILED: $*"; }
# Proxy CPU time (user+system, all threads; nginx: the worker), microseconds.
cpu_us() { "${TOOL[@]}" cpu "$(rss_pid "$1")" 2>/dev/null || echo 0; }
per() { awk -v a="$1" -v b="$2" -v k="${3:-1}" 'BEGIN{ if (b > 0) printf "%.4f", a * k / b; else print "nan" }'; }

m_iperf() { # LAYOUT ID ROUND STREAMS
	local L=$1 id=$2 r=$3 n=$4 out="$WORK/iperf.json" v bytes c0 c1
	c0=$(cpu_us "$id")
	if ! timeout $((DUR + 30)) taskset -c "$LG_CPU" iperf3 -c 127.0.0.1 -p "${PORT[$id.iperf]}" \
		"${IPERF_LEN[@]}" -P "$n" -J >"$out" 2>"$WORK/iperf.err"; then
		fail "iperf3 -P $n through ${NAME[$id]} (layout $L): $(tail -c 300 "$WORK/iperf.err"; grep -o '"error":.*' "$out" | head -1)"
		restart_iperf_server
	fi
	c1=$(cpu_us "$id")
	read -r v bytes < <("${TOOL[@]}" parse-iperf "$out")
	record "$L" "iperf$n" "${NAME[$id]}" "$r" "$v"
	# ms of proxy CPU per GB received (iperf3 counts data only, not its control connection)
	record "$L" "iperf${n}_cpu" "${NAME[$id]}" "$r" "$(per $((c1 - c0)) "$bytes" 1000000)"
	log "  $L iperf3 -P $n  ${NAME[$id]}: $v Gbit/s, proxy CPU $(((c1 - c0) / 1000)) ms"
}
# m_wrk LAYOUT ID ROUND ka|close|tele|tls_ka|tls_close|sni_close|alog
m_wrk() {
	local L=$1 id=$2 r=$3 kind=$4 out="$WORK/wrk.out" rps p50 p99 err nreq c0 c1 cpr
	local args=(-t1 -c"$WRK_CONNS" -d"${DUR}s" --latency) url="http://127.0.0.1:${PORT[$id.http]}/"
	case "$kind" in
	close | tls_close | sni_close | alog) args+=(-H 'Connection: close') ;;
	esac
	case "$kind" in
	tls_*) url="https://127.0.0.1:${PORT[$id.tls]}/" ;;
	sni_*) url="https://127.0.0.1:${PORT[$id.sni]}/" ;;
	esac
	c0=$(cpu_us "$id")
	if ! timeout $((DUR + 30)) taskset -c "$LG_CPU" wrk "${args[@]}" "$url" \
		>"$out" 2>&1; then
		fail "wrk ($kind) through ${NAME[$id]} (layout $L): $(tail -c 300 "$out")"
	fi
	c1=$(cpu_us "$id")
	read -r rps p50 p99 err nreq < <("${TOOL[@]}" parse-wrk "$out")
	cpr=$(per $((c1 - c0)) "$nreq")
	if [ "$kind" = tele ] || [ "$kind" = alog ]; then
		local who
		case "$kind.$id" in
		tele.psoff) who=record_off ;;
		tele.*) who=record_on ;;
		alog.psalog) who=log_on ;;
		*) who=log_off ;;
		esac
		record "$L" "${kind}_rps" "$who" "$r" "$rps"
		record "$L" "${kind}_cpu" "$who" "$r" "$cpr"
		log "  $L wrk $kind $who: $rps req/s, proxy CPU $cpr us/req"
		return
	fi
	record "$L" "${kind}_cpu" "${NAME[$id]}" "$r" "$cpr"
	record "$L" "${kind}_rps" "${NAME[$id]}" "$r" "$rps"
	record "$L" "${kind}_p50" "${NAME[$id]}" "$r" "$p50"
	record "$L" "${kind}_p99" "${NAME[$id]}" "$r" "$p99"
	record "$L" "${kind}_err" "${NAME[$id]}" "$r" "$err"
	log "  $L wrk $kind ${NAME[$id]}: $rps req/s p50 ${p50}ms p99 ${p99}ms errors $err, proxy CPU $cpr us/req"
}
redis_run() { # PORT N PIPELINE OUT TESTS
	timeout 300 taskset -c "$LG_CPU" redis-benchmark -h 127.0.0.1 -p "$1" -c "$REDIS_CLIENTS" \
		-n "$2" -P "$3" -t "$5" --csv >"$4" 2>"$4.err"
}
m_redis() { # LAYOUT ID ROUND PIPELINE
	local L=$1 id=$2 r=$3 P=$4 out="$WORK/redis.csv" n suffix="" t v got=0 c0 c1
	if [ "$P" = 1 ]; then n=$REDIS_N_PLAIN; else n=$REDIS_N_PIPE; suffix="_P$P"; fi
	c0=$(cpu_us "$id")
	redis_run "${PORT[$id.redis]}" "$n" "$P" "$out" set,get ||
		fail "redis-benchmark -P $P through ${NAME[$id]} (layout $L): $(tail -c 300 "$out.err")"
	c1=$(cpu_us "$id")
	# SET and GET run back to back: CPU per request over both (2n requests)
	record "$L" "redis_cpu${suffix}" "${NAME[$id]}" "$r" "$(per $((c1 - c0)) $((2 * n)))"
	while read -r t v; do
		record "$L" "redis_${t}${suffix}" "${NAME[$id]}" "$r" "$v"
		log "  $L redis $t -P $P ${NAME[$id]}: $v req/s"
		got=1
	done < <("${TOOL[@]}" parse-redis "$out")
	if [ $got = 0 ]; then
		record "$L" "redis_SET${suffix}" "${NAME[$id]}" "$r" nan
		record "$L" "redis_GET${suffix}" "${NAME[$id]}" "$r" nan
	fi
}
# Size redis-benchmark -n so each test lasts about REDIS_SECS through portshift;
# the same -n is then used for every proxy.
calibrate_redis() {
	local rps
	[ "$MODE" = smoke ] && return
	redis_run "${PORT[ps.redis]}" 20000 1 "$WORK/cal.csv" get || true
	rps=$("${TOOL[@]}" parse-redis "$WORK/cal.csv" | awk '{print int($2)}' | head -1)
	REDIS_N_PLAIN=$(( ${rps:-20000} * REDIS_SECS ))
	[ "$REDIS_N_PLAIN" -lt 20000 ] && REDIS_N_PLAIN=20000
	redis_run "${PORT[ps.redis]}" 200000 16 "$WORK/cal.csv" get || true
	rps=$("${TOOL[@]}" parse-redis "$WORK/cal.csv" | awk '{print int($2)}' | head -1)
	REDIS_N_PIPE=$(( ${rps:-200000} * REDIS_SECS ))
	[ "$REDIS_N_PIPE" -lt 200000 ] && REDIS_N_PIPE=200000
	log "  redis-benchmark sizes: -n $REDIS_N_PLAIN (plain), -n $REDIS_N_PIPE (-P 16)"
}

PEERS=(ps hap ngx)
# Between two measurements everything we started is idle, so CPU busy time
# seen then belongs to someone else: record it, to flag disturbed runs.
cpu_busy() { # -> "busy total" jiffies, all CPUs (no fork)
	local _c u n sy idle iow irq sirq st _rest
	read -r _c u n sy idle iow irq sirq st _rest </proc/stat
	echo "$((u + n + sy + irq + sirq + st)) $((u + n + sy + idle + iow + irq + sirq + st))"
}
settle() { # LAYOUT
	local b0 t0 b1 t1
	read -r b0 t0 < <(cpu_busy)
	sleep "$SETTLE"
	read -r b1 t1 < <(cpu_busy)
	[ $((t1 - t0)) -gt 0 ] && record "$1" bg_busy machine 0 "$(per $((b1 - b0)) $((t1 - t0)) 100)"
}
run_layout() { # LAYOUT
	local L=$1 cpu r id
	cpu=$(proxy_cpu "$L")
	log "layout $L: proxies on CPU $cpu, load generators and backends on CPU $LG_CPU"
	for id in "${PROXY_IDS[@]}"; do start_proxy "$id" "$cpu"; done
	for id in "${PROXY_IDS[@]}"; do check_forward "$id"; done
	log "  all proxies forward HTTP, redis and iperf3"
	if [ "$MODE" = full ]; then   # warm-up, not recorded
		for id in "${PROXY_IDS[@]}"; do
			taskset -c "$LG_CPU" wrk -t1 -c"$WRK_CONNS" -d1s "http://127.0.0.1:${PORT[$id.http]}/" >/dev/null 2>&1
		done
	fi
	{ wanted redis || wanted redis16; } && calibrate_redis
	# pscopy (splice = false) runs interleaved with the peers: the splice trade-off.
	wanted iperf1 && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}" pscopy; do m_iperf "$L" "$id" "$r" 1; settle "$L"; done; done
	wanted iperf8 && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}" pscopy; do m_iperf "$L" "$id" "$r" 8; settle "$L"; done; done
	wanted ka && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_wrk "$L" "$id" "$r" ka; settle "$L"; done; done
	wanted close && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_wrk "$L" "$id" "$r" close; settle "$L"; done; done
	wanted redis && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_redis "$L" "$id" "$r" 1; settle "$L"; done; done
	wanted redis16 && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_redis "$L" "$id" "$r" 16; settle "$L"; done; done
	wanted tele && for r in $(seq 1 "$ROUNDS"); do for id in ps psoff; do m_wrk "$L" "$id" "$r" tele; settle "$L"; done; done
	wanted tls_ka && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_wrk "$L" "$id" "$r" tls_ka; settle "$L"; done; done
	wanted tls_close && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_wrk "$L" "$id" "$r" tls_close; settle "$L"; done; done
	wanted sni && for r in $(seq 1 "$ROUNDS"); do for id in "${PEERS[@]}"; do m_wrk "$L" "$id" "$r" sni_close; settle "$L"; done; done
	# The access log's cost: the same new-connection load with it off and on.
	wanted alog && for r in $(seq 1 "$ROUNDS"); do for id in ps psalog; do m_wrk "$L" "$id" "$r" alog; settle "$L"; done; done
	for id in "${PROXY_IDS[@]}"; do stop_proxy "$id"; done
}

status_of() { cat "$1" 2>/dev/null || true; }
# Memory: a fresh proxy per peer; RSS before, with MEM_CONNS idle connections
# (each connected upstream to the sink), and after one 64-byte echo on each.
m_memory() { # LAYOUT ID
	local L=$1 id=$2 cpu pid rss0 rss1 rss2 hpid spid n acc ech hs
	cpu=$(proxy_cpu "$L")
	local sst="$WORK/sink.status" hst="$WORK/hold.status"
	rm -f "$sst" "$hst"
	spawn sink "$LG_CPU" "${TOOL[@]}" sink "${PORT[be.sink]}" "$sst"
	spid=$LAST_PID
	wait_listen "${PORT[be.sink]}" "$spid" 10 || die "connection sink did not start"
	start_proxy "$id" "$cpu"
	sleep "$MEM_SETTLE"
	pid=$(rss_pid "$id")
	rss0=$("${TOOL[@]}" rss "$pid")
	spawn hold "$LG_CPU" "${TOOL[@]}" hold "${PORT[$id.sink]}" "$MEM_CONNS" "$hst"
	hpid=$LAST_PID
	n=$((1200 + MEM_CONNS / 50))   # tenths of a second
	while [ $n -gt 0 ]; do
		hs=$(status_of "$hst"); read -r acc ech < <(status_of "$sst"; echo)
		[[ "$hs" == connected* ]] && [ "${acc:-0}" -ge "$MEM_CONNS" ] && break
		kill -0 "$hpid" 2>/dev/null || break
		sleep 0.1; n=$((n - 1))
	done
	read -r acc ech < <(status_of "$sst"; echo)
	hs=$(status_of "$hst")
	if [ "${acc:-0}" -eq 0 ]; then
		tail -5 "$WORK/hold.err" >&2
		die "${NAME[$id]}: no idle connection reached the upstream sink (holder: '$hs')"
	fi
	sleep "$MEM_SETTLE"
	rss1=$("${TOOL[@]}" rss "$pid")
	kill -USR1 "$hpid" 2>/dev/null
	n=600
	while [ $n -gt 0 ]; do
		[[ "$(status_of "$hst")" == exchanged* ]] && break
		sleep 0.1; n=$((n - 1))
	done
	sleep "$MEM_SETTLE"
	rss2=$("${TOOL[@]}" rss "$pid")
	local hs2
	hs2=$(status_of "$hst")
	if [ "$acc" -lt "$MEM_CONNS" ] || [ "$hs" != "connected $MEM_CONNS" ] || [ "$hs2" != "exchanged $MEM_CONNS" ]; then
		NOTES+=("memory ${NAME[$id]}: holder '$hs' / '$hs2', upstream accepted $acc of $MEM_CONNS")
	fi
	record "$L" rss_base "${NAME[$id]}" 1 "$(awk -v a="$rss0" 'BEGIN{printf "%.1f", a/1024}')"
	record "$L" rss_held "${NAME[$id]}" 1 "$(awk -v a="$rss1" 'BEGIN{printf "%.1f", a/1024}')"
	record "$L" rss_after "${NAME[$id]}" 1 "$(awk -v a="$rss2" 'BEGIN{printf "%.1f", a/1024}')"
	record "$L" mem_fresh "${NAME[$id]}" 1 "$(awk -v a="$rss0" -v b="$rss1" -v n="$MEM_CONNS" 'BEGIN{printf "%.1f", (b-a)/n}')"
	record "$L" mem_used "${NAME[$id]}" 1 "$(awk -v a="$rss0" -v b="$rss2" -v n="$MEM_CONNS" 'BEGIN{printf "%.1f", (b-a)/n}')"
	log "  $L memory ${NAME[$id]}: RSS $((rss0 / 1024)) KiB idle, $((rss1 / 1024)) KiB with $acc conns, $((rss2 / 1024)) KiB after echo"
	stop_pid "$hpid"
	stop_proxy "$id"
	stop_pid "$spid"
}

# ------------------------------------------------------------------ run
TS=$(date -u +%Y%m%dT%H%M%SZ)
START=$(date +%s)
PS_GIT="$(git -C "$ROOT" log -1 --format='%h %cI' 2>/dev/null || echo unknown)"
# Only commits that change what the binary is built from count.
SRC_COMMIT="$(git -C "$ROOT" log -1 --format='%h %cI' -- src Cargo.toml Cargo.lock 2>/dev/null)"
if [ "$(git -C "$ROOT" log -1 --format=%ct -- src Cargo.toml Cargo.lock 2>/dev/null || echo 0)" -gt "$PS_MTIME" ]; then
	NOTES+=("the portshift binary (built $(date -u -d "@$PS_MTIME" +%H:%M:%SZ)) is older than the last commit to src/ or Cargo.* (${SRC_COMMIT}): it may not include the latest changes")
fi
if ! git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
	NOTES+=("src/ or Cargo.* has uncommitted changes; the binary may or may not include them")
fi
log "mode $MODE, layouts $LAYOUTS, ${DUR}s per measurement, $ROUNDS round(s); work dir $WORK"
read -r B0 T0 < <(cpu_busy); sleep 2; read -r B1 T1 < <(cpu_busy)
PRE_BUSY=$(per $((B1 - B0)) $((T1 - T0)) 100)
log "machine busy before start: ${PRE_BUSY}% of all CPUs"
awk -v b="$PRE_BUSY" 'BEGIN{exit !(b > 10)}' &&
	NOTES+=("machine was ${PRE_BUSY}% busy before the run started: another load shares these CPUs")
start_backends
for L in $(echo "$LAYOUTS" | grep -o .); do run_layout "$L"; done
MEM_LAYOUT=A
[[ "$LAYOUTS" == *A* ]] || MEM_LAYOUT=B
if wanted memory; then
	log "memory: $MEM_CONNS idle connections per proxy (layout $MEM_LAYOUT)"
	for id in "${PEERS[@]}"; do m_memory "$MEM_LAYOUT" "$id"; done
fi
[ -n "$ONLY" ] && NOTES+=("only these measurements were run (--only): $ONLY")
ELAPSED=$(( $(date +%s) - START ))
if [ "$(sha256sum "$PS_SRC" 2>/dev/null | cut -c1-16)" != "$PS_SHA" ]; then
	NOTES+=("$PS_SRC was rebuilt during the run (a compile shared the CPUs); the run used the binary copied at its start")
fi

# ------------------------------------------------------------------ report
mkdir -p "$RESULTS"
OUT="$RESULTS/peers-$LAYOUTS-$MODE${ONLY:+-only-${ONLY//,/+}}-$TS.json"
printf '%s\n' "${NOTES[@]+"${NOTES[@]}"}" >"$WORK/notes.txt"
printf '%s\n' "${FAILS[@]+"${FAILS[@]}"}" >"$WORK/fails.txt"
export M_MODE="$MODE" M_TS="$TS" M_LAYOUTS="$LAYOUTS" M_DUR="$DUR" M_ROUNDS="$ROUNDS" \
	M_MEM="$MEM_CONNS" M_MEM_LAYOUT="$MEM_LAYOUT" M_ELAPSED="$ELAPSED" M_WRKC="$WRK_CONNS" \
	M_REDISC="$REDIS_CLIENTS" M_RN1="${REDIS_N_PLAIN:-0}" M_RN16="${REDIS_N_PIPE:-0}" M_FD="$FD" \
	M_PS="$("$PS_BIN" --version 2>&1 | head -1)" M_PSGIT="$PS_GIT" M_PSSRC="$PS_SRC" \
	M_PSMTIME="$(date -u -d "@$PS_MTIME" +%Y-%m-%dT%H:%M:%SZ)" M_PSSHA="$PS_SHA" \
	M_HAP="$(haproxy -v 2>&1 | head -1)" M_NGX="$(nginx -v 2>&1 | head -1)" \
	M_IPERF="$(iperf3 -v 2>&1 | head -1)" M_WRK="$(wrk -v 2>&1 | head -1)" \
	M_REDIS="$(redis-server --version 2>&1 | head -1)" \
	M_CPU="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" M_NPROC="$NPROC" M_KERNEL="$(uname -r)" \
	M_NOTES="$WORK/notes.txt" M_FAILS="$WORK/fails.txt"
"$PY" - "$WORK/meta.json" <<'EOF'
import json, os, sys
e = os.environ
lines = lambda p: [l.rstrip("\n") for l in open(p) if l.strip()]
layouts = list(e["M_LAYOUTS"])
desc = {"A": "proxy alone on CPU 1; wrk/iperf3/redis-benchmark and all backends on CPU 0",
        "B": "everything (proxy, load generators, backends) on CPU 0"}
meta = {
    "timestamp": e["M_TS"], "mode": e["M_MODE"], "layouts": layouts,
    "layout_desc": {l: desc[l] for l in layouts},
    "duration_s": float(e["M_DUR"]), "rounds": int(e["M_ROUNDS"]), "elapsed_s": int(e["M_ELAPSED"]),
    "order": "interleaved: for each test, for each round, portshift haproxy nginx",
    "http_backend": "nginx 1 worker, `return 200 \"backend\\n\"`, keep-alive (CPU 0)",
    "wrk": f"-t1 -c{e['M_WRKC']} --latency", "redis_benchmark": {"clients": int(e["M_REDISC"]),
        "n_plain": int(e["M_RN1"]), "n_pipelined": int(e["M_RN16"])},
    "mem_conns": int(e["M_MEM"]), "mem_layout": e["M_MEM_LAYOUT"], "fd_limit": int(e["M_FD"]),
    "peers_config": {"portshift": "taskset to the proxy CPU (tokio sizes its pool to it)",
                     "haproxy": "nbthread 1, mode tcp", "nginx": "worker_processes 1, stream module"},
    "portshift_binary": {"path": e["M_PSSRC"], "built": e["M_PSMTIME"], "sha256_prefix": e["M_PSSHA"],
                         "git_head_at_start": e["M_PSGIT"]},
    "versions": {"portshift": e["M_PS"], "haproxy": e["M_HAP"],
                 "nginx": e["M_NGX"], "iperf3": e["M_IPERF"], "wrk": e["M_WRK"], "redis": e["M_REDIS"]},
    "host": {"cpu": e["M_CPU"], "nproc": int(e["M_NPROC"]), "kernel": e["M_KERNEL"]},
    "notes": lines(e["M_NOTES"]), "failures": lines(e["M_FAILS"]),
}
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF
"${TOOL[@]}" report "$RAW" "$WORK/meta.json" "$OUT" "$RESULTS/latest.json" || { log "report failed"; exit 3; }
echo
echo "json: $OUT (also $RESULTS/latest.json); total ${ELAPSED}s"
if [ ${#FAILS[@]} -gt 0 ]; then
	log "${#FAILS[@]} measurement(s) failed to run"
	exit 3
fi
exit 0
