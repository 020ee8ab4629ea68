#!/usr/bin/env python3
"""TLS handshakes and idle TLS connections: drover beside nginx, HAProxy and Caddy.

    python3 bench/tls.py              # after bench/run.sh has installed the tools once

Each proxy terminates TLS on one port with the same RSA-2048 certificate (made here with
openssl) and proxies to the benchmark's origin, pinned alone to PROXY_CPU with one worker,
as in bench/bench.py. A client on LOAD_CPU (Python's ssl module: OpenSSL) then opens
connections one after another, each for one request (`Connection: close`), and the
proxy's CPU time is divided by the connections:

    full      a new session every time (certificate, signature, key exchange)
    resumed   the session of the connection before offered back (a ticket, or for TLS 1.2
              whatever the proxy gave: a ticket or a session ID); the count of those the
              proxy took is printed beside it

for TLS 1.3 and TLS 1.2. Then IDLE connections are opened, each after one request, and
held: the proxy's RSS growth divided by them is its memory per idle TLS connection.
Prints a table and writes bench/results/tls.json. Knobs: CONNS (connections
per run, default 500), ROUNDS (default 3; medians are reported), IDLE (default 2000),
PROXIES (default "drover nginx haproxy caddy").
"""

import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

CONNS = bench.env_int("CONNS", 500)
ROUNDS = bench.env_int("ROUNDS", 3)
IDLE = bench.env_int("IDLE", 2000)
PROXIES = os.environ.get("PROXIES", "drover nginx haproxy caddy").split()
PORT = bench.LISTEN_PORT
NAME = "bench.test"


def make_certificate():
    """An RSA-2048 certificate for NAME: (cert, key, cert and key in one file)."""
    cert, key, both = (os.path.join(bench.TMP, f"tls.{ext}") for ext in ("pem", "key", "both"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", f"/CN={NAME}",
                    "-addext", f"subjectAltName=DNS:{NAME}"], check=True, capture_output=True)
    with open(both, "w") as out:
        for path in (cert, key):
            with open(path) as f:
                out.write(f.read())
    return cert, key, both


def config(name, cert, key, both):
    """(argv, env) to run proxy NAME terminating TLS on PORT in front of the origin."""
    origin = f"{bench.HOST}:{bench.ORIGIN_PORT}"
    if name == "drover":
        path = bench.write_conf("drover-tls.toml", f"""[[listeners]]
name = "tls"
listen = "{bench.HOST}:{PORT}"
max_connections = 12000
idle_timeout = "300s"
tls = {{ certificates = [ {{ cert = "{cert}", key = "{key}" }} ] }}

[[routes]]
listener = "tls"
service = "origin"

[services.origin]
endpoints = [ {{ address = "{origin}" }} ]
""")
        return [bench.DROVER_BIN, "run", "--config", path, "--workers", "1",
                "--admin", f"{bench.HOST}:{bench.ADMIN_PORT}",
                "--data-dir", f"{bench.TMP}/drover-data", "--log-level", "warn"], {}
    if name == "nginx":
        # Tickets are on by default; no session cache, as in drover. nginx before 1.23.4
        # (Debian 12 has 1.22) leaves TLS 1.3 out unless told.
        path = bench.write_conf("nginx-tls.conf", bench.nginx_main("nginx", 1) + f"""
    upstream origin {{
        server {origin};
        keepalive 128;
    }}
    server {{
        listen {bench.HOST}:{PORT} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        os.makedirs(os.path.join(bench.TMP, "nginx-tmp"), exist_ok=True)
        return ["nginx", "-p", bench.TMP, "-e", f"{bench.TMP}/nginx-error.log", "-c", path], {}
    if name == "haproxy":
        path = bench.write_conf("haproxy-tls.cfg", bench.haproxy_global(1)
                                + bench.HAPROXY_HTTP_DEFAULTS + f"""frontend bench
    bind {bench.HOST}:{PORT} ssl crt {both}
    default_backend origin

backend origin
    server origin1 {origin}
""")
        return ["haproxy", "-db", "-f", path], {}
    if name == "caddy":
        path = bench.write_conf("Caddyfile-tls", f"""{{
    admin off
    auto_https disable_redirects
}}

https://{NAME}:{PORT} {{
    bind {bench.HOST}
    tls {cert} {key}
    reverse_proxy {origin}
}}
""")
        env = {"GOMAXPROCS": "1", "XDG_CONFIG_HOME": f"{bench.TMP}/caddy-config",
               "XDG_DATA_HOME": f"{bench.TMP}/caddy-data", "HOME": bench.TMP}
        return ["caddy", "run", "--config", path, "--adapter", "caddyfile"], env
    raise SystemExit(f"unknown proxy {name}")


def context(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def request(ctx, session=None, close=True):
    """One connection and one GET /64, read to the end of the answer; returns the TLS
    socket, still open (the caller closes it; with `close` the proxy closes its side)."""
    tcp = socket.create_connection((bench.HOST, PORT))
    # Else a TLS 1.2 client's request, written after its Finished, waits for the ACK of it.
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(tcp, server_hostname=NAME, session=session)
    header = "Connection: close\r\n" if close else ""
    s.sendall(f"GET /64 HTTP/1.1\r\nHost: {NAME}\r\n{header}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]
    if not head.startswith(b"HTTP/1.1 200") or not lengths:
        raise SystemExit(f"unexpected answer: {data[:120]!r}")
    while len(body) < int(lengths[0]):
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the answer was cut short")
        body += chunk
    return s


def cpu_us(pid):
    """The CPU seconds so far of pid and its children, in µs."""
    user, kernel = bench.cpu_seconds_between({}, bench.cpu_ticks(pid))
    return (user + kernel) * 1e6


def handshakes(pid, version, resume):
    """Proxy CPU µs per connection, and how many sessions it resumed."""
    ctx = context(version)
    session, resumed = None, 0
    before = cpu_us(pid)
    for _ in range(CONNS):
        s = request(ctx, session if resume else None)
        resumed += s.session_reused
        session = s.session
        s.close()
    return (cpu_us(pid) - before) / CONNS, resumed


def idle_memory(pid):
    """KB of RSS per idle TLS connection, held after one request each."""
    ctx = context(ssl.TLSVersion.TLSv1_3)
    warm = [request(ctx, close=False) for _ in range(100)]
    time.sleep(1)
    before = bench.rss_kb(pid)
    held = [request(ctx, close=False) for _ in range(IDLE)]
    time.sleep(2)
    after = bench.rss_kb(pid)
    for s in warm + held:
        s.close()
    return (after - before) / IDLE


def wait_tls(proc, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not proc.alive():
            return "process exited"
        try:
            request(context(ssl.TLSVersion.TLSv1_3)).close()
            return None
        except (OSError, ssl.SSLError, SystemExit) as e:
            err = str(e)
        time.sleep(0.2)
    return f"not ready within {timeout}s ({err})"


def main():
    if bench.port_open(PORT):
        raise SystemExit(f"port {PORT} is in use: stop what listens there (an interrupted run?)")
    os.makedirs(bench.TMP, exist_ok=True)
    os.sched_setaffinity(0, {bench.LOAD_CPU})
    cert, key, both = make_certificate()
    origin = bench.start_origin()
    runs = {}
    memory = {}
    kinds = [(v, r) for v in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2)
             for r in (False, True)]
    try:
        for rnd in range(1, ROUNDS + 1):
            for name in bench.rotated(PROXIES, rnd - 1):
                argv, env = config(name, cert, key, both)
                proc = bench.Proc(f"{name}-tls", argv, str(bench.PROXY_CPU), env=env)
                try:
                    err = wait_tls(proc)
                    if err:
                        bench.log(f"{name}: {err}; see {bench.TMP}/{name}-tls.out")
                        continue
                    for version, resume in kinds:
                        us, resumed = handshakes(proc.pid, version, resume)
                        key_ = (name, version.name, "resumed" if resume else "full")
                        runs.setdefault(key_, []).append({"us": us, "resumed": resumed})
                        bench.log(f"round {rnd}/{ROUNDS} {name} {version.name} "
                                  f"{key_[2]}: {us:.0f} µs/connection, {resumed} resumed")
                    if rnd == 1:
                        memory[name] = idle_memory(proc.pid)
                        bench.log(f"{name}: {memory[name]:.1f} KB per idle TLS connection")
                finally:
                    proc.stop()
                    bench.wait_port_free(PORT)
    finally:
        origin.stop()
    print(f"{'proxy':8} {'version':8} {'handshake':9} {'µs/conn':>8} {'resumed':>8}")
    table = []
    for (name, version, kind), recs in runs.items():
        us = statistics.median(r["us"] for r in recs)
        resumed = statistics.median(r["resumed"] for r in recs)
        table.append({"proxy": name, "version": version, "handshake": kind,
                      "us_per_conn": round(us, 1), "resumed": resumed,
                      "runs_us": [round(r["us"], 1) for r in recs]})
        print(f"{name:8} {version:8} {kind:9} {us:8.0f} {resumed:8.0f}")
    for name, kb in memory.items():
        print(f"{name}: {kb:.1f} KB per idle TLS connection")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(bench.RESULTS_DIR, "tls.json")
    with open(path, "w") as f:
        json.dump({"time": stamp, "commit": bench.git_commit(), "conns": CONNS,
                   "rounds": ROUNDS, "idle": IDLE, "certificate": "RSA-2048",
                   "handshakes": table, "idle_kb_per_conn": memory}, f, indent=1)
    print(f"written: {os.path.relpath(path, bench.REPO_DIR)}")


if __name__ == "__main__":
    bench.run_main(main)
