#!/usr/bin/env bash
# benches/counts.sh: the work each proxy does per request, counted rather
# than timed, side by side: portshift, HAProxy (mode tcp) and nginx
# (stream), on loopback only. See benches/peers/README.md.
#
#   bash benches/counts.sh            N = 2000 keep-alive requests, 1000 new connections
#   bash benches/counts.sh --smoke    a quick end-to-end check for CI (numbers never fail it)
#
# Two figures per workload, both independent of how busy the machine is:
#   - user-space instructions per request, under valgrind's callgrind
#     (instrumentation switched on only while the requests run);
#   - syscalls per request, from strace -c attached to the running proxy;
# plus the share of each proxy's CPU time spent in user space (what the
# instruction counts can see), and what recording latency costs portshift
# in instructions (record = true against false).
# The load is a fixed number of HTTP requests sent one at a time (peers.py
# drive), so each request costs its proxy a full wake-up: this is the
# per-request cost with no batching, close to layout A of peers.sh.
#
# Exit codes: 0 ok; 1 a proxy failed to start or to forward; 2 bad usage or
# missing binary.
set -uo pipefail

usage() {
	echo "usage: bash benches/counts.sh [--smoke] [--requests N] [--conns N]"
	echo "env: PORTSHIFT_BIN (default target/release/portshift)"
}
MODE=full
KA_N=2000
CLOSE_N=1000
while [ $# -gt 0 ]; do
	case "$1" in
	--smoke) MODE=smoke; KA_N=100; CLOSE_N=50 ;;
	--requests) KA_N="${2:?}"; shift ;;
	--conns) CLOSE_N="${2:?}"; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PS_BIN="${PORTSHIFT_BIN:-$ROOT/target/release/portshift}"
PEERS_PY=("$(command -v python3)" "$HERE/peers/peers.py")
RESULTS="$ROOT/benches/results"
log() { echo "[counts $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ -x "$PS_BIN" ] || { log "no portshift binary at $PS_BIN (run: cargo build --release)"; exit 2; }
# shellcheck source=peers/common.sh
source "$HERE/peers/common.sh"

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
NGX_STREAM_SO=/usr/lib/nginx/modules/ngx_stream_module.so
[ -e "$NGX_STREAM_SO" ] || need+=(libnginx-mod-stream)
command -v valgrind >/dev/null || need+=(valgrind)
command -v strace >/dev/null || need+=(strace)
command -v ss >/dev/null || need+=(iproute2)
install_missing ${need[@]+"${need[@]}"}

WORK="$(mktemp -d /tmp/portshift-counts.XXXXXX)"
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && stop_group "$p" 3; done
	rm -rf "$WORK"
}
trap cleanup EXIT
listening() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_listen() { # PORT PID: up to 60 s (valgrind starts slowly)
	local i
	for i in $(seq 1 600); do
		listening "$1" && return 0
		kill -0 "$2" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# ------------------------------------------------------------------ backend
BE=$(free_port)
write_http_backend "$WORK/http.conf" "$WORK/http" "$BE" "$(ulimit -n)"
setsid nginx -p "$WORK/http/" -e "$WORK/http/error.log" -c "$WORK/http.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_listen "$BE" $! || die "nginx HTTP backend did not start"

# ------------------------------------------------------------------ proxies
# proxy_cmd ID PORT: the command line of one proxy forwarding PORT to the backend.
proxy_cmd() {
	local id=$1 port=$2
	case "$id" in
	portshift | portshift-record-off)
		local rec=true
		[ "$id" = portshift-record-off ] && rec=false
		printf 'drain_timeout = "1s"\n\n[stats]\nrecord = %s\n\n[[group]]\nname = "http"\nbackends = ["127.0.0.1:%s"]\n\n[[listener]]\nname = "http"\nlisten = ["127.0.0.1:%s"]\nprimary = "http"\nidle_timeout = "15m"\n' \
			"$rec" "$BE" "$port" >"$WORK/ps.toml"
		CMD=("$PS_BIN" run -c "$WORK/ps.toml") ;;
	haproxy)
		printf 'global\n    nbthread 1\n    maxconn 1000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 15m\n    timeout server 15m\n\nlisten http\n    bind 127.0.0.1:%s\n    server s1 127.0.0.1:%s\n' \
			"$port" "$BE" >"$WORK/hap.cfg"
		CMD=(haproxy -db -f "$WORK/hap.cfg") ;;
	nginx)
		mkdir -p "$WORK/ngx"
		# master_process off: the one process is the worker, as valgrind and strace need.
		printf 'load_module %s;\nuser root;\nworker_processes 1;\ndaemon off;\nmaster_process off;\npid %s/ngx/nginx.pid;\nerror_log %s/ngx/error.log warn;\nevents { worker_connections 1000; }\nstream {\n    proxy_connect_timeout 5s;\n    proxy_timeout 15m;\n    server { listen 127.0.0.1:%s; proxy_pass 127.0.0.1:%s; }\n}\n' \
			"$NGX_STREAM_SO" "$WORK" "$WORK" "$port" "$BE" >"$WORK/ngx.conf"
		CMD=(nginx -p "$WORK/ngx/" -e "$WORK/ngx/error.log" -c "$WORK/ngx.conf") ;;
	esac
}
drive() { "${PEERS_PY[@]}" drive "$@" || die "$ID: requests through 127.0.0.1:$1 failed"; }

RAW="$WORK/raw.tsv"
: >"$RAW"
# ---------------------------------------------------------------- callgrind
# instructions ID: user-space instructions per keep-alive request and per new connection.
instructions() {
	local port out vp ka cl
	port=$(free_port)
	proxy_cmd "$ID" "$port"
	out="$WORK/cg.$ID"
	# One CPU, as in the timed harness (portshift then runs its current-thread runtime).
	RUST_LOG=warn setsid taskset -c 0 valgrind --tool=callgrind --instr-atstart=no \
		--callgrind-out-file="$out" "${CMD[@]}" >"$WORK/$ID.vg.log" 2>&1 &
	vp=$!
	PIDS+=("$vp")
	wait_listen "$port" "$vp" || { tail -5 "$WORK/$ID.vg.log" >&2; die "$ID did not start under valgrind"; }
	drive "$port" ka 20   # warm-up: first-use allocations and lazy setup are not counted
	drive "$port" close 20
	for kind in ka close; do
		callgrind_control -i on "$vp" >/dev/null 2>&1
		if [ "$kind" = ka ]; then drive "$port" ka "$KA_N"; else drive "$port" close "$CLOSE_N"; fi
		callgrind_control -i off "$vp" >/dev/null 2>&1
		callgrind_control -d "$kind" "$vp" >/dev/null 2>&1
	done
	stop_group "$vp" 10   # a proxy under valgrind may miss the TERM
	# Dump files: one per -d, in order (ka, close), then one at exit (empty).
	ka=$(cat "$out".1 2>/dev/null | awk '/^totals:/{s+=$2} END{print s+0}')
	cl=$(cat "$out".2 2>/dev/null | awk '/^totals:/{s+=$2} END{print s+0}')
	printf '%s\tinstr_ka\t%s\n' "$ID" "$(awk -v a="$ka" -v n="$KA_N" 'BEGIN{printf "%.0f", a/n}')" >>"$RAW"
	printf '%s\tinstr_close\t%s\n' "$ID" "$(awk -v a="$cl" -v n="$CLOSE_N" 'BEGIN{printf "%.0f", a/n}')" >>"$RAW"
	log "  $ID: $((ka / KA_N)) instructions per keep-alive request, $((cl / CLOSE_N)) per new connection"
}

# start_warm: starts proxy ID without a tracer, pinned to CPU 0, and warms
# it up; sets port and pid (locals of the caller).
start_warm() {
	port=$(free_port)
	proxy_cmd "$ID" "$port"
	RUST_LOG=warn setsid taskset -c 0 "${CMD[@]}" >"$WORK/$ID.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	wait_listen "$port" "$pid" || { tail -5 "$WORK/$ID.log" >&2; die "$ID did not start"; }
	drive "$port" ka 20
	drive "$port" close 20
}

# ---------------------------------------------------------------- strace
# syscalls ID: syscalls per keep-alive request and per new connection.
syscalls() {
	local sp kind n total port pid
	start_warm
	for kind in ka close; do
		strace -c -f -p "$pid" -o "$WORK/st.$ID.$kind" 2>/dev/null &
		sp=$!
		sleep 1   # attached to every thread before the first request
		if [ "$kind" = ka ]; then n=$KA_N; drive "$port" ka "$n"; else n=$CLOSE_N; drive "$port" close "$n"; fi
		kill -INT "$sp"
		wait "$sp" 2>/dev/null
		total=0
		while read -r name calls; do
			printf '%s\tsys_%s_%s\t%s\n' "$ID" "$kind" "$name" "$(awk -v a="$calls" -v n="$n" 'BEGIN{printf "%.2f", a/n}')" >>"$RAW"
			total=$((total + calls))
		done < <("${PEERS_PY[@]}" syscalls "$WORK/st.$ID.$kind")
		printf '%s\tsys_%s\t%s\n' "$ID" "$kind" "$(awk -v a="$total" -v n="$n" 'BEGIN{printf "%.2f", a/n}')" >>"$RAW"
	done
	stop_group "$pid" 10
	log "  $ID: syscalls counted"
}

# ---------------------------------------------------------------- user share
# user_share ID: the share of the proxy's CPU time spent in user space under
# keep-alive load (no tracer attached), to weigh the instruction counts:
# they see only that share. 10x the keep-alive requests, so the tick-based
# CPU times are long enough to read.
user_share() {
	local u0 s0 u1 s1 port pid
	start_warm
	read -r u0 s0 < <("${PEERS_PY[@]}" cpu-split "$pid")
	drive "$port" ka $((KA_N * 10))
	read -r u1 s1 < <("${PEERS_PY[@]}" cpu-split "$pid")
	stop_group "$pid" 10
	printf '%s\tuser_share_ka\t%s\n' "$ID" "$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) 'BEGIN{ if (u + s > 0) printf "%.3f", u / (u + s); else print "nan" }')" >>"$RAW"
}

log "mode $MODE: $KA_N keep-alive requests, $CLOSE_N new connections per proxy; work dir $WORK"
for ID in portshift haproxy nginx; do
	instructions
	syscalls
	user_share
done
# What recording latency costs: the same portshift with [stats] record = false.
ID=portshift-record-off
instructions

# ------------------------------------------------------------------ report
TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
OUT="$RESULTS/counts-$MODE-$TS.json"
export C_MODE="$MODE" C_TS="$TS" C_KA="$KA_N" C_CLOSE="$CLOSE_N" \
	C_PS="$("$PS_BIN" --version 2>&1 | head -1)" \
	C_PSGIT="$(git -C "$ROOT" log -1 --format='%h %cI' 2>/dev/null || echo unknown)" \
	C_HAP="$(haproxy -v 2>&1 | head -1)" C_NGX="$(nginx -v 2>&1 | head -1)" \
	C_CPU="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" C_KERNEL="$(uname -r)"
python3 - "$RAW" "$OUT" <<'EOF'
import json, os, sys
raw, out = sys.argv[1], sys.argv[2]
e = os.environ
vals = {}
for line in open(raw):
    proxy, key, v = line.rstrip("\n").split("\t")
    vals.setdefault(key, {})[proxy] = float(v)
proxies = ["portshift", "haproxy", "nginx"]
rows = [
    ("instr_ka", "user-space instructions per keep-alive request"),
    ("instr_close", "user-space instructions per new connection"),
    ("sys_ka", "syscalls per keep-alive request"),
    ("sys_close", "syscalls per new connection"),
    ("user_share_ka", "share of CPU time in user space, keep-alive"),
]
def ratio(key, peer):
    a, b = vals.get(key, {}).get("portshift"), vals.get(key, {}).get(peer)
    return round(a / b, 3) if a is not None and b else None
print(f"\nper-request work, {e['C_KA']} keep-alive requests and {e['C_CLOSE']} new connections, one at a time (lower is better)")
print(f"{'figure':<50} {'portshift':>10} {'haproxy':>10} {'nginx':>10} {'ps/hap':>7} {'ps/ngx':>7}")
for key, label in rows:
    v = vals.get(key, {})
    dec = 0 if key.startswith("instr") else 2
    cells = [f"{v.get(p, float('nan')):>10.{dec}f}" for p in proxies]
    rh, rn = ratio(key, "haproxy"), ratio(key, "nginx")
    print(f"{label:<50} {''.join(c + ' ' for c in cells)}{rh if rh is not None else 'n/a':>7} {rn if rn is not None else 'n/a':>7}")
on, off = vals.get("instr_ka", {}).get("portshift"), vals.get("instr_ka", {}).get("portshift-record-off")
share = vals.get("user_share_ka", {}).get("portshift")
telemetry = None
if on and off is not None:
    cost = on - off
    telemetry = {"instructions_per_request": round(cost), "share_of_user_instructions": round(cost / on, 4)}
    line = f"\nrecording latency ([stats] record = true vs false): {cost:.0f} instructions per keep-alive request, {100 * cost / on:.1f}% of portshift's user-space instructions"
    if share is not None and share == share:
        telemetry["share_of_cpu_estimate"] = round(cost / on * share, 4)
        line += f"; with {100 * share:.0f}% of its CPU in user space, about {100 * cost / on * share:.1f}% of its CPU"
    print(line)
for kind in ("ka", "close"):
    print(f"\nsyscalls per {'keep-alive request' if kind == 'ka' else 'new connection'}, by name:")
    names = sorted({k[len(f'sys_{kind}_'):] for k in vals if k.startswith(f"sys_{kind}_")})
    for n in names:
        v = vals[f"sys_{kind}_{n}"]
        print(f"  {n:<16} " + " ".join(f"{p} {v.get(p, 0):.2f}" for p in proxies))
doc = {
    "timestamp": e["C_TS"], "mode": e["C_MODE"],
    "requests": {"keep_alive": int(e["C_KA"]), "new_connections": int(e["C_CLOSE"])},
    "load": "peers.py drive: HTTP requests one at a time (4 keep-alive connections, or one connection per request)",
    "versions": {"portshift": e["C_PS"], "portshift_git": e["C_PSGIT"], "haproxy": e["C_HAP"], "nginx": e["C_NGX"]},
    "machine": {"cpu": e["C_CPU"], "kernel": e["C_KERNEL"]},
    "values": vals,
    "ratios": {k: {"haproxy": ratio(k, "haproxy"), "nginx": ratio(k, "nginx")} for k, _ in rows},
    "telemetry_cost": telemetry,
}
json.dump(doc, open(out, "w"), indent=1)
print(f"\nwritten: {out}")
EOF
[ "$MODE" = smoke ] && rm -f "$OUT"
exit 0
