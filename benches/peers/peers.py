#!/usr/bin/env python3
"""Helpers for benches/peers.sh (stdlib only).

Subcommands:
  parse-wrk FILE          -> "rps p50_ms p99_ms errors requests"
  parse-iperf FILE        -> "Gbit/s bytes" received
  parse-redis FILE        -> one "TEST rps" line per redis-benchmark test
  check-http PORT WANT    -> exit 0 if GET / through PORT returns a body containing WANT
  check-redis PORT        -> exit 0 if PING through PORT answers +PONG
  sink PORT STATUS        -> accept and hold connections, echo what they send;
                             writes "<accepted> <echoed_bytes>" to STATUS
  hold PORT N STATUS      -> open N connections to PORT and keep them idle;
                             SIGUSR1: send 64 bytes on each and read the echo;
                             writes "connected <n>" / "exchanged <n>" to STATUS
  drive PORT ka|close N   -> exactly N HTTP requests through PORT, one at a time:
                             ka over 4 keep-alive connections, close one
                             connection each (benches/counts.sh)
  syscalls STRACE_OUT     -> "name count" per syscall from strace -c -o output
  rss PID                 -> VmRSS of PID in bytes
  cpu PID                 -> user+system CPU time of PID (all threads), microseconds
  cpu-split PID           -> "user system" CPU time of PID (all threads), microseconds
  report RAW.tsv META.json OUT.json [LATEST.json]
                          -> print the table, write the JSON
  table RESULT.json       -> print the table of a saved result again
"""
import json
import math
import os
import re
import selectors
import signal
import socket
import statistics
import sys
import time

# ---------------------------------------------------------------- parsing


def _ms(tok):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", tok)
    if not m:
        return float("nan")
    v, u = float(m.group(1)), m.group(2)
    return {"us": v / 1000.0, "ms": v, "s": v * 1000.0, "m": v * 60000.0}[u]


def parse_wrk(path):
    txt = open(path, errors="replace").read()
    rps = p50 = p99 = float("nan")
    errors = 0
    nreq = 0
    m = re.search(r"(\d+) requests in", txt)
    if m:
        nreq = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([0-9.]+)", txt)
    if m:
        rps = float(m.group(1))
    m = re.search(r"^\s+50(?:\.000)?%\s+(\S+)", txt, re.M)
    if m:
        p50 = _ms(m.group(1))
    m = re.search(r"^\s+99(?:\.000)?%\s+(\S+)", txt, re.M)
    if m:
        p99 = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
    if m:
        errors += int(m.group(1))
    print(f"{rps} {p50} {p99} {errors} {nreq}")


def parse_iperf(path):
    try:
        d = json.load(open(path))
        bps = d["end"]["sum_received"]["bits_per_second"]
        print(f"{bps / 1e9:.4f} {int(d['end']['sum_received']['bytes'])}")
    except Exception:  # noqa: BLE001 - a failed run is reported as nan
        print("nan 0")


def parse_redis(path):
    # redis-benchmark --csv: "test","rps","avg_latency_ms",...
    for line in open(path, errors="replace"):
        parts = [p.strip().strip('"') for p in line.strip().split(",")]
        if len(parts) >= 2 and parts[0] and parts[0] != "test":
            try:
                print(f"{parts[0].split()[0]} {float(parts[1])}")
            except ValueError:
                pass


# ---------------------------------------------------------------- checks


def check_http(port, want):
    try:
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=3)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        ok = b" 200 " in data.split(b"\r\n", 1)[0] and want.encode() in data
    except OSError as e:
        print(f"check-http {port}: {e}", file=sys.stderr)
        ok = False
    sys.exit(0 if ok else 1)


def check_redis(port):
    try:
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=3)
        s.sendall(b"PING\r\n")
        ok = s.recv(64).startswith(b"+PONG")
    except OSError as e:
        print(f"check-redis {port}: {e}", file=sys.stderr)
        ok = False
    sys.exit(0 if ok else 1)


# ---------------------------------------------------------------- idle connections


def _write_status(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def sink(port, status):
    """Upstream end of the idle connections: accept, hold, echo."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", int(port)))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    accepted = echoed = 0
    last = None
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        for key, _ in sel.select(timeout=0.1):
            if key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, 1)
                    accepted += 1
            else:
                c = key.fileobj
                try:
                    b = c.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    b = b""
                if not b:
                    sel.unregister(c)
                    c.close()
                    continue
                c.sendall(b)
                echoed += len(b)
        now = (accepted, echoed)
        if now != last:
            _write_status(status, f"{accepted} {echoed}")
            last = now


def hold(port, n, status):
    """Client end: N idle connections through the proxy."""
    n = int(n)
    go = []
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: go.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    socks = []
    deadline = time.time() + 120
    while len(socks) < n and time.time() < deadline and not stop:
        try:
            s = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        except OSError as e:
            print(f"hold: connect {len(socks)}: {e}", file=sys.stderr)
            time.sleep(0.05)
            continue
        socks.append(s)
    _write_status(status, f"connected {len(socks)}")
    while not go and not stop:
        time.sleep(0.05)
    if stop:
        return
    msg = b"x" * 64
    for s in socks:
        s.settimeout(10)
        try:
            s.sendall(msg)
        except OSError:
            pass
    sel = selectors.DefaultSelector()
    need = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        need[s] = len(msg)
    done = 0
    deadline = time.time() + 60
    while need and time.time() < deadline and not stop:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                b = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                b = b""
            if not b:
                sel.unregister(s)
                del need[s]
                continue
            need[s] -= len(b)
            if need[s] <= 0:
                sel.unregister(s)
                del need[s]
                done += 1
    _write_status(status, f"exchanged {done}")
    while not stop:
        time.sleep(0.1)


def drive(port, mode, n):
    """Exactly n requests, one at a time, each answer read in full: a
    fixed amount of work, so per-request counts do not depend on timing."""
    port, n = int(port), int(n)
    close = mode == "close"
    if mode not in ("ka", "close"):
        sys.exit(f"drive: mode must be ka or close, not {mode!r}")
    req = b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"

    def answer(s):
        buf = b""
        while b"backend\n" not in buf:
            d = s.recv(4096)
            if not d:
                sys.exit("drive: connection closed before the answer")
            buf += d

    def connect():
        return socket.create_connection(("127.0.0.1", port), timeout=30)

    if close:
        for _ in range(n):
            with connect() as s:
                s.sendall(req)
                answer(s)
                while s.recv(4096):
                    pass
    else:
        conns = [connect() for _ in range(4)]
        for i in range(n):
            conns[i % 4].sendall(req)
            answer(conns[i % 4])
        for s in conns:
            s.close()


def syscalls(path):
    """The per-syscall call counts of an `strace -c` summary."""
    for line in open(path):
        f = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            print(f[-1], int(f[3]))


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            print(int(line.split()[1]) * 1024)
            return
    print("nan")


def _cpu_us(pid):
    """(user, system) CPU time of PID, all threads, in microseconds.

    /proc/PID/stat: utime and stime are fields 14 and 15, counted after the
    ")" that ends the command name."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(int(f[11]) * 1_000_000 / tick), int(int(f[12]) * 1_000_000 / tick)


def cpu_split(pid):
    print(*_cpu_us(pid))


def cpu(pid):
    print(sum(_cpu_us(pid)))


# ---------------------------------------------------------------- report

PROXIES = ["portshift", "haproxy", "nginx"]

# key -> (label, unit, better, decimals)
METRICS = {
    "iperf1": ("bulk throughput, iperf3 1 stream", "Gbit/s", "higher", 2),
    "iperf8": ("bulk throughput, iperf3 8 streams", "Gbit/s", "higher", 2),
    "iperf1_cpu": ("proxy CPU per GB, iperf3 1 stream", "ms/GB", "lower", 1),
    "iperf8_cpu": ("proxy CPU per GB, iperf3 8 streams", "ms/GB", "lower", 1),
    "ka_rps": ("HTTP keep-alive, wrk", "req/s", "higher", 0),
    "ka_p50": ("HTTP keep-alive, wrk p50 latency", "ms", "lower", 3),
    "ka_p99": ("HTTP keep-alive, wrk p99 latency", "ms", "lower", 3),
    "ka_cpu": ("proxy CPU per keep-alive request", "us/req", "lower", 2),
    "close_rps": ("new connections, wrk Connection: close", "conn/s", "higher", 0),
    "close_p99": ("new connections, wrk p99 latency", "ms", "lower", 3),
    "close_cpu": ("proxy CPU per new connection", "us/conn", "lower", 2),
    "tls_ka_rps": ("TLS terminated, HTTPS keep-alive, wrk", "req/s", "higher", 0),
    "tls_ka_p99": ("TLS terminated, HTTPS keep-alive, p99", "ms", "lower", 3),
    "tls_ka_cpu": ("proxy CPU per TLS keep-alive request", "us/req", "lower", 2),
    "tls_close_rps": ("TLS terminated, a handshake per request", "conn/s", "higher", 0),
    "tls_close_p99": ("TLS terminated, handshake per request, p99", "ms", "lower", 3),
    "tls_close_cpu": ("proxy CPU per TLS handshake + request", "us/conn", "lower", 2),
    "sni_close_rps": ("SNI routed, TLS passed through, new conns", "conn/s", "higher", 0),
    "sni_close_p99": ("SNI routed, new connections, p99", "ms", "lower", 3),
    "sni_close_cpu": ("proxy CPU per SNI-routed connection", "us/conn", "lower", 2),
    "redis_SET": ("redis-benchmark SET", "req/s", "higher", 0),
    "redis_GET": ("redis-benchmark GET", "req/s", "higher", 0),
    "redis_SET_P16": ("redis-benchmark SET -P 16", "req/s", "higher", 0),
    "redis_GET_P16": ("redis-benchmark GET -P 16", "req/s", "higher", 0),
    "redis_cpu": ("proxy CPU per redis request (SET+GET)", "us/req", "lower", 3),
    "redis_cpu_P16": ("proxy CPU per redis request -P 16", "us/req", "lower", 3),
    "rss_base": ("RSS at start, no connections", "KiB", "lower", 0),
    "rss_held": ("RSS holding the idle conns (total)", "KiB", "lower", 0),
    "rss_after": ("RSS after 64 B echo on each (total)", "KiB", "lower", 0),
    "mem_fresh": ("memory per idle conn (never used)", "B/conn", "lower", 0),
    "mem_used": ("memory per idle conn (after 64 B echo)", "B/conn", "lower", 0),
}
ERR_KEYS = {"ka_err": "ka_rps", "close_err": "close_rps", "tls_ka_err": "tls_ka_rps",
            "tls_close_err": "tls_close_rps", "sni_close_err": "sni_close_rps"}


def nn(v):
    """NaN as JSON null."""
    return None if math.isnan(v) else v


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _fmt(v, dec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if dec == 0:
        return f"{v:,.0f}"
    return f"{v:,.{dec}f}"


def _ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return float("nan")
    return a / b


def report(raw_path, meta_path, out_path, latest_path=None):
    meta = json.load(open(meta_path))
    samples = {}  # (layout, key, proxy) -> [values]
    for line in open(raw_path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        layout, key, proxy, _rnd, val = parts
        try:
            v = float(val)
        except ValueError:
            v = float("nan")
        samples.setdefault((layout, key, proxy), []).append(v)

    layouts = [l for l in meta.get("layouts", []) if any(k[0] == l for k in samples)]
    rows = []
    order = sorted({k[0] for k in samples}, key=lambda l: (l not in layouts, l))
    for layout in order:
        for key, (label, unit, better, dec) in METRICS.items():
            if not any((layout, key, p) in samples for p in PROXIES):
                continue
            med = {p: _median(samples.get((layout, key, p), [])) for p in PROXIES}
            row = {
                "metric": key,
                "label": label,
                "layout": layout,
                "unit": unit,
                "better": better,
                **{p: (None if math.isnan(med[p]) else med[p]) for p in PROXIES},
                "portshift/haproxy": None,
                "portshift/nginx": None,
                "samples": {p: samples.get((layout, key, p), []) for p in PROXIES},
            }
            for peer in ("haproxy", "nginx"):
                r = _ratio(med["portshift"], med[peer])
                row[f"portshift/{peer}"] = None if math.isnan(r) else r
            ek = [e for e, k in ERR_KEYS.items() if k == key]
            if ek:
                row["errors"] = {
                    p: sum(x for x in samples.get((layout, ek[0], p), []) if not math.isnan(x))
                    for p in PROXIES
                }
            rows.append(row)

    def ab(layout, key, on_name, off_name):
        """Medians of one A/B pair of portshift variants: req/s and CPU."""
        on = samples.get((layout, f"{key}_rps", on_name), [])
        off = samples.get((layout, f"{key}_rps", off_name), [])
        if not on and not off:
            return None
        con = samples.get((layout, f"{key}_cpu", on_name), [])
        coff = samples.get((layout, f"{key}_cpu", off_name), [])
        return (on, off, con, coff), (_median(on), _median(off), _median(con), _median(coff))

    tele = []
    for layout in order:
        got = ab(layout, "tele", "record_on", "record_off")
        if got is None:
            continue
        (on, off, con, coff), (mon, moff, mcon, mcoff) = got
        cost = (moff - mon) / moff * 100.0 if moff and not math.isnan(moff) and not math.isnan(mon) else float("nan")
        ccost = (mcon - mcoff) / mcoff * 100.0 if mcoff and not math.isnan(mcoff) and not math.isnan(mcon) else float("nan")
        tele.append({
            "layout": layout,
            "record_on_rps": nn(mon),
            "record_off_rps": nn(moff),
            "cost_percent": nn(cost),
            "record_on_cpu_us_per_req": nn(mcon),
            "record_off_cpu_us_per_req": nn(mcoff),
            "cpu_cost_percent": nn(ccost),
            "samples": {"record_on": on, "record_off": off,
                        "record_on_cpu": con, "record_off_cpu": coff},
        })

    # The access log's cost: the same new-connection load, log off and on.
    access_log = []
    for layout in order:
        got = ab(layout, "alog", "log_on", "log_off")
        if got is None:
            continue
        (on, off, con, coff), (mon, moff, mcon, mcoff) = got
        access_log.append({
            "layout": layout,
            "log_on_rps": nn(mon), "log_off_rps": nn(moff),
            "log_on_cpu_us_per_conn": nn(mcon), "log_off_cpu_us_per_conn": nn(mcoff),
            "cpu_cost_us_per_conn": nn(mcon - mcoff),
            "samples": {"log_on": on, "log_off": off, "log_on_cpu": con, "log_off_cpu": coff},
        })

    splice = []
    for layout in order:
        for n in (1, 8):
            on = samples.get((layout, f"iperf{n}", "portshift"), [])
            off = samples.get((layout, f"iperf{n}", "portshift-splice-off"), [])
            if not off:
                continue
            con = samples.get((layout, f"iperf{n}_cpu", "portshift"), [])
            coff = samples.get((layout, f"iperf{n}_cpu", "portshift-splice-off"), [])
            splice.append({
                "layout": layout, "streams": n,
                "splice_on_gbps": nn(_median(on)), "splice_off_gbps": nn(_median(off)),
                "splice_on_cpu_ms_per_gb": nn(_median(con)),
                "splice_off_cpu_ms_per_gb": nn(_median(coff)),
                "samples": {"splice_on": on, "splice_off": off,
                            "splice_on_cpu": con, "splice_off_cpu": coff},
            })

    bg = {}
    for layout in order:
        xs = [x for x in samples.get((layout, "bg_busy", "machine"), []) if not math.isnan(x)]
        if xs:
            bg[layout] = {"median_percent": statistics.median(xs), "max_percent": max(xs),
                          "gaps": len(xs), "gaps_over_10_percent": sum(1 for x in xs if x > 10)}
            if bg[layout]["gaps_over_10_percent"]:
                meta.setdefault("notes", []).append(
                    f"layout {layout}: CPUs were busy (>10%, max {max(xs):.0f}%) in "
                    f"{bg[layout]['gaps_over_10_percent']} of {len(xs)} idle gaps between "
                    "measurements: another load was running; treat that layout's figures with care")
    meta["background_cpu_busy"] = bg

    out = {"meta": meta, "results": rows, "telemetry": tele, "splice": splice,
           "access_log": access_log}
    print_table(out)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    if latest_path:
        with open(latest_path, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


def _spread(row):
    """Largest (max - min) / median over the three proxies' samples, in %."""
    worst = float("nan")
    for p in PROXIES:
        xs = [x for x in row["samples"].get(p, []) if x is not None and not math.isnan(x)]
        if len(xs) < 2:
            continue
        m = statistics.median(xs)
        if m:
            v = (max(xs) - min(xs)) / abs(m) * 100.0
            worst = v if math.isnan(worst) else max(worst, v)
    return worst


def print_table(out):
    meta, rows, tele = out["meta"], out["results"], out["telemetry"]
    hdr = ["metric", "layout", "unit", "better", "portshift", "haproxy", "nginx",
           "ps/haproxy", "ps/nginx", "spread"]
    lines = []
    for r in rows:
        dec = METRICS.get(r["metric"], ("", "", "", 2))[3]
        label = r["label"]
        errs = r.get("errors")
        if errs and any(errs.values()):
            label += " [errors: " + "/".join(f"{int(errs[p])}" for p in PROXIES) + "]"
        sp = _spread(r)
        lines.append([label, r["layout"], r["unit"], r["better"],
                      _fmt(r["portshift"], dec), _fmt(r["haproxy"], dec), _fmt(r["nginx"], dec),
                      _fmt(r["portshift/haproxy"], 2), _fmt(r["portshift/nginx"], 2),
                      "-" if math.isnan(sp) else f"{sp:.0f}%"])
    for t in tele:
        L = t["layout"]
        lines.append(["portshift record=true, wrk keep-alive", L, "req/s", "higher",
                      _fmt(t["record_on_rps"], 0), "-", "-", "-", "-", "-"])
        lines.append(["portshift record=false, wrk keep-alive", L, "req/s", "higher",
                      _fmt(t["record_off_rps"], 0), "-", "-", "-", "-", "-"])
        lines.append(["telemetry cost in req/s: (off-on)/off", L, "%", "lower",
                      _fmt(t["cost_percent"], 1), "-", "-", "-", "-", "-"])
        if t.get("record_on_cpu_us_per_req") is not None:
            lines.append(["portshift record=true, CPU per request", L, "us/req", "lower",
                          _fmt(t["record_on_cpu_us_per_req"], 2), "-", "-", "-", "-", "-"])
            lines.append(["portshift record=false, CPU per request", L, "us/req", "lower",
                          _fmt(t["record_off_cpu_us_per_req"], 2), "-", "-", "-", "-", "-"])
            lines.append(["telemetry cost in CPU: (on-off)/off", L, "%", "lower",
                          _fmt(t["cpu_cost_percent"], 1), "-", "-", "-", "-", "-"])
    for a in out.get("access_log", []):
        L = a["layout"]
        for mode in ("off", "on"):
            lines.append([f"portshift access_log {mode}, new connections", L, "conn/s", "higher",
                          _fmt(a[f"log_{mode}_rps"], 0), "-", "-", "-", "-", "-"])
        for mode in ("off", "on"):
            lines.append([f"portshift access_log {mode}, CPU per connection", L, "us/conn", "lower",
                          _fmt(a[f"log_{mode}_cpu_us_per_conn"], 2), "-", "-", "-", "-", "-"])
        lines.append(["access log cost in CPU: on - off", L, "us/conn", "lower",
                      _fmt(a["cpu_cost_us_per_conn"], 2), "-", "-", "-", "-", "-"])
    for sp in out.get("splice", []):
        L, n = sp["layout"], sp["streams"]
        for mode in ("on", "off"):
            lines.append([f"portshift splice={'true' if mode == 'on' else 'false'}, iperf3 -P {n}",
                          L, "Gbit/s", "higher", _fmt(sp[f"splice_{mode}_gbps"], 2),
                          "-", "-", "-", "-", "-"])
        for mode in ("on", "off"):
            lines.append([f"portshift splice={'true' if mode == 'on' else 'false'}, CPU/GB -P {n}",
                          L, "ms/GB", "lower", _fmt(sp[f"splice_{mode}_cpu_ms_per_gb"], 1),
                          "-", "-", "-", "-", "-"])
    widths = [max(len(str(x[i])) for x in lines + [hdr]) for i in range(len(hdr))]
    right = {4, 5, 6, 7, 8, 9}

    def fmtrow(x):
        return "  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                         for i, c in enumerate(x)).rstrip()

    print()
    print(f"portshift vs haproxy vs nginx: {meta.get('mode')} run, {meta.get('rounds')} round(s) "
          f"of {meta.get('duration_s'):g} s, medians; {meta.get('timestamp')}")
    print(f"host: {meta.get('host', {}).get('cpu')}, nproc {meta.get('host', {}).get('nproc')}, "
          f"kernel {meta.get('host', {}).get('kernel')}")
    for k, v in meta.get("layout_desc", {}).items():
        print(f"layout {k}: {v}")
    print(f"HTTP backend: {meta.get('http_backend')}; idle conns for memory: {meta.get('mem_conns')}")
    pb = meta.get("portshift_binary")
    if pb:
        print(f"portshift binary: built {pb.get('built')}, sha256 {pb.get('sha256_prefix')}…; "
              f"git HEAD at start {pb.get('git_head_at_start')}")
    print()
    print(fmtrow(hdr))
    print("  ".join("-" * w for w in widths))
    for x in lines:
        print(fmtrow(x))
    print()
    print("ratios are portshift/peer: in 'higher' rows >1 favours portshift, in 'lower' rows <1 does.")
    print("spread: largest (max-min)/median of one proxy's rounds; ratios closer to 1 than that are noise.")
    print("proxy CPU: user+system time of the proxy process (nginx: its worker) during the measurement.")
    for k, v in meta.get("background_cpu_busy", {}).items():
        print(f"background CPU busy in the idle gaps between measurements, layout {k}: "
              f"median {v['median_percent']:.1f}%, max {v['max_percent']:.1f}% (of all CPUs)")
    for n in meta.get("notes", []):
        print("note: " + n)
    if meta.get("failures"):
        print("FAILURES: " + "; ".join(meta["failures"]))


def table(path):
    print_table(json.load(open(path)))


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {
        "parse-wrk": parse_wrk,
        "parse-iperf": parse_iperf,
        "parse-redis": parse_redis,
        "check-http": check_http,
        "check-redis": check_redis,
        "sink": sink,
        "hold": hold,
        "drive": drive,
        "syscalls": syscalls,
        "rss": rss,
        "cpu": cpu,
        "cpu-split": cpu_split,
        "report": report,
        "table": table,
    }.get(cmd)
    if fn is None:
        print(__doc__)
        sys.exit(2)
    fn(*args)


if __name__ == "__main__":
    main()
