# benches/peers/common.sh: pieces shared by benches/peers.sh and
# benches/counts.sh (sourced, not run). Both define log() before sourcing.

# install_missing PKG...: installs Debian packages with apt-get (as root),
# refreshing the package lists only if the first try fails. Exit 2 if the
# install fails: the harness cannot run without its tools.
install_missing() {
	[ $# -gt 0 ] || return 0
	log "installing: $*"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q "$@" >&2 ||
		{ apt-get update -q >&2 && apt-get install -y -q "$@" >&2; } ||
		{ log "apt-get install $* failed"; exit 2; }
}

# write_http_backend CONF DIR PORT FDS: an nginx config for the shared HTTP
# backend (1 worker, keep-alive without limit, `return 200 "backend\n"`) on
# 127.0.0.1:PORT, with its pid, logs and temp paths under DIR.
write_http_backend() {
	local conf=$1 d=$2 port=$3 fds=$4
	mkdir -p "$d"
	cat >"$conf" <<EOC
user root;
worker_processes 1;
worker_rlimit_nofile $fds;
daemon off;
master_process on;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $d/cb;
    proxy_temp_path $d/px;
    fastcgi_temp_path $d/fc;
    uwsgi_temp_path $d/uw;
    scgi_temp_path $d/sc;
    keepalive_requests 100000000;
    keepalive_timeout 15m;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / { default_type text/plain; return 200 "backend\n"; }
    }
}
EOC
}

# stop_group PID SECS: TERM to PID's process group (each child runs in its
# own session, setsid, so its group id is its pid: this reaches nginx
# workers too), or to PID alone if it has no group; KILL after SECS.
stop_group() {
	local pid=$1 i
	kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
	for i in $(seq 1 $(($2 * 10))); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL -- "-$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	return 0
}
