#!/usr/bin/env python3
"""Run the proxy benchmark and write bench/results/<NAME>.json (standard library only).

Started by bench/run.sh, which installs the tools and builds drover and the
paced load generator first; see bench/README.md for the method. Settings come
from the environment (all optional):

    QUICK=1          every scenario briefly, 1 run, 1,000 idle connections
    NAME             results file name (default "latest", "quick" with QUICK=1)
    RUNS             measured rounds (default 3)
    GOAL_RUNS        rounds of the goals' throughput runs, the centre scenario and the
                     two-worker one (default 5; never fewer than RUNS)
    DURATION         seconds per throughput run (default 5)
    RATE_DURATION    seconds per fixed-rate run (default 10)
    RATE_RUNS        fixed-rate rounds (default 5)
    WARMUP           seconds of unmeasured load after a proxy starts (default 1)
    PROXIES          default "drover nginx haproxy caddy" (direct is always run)
    PHASES           default "throughput workers2 relay floor rate memory"
    FULL_MATRIX=1    every connections x body x keep-alive/close combination
    RATE             fixed rate in req/s (default: half the slowest proxy's median
                     at 64 connections, 1 KiB, from the throughput phase)
    MEM_CONNS        idle connections held, of each kind (default 5000)
    PROXY_CPU / LOAD_CPU   default 0 / 1
    DROVER_BIN, PACE_BIN, FLOOR_BIN   binaries (run.sh sets them)
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TMP = os.path.join(RESULTS_DIR, "tmp")

sys.path.insert(0, BENCH_DIR)
import report  # noqa: E402  (parsers shared with the report step)

HOST = "127.0.0.1"
LISTEN_PORT = 18080   # every proxy's HTTP/1.1 listener
H2_PORT = 18081       # every proxy's cleartext HTTP/2 (prior knowledge) listener
ORIGIN_PORT = 19000   # origin, HTTP/1.1
ORIGIN_H2_PORT = 19001  # origin, h2c, for the direct HTTP/2 baseline
ADMIN_PORT = 18687    # drover's admin listener

# Response bodies the origin serves: path -> size in bytes.
BODIES = {"64": 64, "1k": 1024, "16k": 16 * 1024, "1m": 1024 * 1024}


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


QUICK = os.environ.get("QUICK", "0") not in ("", "0")
NAME = os.environ.get("NAME", "quick" if QUICK else "latest")
RUNS = env_int("RUNS", 1 if QUICK else 3)
# The goals' ratios swing by a tenth and more between runs on this kind of machine: their
# scenarios get more rounds than the others.
GOAL_RUNS = max(RUNS, env_int("GOAL_RUNS", 1 if QUICK else 5))
DURATION = env_float("DURATION", 1 if QUICK else 5)
RATE_DURATION = env_float("RATE_DURATION", 2 if QUICK else 10)
# A p99 moves more between runs than a rate does: its median wants more rounds.
RATE_RUNS = env_int("RATE_RUNS", 1 if QUICK else 5)
WARMUP = env_float("WARMUP", 0.5 if QUICK else 1)
PROXIES = os.environ.get("PROXIES", "drover nginx haproxy caddy").split()
TARGETS = PROXIES + ["direct"]
PHASES = os.environ.get("PHASES", "throughput workers2 relay floor rate memory").split()
# The proxies that can run as a plain TCP relay (Caddy cannot without a plugin).
RELAYS = ("drover", "nginx", "haproxy")
# nginx's stream module (Debian's libnginx-mod-stream), for nginx as a relay.
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
FULL_MATRIX = os.environ.get("FULL_MATRIX", "0") not in ("", "0")
MEM_CONNS = env_int("MEM_CONNS", 1000 if QUICK else 5000)
PROXY_CPU = env_int("PROXY_CPU", 0)
LOAD_CPU = env_int("LOAD_CPU", 1)
BOTH_CPUS = f"{PROXY_CPU},{LOAD_CPU}"
DROVER_BIN = os.environ.get("DROVER_BIN", os.path.join(REPO_DIR, "target/release/drover"))
PACE_BIN = os.environ.get("PACE_BIN", os.path.join(REPO_DIR, "target/bench-pace/release/pace"))
FLOOR_BIN = os.environ.get("FLOOR_BIN", os.path.join(REPO_DIR, "target/bench-floor/release/floor"))
# bench/floor's two minimal proxies, yardsticks for drover's cost per request.
FLOORS = ("floor-hyper", "floor-half", "floor-raw")
H2_CONNS, H2_STREAMS = 16, 4   # 64 streams in flight, as the 64-connection HTTP/1.1 runs


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- scenarios
def scenario(conns, body, close=False, post=0):
    """A wrk scenario: `body` names the answer's size; `post`, if not 0, makes every request
    a POST with a body of that many bytes."""
    sid = f"{'close' if close else 'ka'}-c{conns}-{body}" + (f"-post{post}" if post else "")
    return {"id": sid, "tool": "wrk", "conns": conns, "body": body, "close": close,
            "post": post}


def throughput_scenarios():
    """Around a centre (64 connections, 1 KiB, keep-alive) one factor at a time,
    or with FULL_MATRIX=1 every combination."""
    if FULL_MATRIX:
        out = [scenario(c, b, cl) for cl in (False, True) for c in (1, 64, 256) for b in BODIES]
    else:
        out = [scenario(64, "1k")]
        out += [scenario(c, "1k") for c in (1, 256)]
        out += [scenario(64, b) for b in ("64", "16k", "1m")]
        out += [scenario(c, "1k", close=True) for c in (1, 64)]
        out.append(scenario(64, "1k", post=1024))
    out.append({"id": f"h2-c{H2_CONNS}x{H2_STREAMS}-1k", "tool": "h2load",
                "conns": H2_CONNS, "streams": H2_STREAMS, "body": "1k", "close": False})
    return out


CENTRE = "ka-c64-1k"
WORKERS2 = {"id": "w2-ka-c64-1k", "tool": "wrk", "conns": 64, "body": "1k", "close": False}


# ------------------------------------------------------------ processes
class Proc:
    """A background process, stopped (with its children) by stop()."""

    live = []

    def __init__(self, name, argv, cpus, env=None, logfile=None):
        self.name = name
        logfile = logfile or os.path.join(TMP, f"{name}.out")
        self.log = open(logfile, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(
            ["taskset", "-c", cpus] + argv, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
        self.pid = self.p.pid
        Proc.live.append(self)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM, killing it")
        try:
            os.killpg(self.pid, signal.SIGKILL)  # nginx workers, stragglers
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        if self in Proc.live:
            Proc.live.remove(self)


def stop_all():
    for t in list(RUNNING_TOOLS):  # a load generator still running (interrupted)
        try:
            os.killpg(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in list(Proc.live):
        p.stop()


def proc_tree(pid):
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        out += proc_tree(k)
    return out


def cpu_ticks(pid):
    """{(pid, starttime): (utime, stime) ticks} for pid and its descendants."""
    snap = {}
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # rest[0] is field 3; utime 14, stime 15, starttime 22.
        snap[(p, rest[19])] = (int(rest[11]), int(rest[12]))
    return snap


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds_between(before, after):
    """(user, kernel) CPU seconds between two cpu_ticks snapshots."""
    user = sum(u - before.get(k, (0, 0))[0] for k, (u, _) in after.items())
    kernel = sum(s - before.get(k, (0, 0))[1] for k, (_, s) in after.items())
    return user / CLK_TCK, kernel / CLK_TCK


def cpu_busy_ticks(cpu):
    """(busy, total) ticks of one CPU from /proc/stat; idle and iowait count as not busy."""
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == f"cpu{cpu}":
                ticks = [int(x) for x in fields[1:]]
                return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    raise ValueError(f"cpu{cpu} not in /proc/stat")


def rss_kb(pid):
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def port_open(port):
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port, path, timeout=1.0):
    """(status, body length) of GET path over a fresh HTTP/1.1 connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, len(body)


def wait_ready(port, proc, timeout=15):
    deadline = time.time() + timeout
    err = "no answer"
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            return "process exited"
        try:
            status, n = http_get(port, "/1k")
            if status == 200 and n == BODIES["1k"]:
                return None
            err = f"unexpected answer: status {status}, {n} body bytes"
        except (OSError, ValueError, IndexError) as e:
            err = str(e) or type(e).__name__
        time.sleep(0.2)
    return f"not ready within {timeout}s ({err})"


def wait_port_free(port, timeout=5):
    deadline = time.time() + timeout
    while time.time() < deadline and port_open(port):
        time.sleep(0.1)
    if port_open(port):
        raise SystemExit(f"port {port} still busy")


# --------------------------------------------------------------- configs
def fd_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nginx_top(name, workers, extra_events=""):
    """The main and events contexts of an nginx config."""
    return f"""daemon off;
worker_processes {workers};
worker_rlimit_nofile {fd_limit()};
pid {TMP}/{name}.pid;
error_log {TMP}/{name}-error.log warn;
events {{ worker_connections 12000; {extra_events} }}
"""


def nginx_main(name, workers, extra_events=""):
    """nginx_top, then an http context left open for the caller's servers."""
    return nginx_top(name, workers, extra_events) + f"""http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {TMP}/{name}-tmp/body;
    proxy_temp_path {TMP}/{name}-tmp/proxy;
    fastcgi_temp_path {TMP}/{name}-tmp/fastcgi;
    uwsgi_temp_path {TMP}/{name}-tmp/uwsgi;
    scgi_temp_path {TMP}/{name}-tmp/scgi;
"""


def write_conf(name, text):
    """Writes a config file into TMP; returns its path."""
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def write_origin():
    www = os.path.join(TMP, "www")
    os.makedirs(www, exist_ok=True)
    for path, size in BODIES.items():
        with open(os.path.join(www, path), "wb") as f:
            f.write((b"drover-bench-" * (size // 13 + 1))[:size])
    # 64 B and 1 KiB come from memory (`return`, about a third cheaper per request than
    # a file), 16 KiB from 16 copies of the 1 KiB variable (a config token is limited to
    # 4 KiB), 1 MiB from the page cache with sendfile.
    kib = (b"drover-bench-" * 80)[:1024].decode()
    mem = f"""
    map $host $kib {{ default "{kib}"; }}
    map $host $b64 {{ default "{kib[:64]}"; }}
"""
    locations = """
        location = /64 { return 200 $b64; }
        location = /1k { return 200 $kib; }
        location = /16k { return 200 "%s"; }
""" % ("$kib" * 16)
    conf = nginx_main("origin", 1) + mem + f"""
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    etag off;
    server {{
        listen {HOST}:{ORIGIN_PORT} backlog=4096;
        listen {HOST}:{ORIGIN_H2_PORT} http2 backlog=4096;
        root {www};
        location / {{ }}
{locations}    }}
}}
"""
    os.makedirs(os.path.join(TMP, "origin-tmp"), exist_ok=True)
    return write_conf("origin.conf", conf)


def start_origin():
    """Starts the origin on the load CPU and waits for it; returns its Proc."""
    origin = Proc("origin", ["nginx", "-p", TMP, "-e", f"{TMP}/origin-error.log",
                             "-c", write_origin()], str(LOAD_CPU))
    err = wait_ready(ORIGIN_PORT, origin, 10)
    if err:
        origin.stop()
        raise SystemExit(f"origin did not start: {err} (see {TMP}/origin-error.log)")
    return origin


def write_nginx(workers):
    conf = nginx_main("nginx", workers) + f"""
    upstream origin {{
        server {HOST}:{ORIGIN_PORT};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {HOST}:{LISTEN_PORT} backlog=4096;
        listen {HOST}:{H2_PORT} http2 backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    os.makedirs(os.path.join(TMP, "nginx-tmp"), exist_ok=True)
    return write_conf("nginx.conf", conf)


def haproxy_global(workers):
    """The global section of the HTTP and the relay configs alike."""
    return f"""global
    nbthread {workers}
    maxconn 9000
    pidfile {TMP}/haproxy.pid

"""


# HAProxy's HTTP defaults: keep-alive both ways, upstream connections shared.
HAPROXY_HTTP_DEFAULTS = """defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    maxconn 9000

"""


def write_haproxy(workers):
    conf = haproxy_global(workers) + HAPROXY_HTTP_DEFAULTS + f"""frontend bench
    bind {HOST}:{LISTEN_PORT}
    bind {HOST}:{H2_PORT} proto h2
    default_backend origin

backend origin
    server origin1 {HOST}:{ORIGIN_PORT}
"""
    return write_conf("haproxy.cfg", conf)


def write_nginx_relay(workers):
    conf = f"load_module {NGINX_STREAM};\n" + nginx_top("nginx", workers) + f"""stream {{
    server {{
        listen {HOST}:{LISTEN_PORT} backlog=4096;
        proxy_pass {HOST}:{ORIGIN_PORT};
        proxy_timeout 300s;
    }}
}}
"""
    return write_conf("nginx-relay.conf", conf)


def write_haproxy_relay(workers):
    conf = haproxy_global(workers) + f"""defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    maxconn 9000

frontend bench
    bind {HOST}:{LISTEN_PORT}
    default_backend origin

backend origin
    server origin1 {HOST}:{ORIGIN_PORT}
"""
    return write_conf("haproxy-relay.cfg", conf)


def write_caddy():
    # No access log unless a `log` directive asks for one; admin API off.
    conf = f"""{{
    admin off
    auto_https off
    servers {{
        protocols h1 h2c
    }}
}}

http://{HOST}:{LISTEN_PORT}, http://{HOST}:{H2_PORT} {{
    reverse_proxy {HOST}:{ORIGIN_PORT} {{
        transport http {{
            keepalive 300s
            keepalive_idle_conns 128
            keepalive_idle_conns_per_host 128
        }}
    }}
}}
"""
    return write_conf("Caddyfile", conf)


def write_drover():
    # The http listener serves HTTP/1.1 and h2c (prior knowledge) on one port;
    # a second listener gives it the same h2 port as the others.
    conf = f"""[[listeners]]
name = "bench"
listen = "{HOST}:{LISTEN_PORT}"
max_connections = 12000
idle_timeout = "300s"

[[listeners]]
name = "bench-h2"
listen = "{HOST}:{H2_PORT}"
max_connections = 12000
idle_timeout = "300s"

[[routes]]
listener = "bench"
service = "origin"

[[routes]]
listener = "bench-h2"
service = "origin"

[services.origin]
endpoints = [ {{ address = "{HOST}:{ORIGIN_PORT}" }} ]
"""
    return write_conf("drover.toml", conf)


def write_drover_relay():
    conf = f"""[[listeners]]
name = "bench"
listen = "{HOST}:{LISTEN_PORT}"
protocol = "tcp"
max_connections = 12000
idle_timeout = "300s"

[[routes]]
listener = "bench"
service = "origin"

[services.origin]
endpoints = [ {{ address = "{HOST}:{ORIGIN_PORT}" }} ]
"""
    return write_conf("drover-relay.toml", conf)


def start_proxy(name, workers, cpus, wrapper=(), ready_timeout=15, relay=False):
    """Start proxy NAME with WORKERS workers pinned to CPUS; returns (Proc, error).
    wrapper: a command to run it under (a profiler). relay: as a TCP relay to the
    origin (drover's TCP listener, nginx's stream module, HAProxy's mode tcp) instead
    of an HTTP proxy."""
    env = {}
    if relay and name not in RELAYS:
        return None, "no TCP relay mode in the benchmark"
    if relay and name == "nginx" and not os.path.exists(NGINX_STREAM):
        return None, f"{NGINX_STREAM} missing (apt-get install libnginx-mod-stream)"
    if name == "nginx":
        conf = write_nginx_relay(workers) if relay else write_nginx(workers)
        chk = subprocess.run(["nginx", "-t", "-q", "-p", TMP, "-e", f"{TMP}/nginx-error.log",
                              "-c", conf], capture_output=True, text=True)
        if chk.returncode:
            return None, "config check failed: " + chk.stderr.strip()[-300:]
        argv = ["nginx", "-p", TMP, "-e", f"{TMP}/nginx-error.log", "-c", conf]
    elif name == "haproxy":
        conf = write_haproxy_relay(workers) if relay else write_haproxy(workers)
        chk = subprocess.run(["haproxy", "-c", "-q", "-f", conf], capture_output=True, text=True)
        if chk.returncode:
            return None, "config check failed: " + chk.stderr.strip()[-300:]
        argv = ["haproxy", "-db", "-f", conf]
    elif name == "caddy":
        conf = write_caddy()
        env = {"GOMAXPROCS": str(workers), "XDG_CONFIG_HOME": f"{TMP}/caddy-config",
               "XDG_DATA_HOME": f"{TMP}/caddy-data", "HOME": TMP}
        argv = ["caddy", "run", "--config", conf, "--adapter", "caddyfile"]
    elif name == "drover":
        if not os.access(DROVER_BIN, os.X_OK):
            return None, f"binary not found ({DROVER_BIN})"
        conf = write_drover_relay() if relay else write_drover()
        argv = [DROVER_BIN, "run", "--config", conf, "--workers", str(workers),
                "--admin", f"{HOST}:{ADMIN_PORT}", "--data-dir", f"{TMP}/drover-data",
                "--log-level", "warn"]
    elif name in FLOORS:
        if not os.access(FLOOR_BIN, os.X_OK):
            return None, f"binary not found ({FLOOR_BIN}); bench/run.sh builds it"
        argv = [FLOOR_BIN, name.removeprefix("floor-"), f"{HOST}:{LISTEN_PORT}",
                f"{HOST}:{ORIGIN_PORT}"]
    else:
        return None, "unknown proxy"
    proc = Proc(name, list(wrapper) + argv, cpus, env=env)
    err = wait_ready(LISTEN_PORT, proc, ready_timeout)
    if err:
        tail = ""
        try:
            with open(os.path.join(TMP, f"{name}.out"), errors="replace") as f:
                tail = " | ".join(f.read().splitlines()[-3:])
        except OSError:
            pass
        proc.stop()
        wait_port_free(LISTEN_PORT)
        return None, f"{err}; log: {tail}"
    return proc, None


# ------------------------------------------------------------ load tools
RUNNING_TOOLS = []


def run_tool(argv, out_path, timeout):
    with open(out_path, "w") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        RUNNING_TOOLS.append(p)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        finally:
            RUNNING_TOOLS.remove(p)
    with open(out_path, errors="replace") as f:
        return f.read()


def target_ports(target):
    if target == "direct":
        return ORIGIN_PORT, ORIGIN_H2_PORT
    return LISTEN_PORT, H2_PORT


def load_cmd(sc, target, secs, cpus, threads=1):
    port, h2port = target_ports(target)
    if sc["tool"] == "h2load":
        return ["taskset", "-c", cpus, "h2load", "-t", str(threads), "-c", str(sc["conns"]),
                "-m", str(sc["streams"]), "-D", str(max(1, round(secs))),
                f"http://{HOST}:{h2port}/{sc['body']}"]
    argv = ["taskset", "-c", cpus, "wrk", f"-t{threads}", f"-c{sc['conns']}",
            f"-d{max(1, round(secs))}s", "--latency"]
    if sc["close"]:
        argv += ["-H", "Connection: close"]
    if sc.get("post"):
        # wrk writes each request, head and body, in one write.
        script = os.path.join(TMP, f"post-{sc['post']}.lua")
        with open(script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {sc["post"]})\n')
        argv += ["-s", script]
    return argv + [f"http://{HOST}:{port}/{sc['body']}"]


def measure(sc, target, proc, rnd, tag, cpus, threads=1):
    """One measured run; returns the run record."""
    out_path = os.path.join(TMP, f"{tag}-{sc['id']}-{target}-{rnd}.txt")
    before = cpu_ticks(proc.pid) if proc else None
    # The load CPU's busy share, when the load has a CPU of its own: near 100% means
    # the load side (the load tool and the origin), not the proxy, bounded the run.
    load_alone = cpus == str(LOAD_CPU)
    load_before = cpu_busy_ticks(LOAD_CPU) if load_alone else None
    t0 = time.time()
    text = run_tool(load_cmd(sc, target, DURATION, cpus, threads), out_path, DURATION + 30)
    wall = time.time() - t0
    rec = {"scenario": sc["id"], "target": target, "round": rnd}
    if load_alone:
        busy, total = (a - b for a, b in zip(cpu_busy_ticks(LOAD_CPU), load_before))
        rec["load_busy"] = round(busy / total, 4) if total else None
    rec.update(report.parse_h2load(text) if sc["tool"] == "h2load" else report.parse_wrk(text))
    if proc:
        after = cpu_ticks(proc.pid)
        user, kernel = cpu_seconds_between(before, after)
        secs = user + kernel
        rec["proxy_cpu_s"] = round(secs, 3)
        rec["wall_s"] = round(wall, 3)
        if rec.get("requests"):
            rec["cpu_us_per_req"] = round(secs / rec["requests"] * 1e6, 3)
            # Split: the proxy's own code (user) against the kernel's socket work for it.
            rec["user_us_per_req"] = round(user / rec["requests"] * 1e6, 3)
            rec["kernel_us_per_req"] = round(kernel / rec["requests"] * 1e6, 3)
            rec["proxy_busy"] = round(secs / wall, 4)
    rec["raw"] = os.path.relpath(out_path, BENCH_DIR)
    return rec


def warm(target, cpus, threads=1):
    if WARMUP > 0:
        run_tool(load_cmd(scenario(64, "1k"), target, WARMUP, cpus, threads),
                 os.path.join(TMP, "warmup.txt"), WARMUP + 30)


def describe(rec):
    if rec.get("rps") is None:
        return "FAILED (see " + rec["raw"] + ")"
    s = f"{rec['rps']:,.0f} req/s"
    if rec.get("p99_ms") is not None:
        s += f", p99 {rec['p99_ms']:.2f} ms"
    if rec.get("cpu_us_per_req") is not None:
        s += f", proxy {rec['cpu_us_per_req']:.1f} µs/req, busy {rec['proxy_busy']:.0%}"
    if rec.get("load_busy") is not None:
        s += f", load CPU {rec['load_busy']:.0%}"
    if rec.get("errors"):
        s += f", {rec['errors']} errors"
    return s


# ------------------------------------------------------------------ phases
def with_target(target, workers, cpus, fn, status, relay=False):
    """Start TARGET (a proxy, as a TCP relay if relay is set, or direct), call fn(proc),
    stop it."""
    if target == "direct":
        return fn(None)
    proc, err = start_proxy(target, workers, cpus, relay=relay)
    if err:
        name = f"{target} relay" if relay else target
        log(f"{name}: not available ({err})")
        status.setdefault(name, err)
        return None
    try:
        return fn(proc)
    finally:
        proc.stop()
        wait_port_free(LISTEN_PORT)


def rotated(items, k):
    k %= len(items)
    return items[k:] + items[:k]


def phase_throughput(results, status):
    every = throughput_scenarios()
    for rnd in range(1, GOAL_RUNS + 1):
        # The rounds past RUNS measure the centre alone.
        scs = every if rnd <= RUNS else [sc for sc in every if sc["id"] == CENTRE]
        # Targets in a different order each round, so that a slow drift in the
        # machine's load does not always hit the same one.
        for target in rotated(TARGETS, rnd - 1):
            def go(proc):
                warm(target, str(LOAD_CPU))
                for sc in scs:
                    rec = measure(sc, target, proc, rnd, "tp", str(LOAD_CPU))
                    results["throughput"].append(rec)
                    log(f"round {rnd}/{GOAL_RUNS} {target:7} {sc['id']:16} {describe(rec)}")
            with_target(target, 1, str(PROXY_CPU), go, status)


def set_affinity_tree(pid, cpus):
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


def phase_workers2(results, status, origin):
    # Everything shares both CPUs: the proxy with 2 workers, wrk with 2 threads,
    # and the origin (still 1 worker). With the relay phase on, the proxies that have a
    # relay mode run as relays in the same setup too.
    relays = [t for t in PROXIES if t in RELAYS] if "relay" in PHASES else []
    for pid in proc_tree(origin.pid):
        set_affinity_tree(pid, BOTH_CPUS)
    try:
        for rnd in range(1, GOAL_RUNS + 1):
            runs = [(t, False) for t in rotated(TARGETS, rnd - 1)]
            # The relays, which bound the goal rather than measure it, in RUNS rounds.
            if relays and rnd <= RUNS:
                runs += [(t, True) for t in rotated(relays, rnd - 1)]
            for target, relay in runs:
                def go(proc):
                    warm(target, BOTH_CPUS, threads=2)
                    rec = measure(WORKERS2, target, proc, rnd, "w2-relay" if relay else "w2",
                                  BOTH_CPUS, threads=2)
                    rec["workers"] = 2
                    results["relay" if relay else "workers2"].append(rec)
                    what = f"relay {WORKERS2['id']:10}" if relay else f"{WORKERS2['id']:16}"
                    log(f"round {rnd}/{GOAL_RUNS} {target:7} {what} {describe(rec)}")
                with_target(target, 2, BOTH_CPUS, go, status, relay=relay)
    finally:
        for pid in proc_tree(origin.pid):
            set_affinity_tree(pid, str(LOAD_CPU))


def phase_relay(results, status):
    """The centre scenario through each proxy run as a plain TCP relay: the same
    system calls per request as an HTTP proxy and no HTTP work, so the floor of a
    proxy's CPU per request here, and the most requests/s the load side can drive
    through a proxy. (The two-worker relay runs are in phase_workers2, which sets the
    CPUs up for them.)"""
    relays = [t for t in PROXIES if t in RELAYS]
    if not relays:
        log(f"relay: none of {' '.join(PROXIES)} has a relay mode here; skipping")
        return
    sc = scenario(64, "1k")
    for rnd in range(1, RUNS + 1):
        for target in rotated(relays, rnd - 1):
            def go(proc):
                warm(target, str(LOAD_CPU))
                rec = measure(sc, target, proc, rnd, "relay", str(LOAD_CPU))
                results["relay"].append(rec)
                log(f"round {rnd}/{RUNS} {target:7} relay {sc['id']:10} {describe(rec)}")
            with_target(target, 1, str(PROXY_CPU), go, status, relay=True)


def phase_floor(results, status):
    """The centre scenario through bench/floor's two minimal proxies, pinned as the proxies
    are: hyper's server and client with no other work, and a hand-written codec. Beside
    drover's figure they split its CPU per request into drover's own work, hyper's, and
    what any HTTP proxy costs."""
    sc = scenario(64, "1k")
    for rnd in range(1, RUNS + 1):
        for target in rotated(list(FLOORS), rnd - 1):
            def go(proc):
                warm(target, str(LOAD_CPU))
                rec = measure(sc, target, proc, rnd, "floor", str(LOAD_CPU))
                results["floor"].append(rec)
                log(f"round {rnd}/{RUNS} {target:11} {sc['id']:10} {describe(rec)}")
            with_target(target, 1, str(PROXY_CPU), go, status)


def phase_rate(results, status):
    centre = {}
    for rec in results["throughput"]:
        if rec["scenario"] == CENTRE and rec["target"] in PROXIES and rec.get("rps"):
            centre.setdefault(rec["target"], []).append(rec["rps"])
    if os.environ.get("RATE"):
        rate, slowest = int(os.environ["RATE"]), "RATE"
    elif not centre:
        log("rate: no throughput figures for the 64-connection 1 KiB scenario "
            "(run the throughput phase, or set RATE); skipping")
        return
    else:
        slowest = min(centre, key=lambda t: statistics.median(centre[t]))
        rate = round(statistics.median(centre[slowest]) / 2)
    results["rate_setup"] = {"rate": rate, "slowest": slowest, "conns": 64, "body": "1k",
                             "duration_s": RATE_DURATION}
    log(f"rate: {rate} req/s" + ("" if slowest == "RATE" else f" (half of {slowest}'s median)"))
    for rnd in range(1, RATE_RUNS + 1):
        for target in rotated(TARGETS, rnd - 1):
            def go(proc):
                port = target_ports(target)[0]
                out_path = os.path.join(TMP, f"rate-{target}-{rnd}.json")
                argv = ["taskset", "-c", str(LOAD_CPU), PACE_BIN, "--addr", f"{HOST}:{port}",
                        "--path", "/1k", "--rate", str(rate), "--conns", "64",
                        "--duration", str(RATE_DURATION), "--warmup", str(WARMUP)]
                text = run_tool(argv, out_path, RATE_DURATION + WARMUP + 60)
                try:
                    rec = json.loads(text.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    rec = {"error": text[-300:]}
                rec.update(target=target, round=rnd, raw=os.path.relpath(out_path, BENCH_DIR))
                results["rate"].append(rec)
                if rec.get("p99_us") is not None:
                    log(f"round {rnd}/{RATE_RUNS} {target:7} rate {rate}: achieved "
                        f"{rec['achieved_rps']:,.0f}/s p50 {rec['p50_us'] / 1000:.3f} ms "
                        f"p99 {rec['p99_us'] / 1000:.3f} ms errors {rec['errors']}")
                else:
                    log(f"round {rnd}/{RATE_RUNS} {target:7} rate run failed: {rec}")
            with_target(target, 1, str(PROXY_CPU), go, status)


def recv_response(s):
    """Read one Content-Length response from blocking socket s."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return int(head.split()[1])


def hold_idle(n):
    """Open n keep-alive connections to the proxy, one request each; return them."""
    socks = []
    req = f"GET /64 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    for _ in range(n):
        s = socket.create_connection((HOST, LISTEN_PORT), timeout=5)
        s.sendall(req)
        if recv_response(s) != 200:
            raise ConnectionError("non-200 answer")
        socks.append(s)
    return socks


def h2c_frame(kind, flags, stream, payload=b""):
    """An HTTP/2 frame: 3 bytes of length, type, flags, the stream's id, the payload."""
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def h2c_open(port, path="/64"):
    """A new cleartext HTTP/2 connection (prior knowledge) that has had one GET answered in
    full; the socket, open. Hand-written, as the standard library has no HTTP/2 client: the
    preface, an empty SETTINGS, and one HEADERS frame in HPACK's static forms (indexed
    :method GET and :scheme http, literal :path and :authority), then frames are read until
    the stream ends, acknowledging the server's SETTINGS on the way."""
    authority = f"{HOST}:{port}".encode()
    block = (b"\x82\x86" + b"\x04" + bytes([len(path)]) + path.encode()
             + b"\x01" + bytes([len(authority)]) + authority)
    s = socket.create_connection((HOST, port), timeout=5)
    # HEADERS (type 1) with END_STREAM | END_HEADERS (0x5) on stream 1.
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2c_frame(4, 0, 0)
              + h2c_frame(1, 0x5, 1, block))
    buf = b""
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = s.recv(65536)
            if not chunk:
                s.close()
                raise ConnectionError("closed before the answer ended")
            buf += chunk
        size, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        buf = buf[9 + size:]
        if kind == 4 and not flags & 0x1:  # the server's SETTINGS: acknowledge it
            s.sendall(h2c_frame(4, 0x1, 0))
        elif kind == 7:  # GOAWAY
            s.close()
            raise ConnectionError("GOAWAY")
        elif stream == 1 and kind in (0, 1) and flags & 0x1:  # DATA or HEADERS, END_STREAM
            return s


def hold_idle_h2c(n):
    """Open n cleartext HTTP/2 connections to the proxy, one request each; return them."""
    return [h2c_open(H2_PORT) for _ in range(n)]


def still_open(socks):
    alive = 0
    for s in socks:
        s.setblocking(False)  # with a timeout set, recv would poll first
        try:
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                continue  # closed by the proxy
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def phase_memory(results, status):
    """RSS per idle connection: HTTP/1.1 keep-alive connections (`memory`), then cleartext
    HTTP/2 ones (`memory_h2`), each kind against a proxy just started."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MEM_CONNS + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))
    kinds = (("memory", "HTTP/1.1", hold_idle, lambda: http_get(LISTEN_PORT, "/64")),
             ("memory_h2", "h2c", hold_idle_h2c, lambda: h2c_open(H2_PORT).close()))
    for rnd in range(1, RUNS + 1):
        for key, label, hold, one_request in kinds:
            for target in rotated(PROXIES, rnd - 1):
                def go(proc):
                    # A few requests first, so lazily built state (the upstream pool,
                    # buffers) exists before the baseline is read.
                    for _ in range(5):
                        one_request()
                    time.sleep(0.5)
                    before = rss_kb(proc.pid)
                    socks = []
                    rec = {"target": target, "round": rnd, "conns_requested": MEM_CONNS}
                    try:
                        socks = hold(MEM_CONNS)
                        time.sleep(2)
                        after = rss_kb(proc.pid)
                        alive = still_open(socks)
                        rec.update(rss_before_kb=before, rss_after_kb=after, conns_held=alive)
                        if alive:
                            rec["kb_per_conn"] = round((after - before) / alive, 3)
                    except OSError as e:
                        rec.update(error=f"{type(e).__name__}: {e} after {len(socks)} "
                                         "connections")
                    finally:
                        for s in socks:
                            s.close()
                    results[key].append(rec)
                    log(f"round {rnd}/{RUNS} {target:7} memory, {label}: {rec}")
                with_target(target, 1, str(PROXY_CPU), go, status)


# -------------------------------------------------------------------- main
def version_of(argv, pattern=None):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        line = text[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    line = re.sub(r"^nginx version: ", "", line)
    line = re.sub(r"^HAProxy version (\S+).*", r"HAProxy \1", line)
    line = re.sub(r" \[.*| Copyright.*", "", line)
    return line


def git_commit():
    try:
        c = subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True).stdout.strip() or "none"
        dirty = subprocess.run(["git", "-C", REPO_DIR, "status", "--porcelain",
                                "--untracked-files=no", "--", "crates"],
                               capture_output=True, text=True,
                               env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except OSError:
        return "none"


def main():
    for tool in ("taskset", "wrk", "h2load", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found; run bench/run.sh, which installs it")
    if os.cpu_count() < 2:
        raise SystemExit("needs 2 CPUs")
    for port in (LISTEN_PORT, H2_PORT, ORIGIN_PORT, ORIGIN_H2_PORT, ADMIN_PORT):
        if port_open(port):
            raise SystemExit(f"port {HOST}:{port} is in use; stop whatever listens there")
    shutil.rmtree(TMP, ignore_errors=True)
    os.makedirs(TMP)
    # Room for 5,000 idle connections, and for the proxies (they inherit it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # This script itself (and the memory test's client sockets) stay on the load CPU.
    os.sched_setaffinity(0, {LOAD_CPU})

    started = time.time()
    results = {"throughput": [], "workers2": [], "relay": [], "floor": [], "rate": [],
               "memory": [], "memory_h2": []}
    status = {}
    meta = {
        "name": NAME,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": QUICK, "runs": RUNS, "goal_runs": GOAL_RUNS, "rate_runs": RATE_RUNS,
        "duration_s": DURATION,
        "rate_duration_s": RATE_DURATION,
        "warmup_s": WARMUP, "mem_conns": MEM_CONNS, "proxy_cpu": PROXY_CPU,
        "load_cpu": LOAD_CPU, "nproc": os.cpu_count(), "kernel": os.uname().release,
        "loadavg_start": os.getloadavg(), "proxies": PROXIES, "phases": PHASES,
        "full_matrix": FULL_MATRIX, "h2": {"conns": H2_CONNS, "streams": H2_STREAMS},
        "versions": {
            "drover": git_commit(),
            "nginx": version_of(["nginx", "-v"]),
            "haproxy": version_of(["haproxy", "-v"]),
            "caddy": version_of(["caddy", "version"]),
            "wrk": version_of(["wrk", "-v"]),
            "h2load": version_of(["h2load", "--version"]),
        },
    }
    origin = start_origin()
    try:
        log(f"origin up on {HOST}:{ORIGIN_PORT} (h2c on {ORIGIN_H2_PORT}), CPU {LOAD_CPU}; "
            f"targets {' '.join(TARGETS)}; phases {' '.join(PHASES)}")
        if "throughput" in PHASES:
            phase_throughput(results, status)
        if "workers2" in PHASES:
            phase_workers2(results, status, origin)
        if "relay" in PHASES:
            phase_relay(results, status)
        if "floor" in PHASES:
            phase_floor(results, status)
        if "rate" in PHASES:
            phase_rate(results, status)
        if "memory" in PHASES:
            phase_memory(results, status)
    finally:
        stop_all()
    meta["loadavg_end"] = os.getloadavg()
    meta["elapsed_s"] = round(time.time() - started)
    doc = {"meta": meta, "unavailable": status, **results}
    path = os.path.join(RESULTS_DIR, f"{NAME}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {path} in {meta['elapsed_s']} s")


def run_main(main_fn):
    """Runs main_fn, stopping every process it started when it ends or is interrupted."""
    def on_signal(signum, frame):
        stop_all()
        sys.exit(128 + signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        main_fn()
    finally:
        stop_all()


if __name__ == "__main__":
    run_main(main)
