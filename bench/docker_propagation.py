#!/usr/bin/env python3
"""How fast a container's start and stop reach drover's traffic.

For each of N runs (default 20), with drover watching Docker and a steady load of GETs going
through it:
  start: from `docker start` returning, and from Docker's `start` event, to the first request
         the new container answers;
  stop:  from `docker stop` being called, and from Docker's `kill` event, to the last request
         the container answers.
Times are wall-clock (time.time()), as Docker's events carry them (timeNano).
A base container stays up throughout, so that every request has somewhere to go. Requests
use round robin (the file's [docker.defaults]), so the new container gets every other one.

Usage: python3 bench/docker_propagation.py [--runs 20] [--drover target/release/drover]
Needs a Docker Engine (dockerd) and busybox-static, as the tests do. Writes
bench/results/docker-propagation.json and prints a Markdown table.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

IMAGE = "drover-test-web:1"
WEB = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"
HERE = os.path.dirname(os.path.abspath(__file__))


def docker(*args):
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_image():
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(f"{root}/bin")
        shutil.copy(busybox, f"{root}/bin/busybox")
        for tool in ["sh", "httpd", "hostname", "mkdir", "touch", "rm", "test", "sleep", "cat"]:
            os.symlink("busybox", f"{root}/bin/{tool}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", IMAGE], stdin=tar.stdout, check=True, capture_output=True)


class Load:
    """Clients sending GET / on keep-alive connections; records (time, hostname) per answer."""

    def __init__(self, port, clients=4):
        self.port = port
        self.answers = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def client(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode().strip()
                now = time.time()
                if r.status == 200:
                    with self.lock:
                        self.answers.append((now, body))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                conn = None
                time.sleep(0.001)

    def first_from(self, host, after):
        with self.lock:
            return next((t for t, h in self.answers if h == host and t >= after), None)

    def last_from(self, host):
        with self.lock:
            return max((t for t, h in self.answers if h == host), default=None)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class Events:
    """`docker events` for the run's containers: (container id, action) -> time."""

    def __init__(self, run):
        self.times = {}
        self.proc = subprocess.Popen(
            ["docker", "events", "--filter", f"label=bench.run={run}", "--filter", "type=container",
             "--format", "{{json .}}"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.proc.stdout:
            e = json.loads(line)
            key = (e.get("id") or e.get("Actor", {}).get("ID"), e.get("Action") or e.get("status"))
            self.times.setdefault(key, e["timeNano"] / 1e9)

    def wait(self, cid, action, timeout=5):
        deadline = time.time() + timeout
        while (cid, action) not in self.times:
            if time.time() > deadline:
                raise SystemExit(f"no {action} event for {cid[:12]}")
            time.sleep(0.005)
        return self.times[(cid, action)]

    def close(self):
        self.proc.terminate()


def percentile(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--drover", default=os.path.join(HERE, "..", "target", "release", "drover"))
    args = ap.parse_args()
    if not os.access(args.drover, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "drover"], check=True, cwd=os.path.join(HERE, ".."))
    ensure_image()
    run = f"bench-{os.getpid()}"
    port, admin = free_port(), free_port()
    labels = ["-l", "lb.enable=Y", "-l", f"lb.publish=127.0.0.1:{port}", "-l", "lb.target=80", "-l", f"bench.run={run}"]
    work = tempfile.mkdtemp()
    config = os.path.join(work, "drover.toml")
    with open(config, "w") as f:
        f.write('[docker.defaults]\npolicy = "round_robin"\n')
    log = open(os.path.join(work, "drover.log"), "w")
    drover = subprocess.Popen(
        [args.drover, "run", "--config", config, "--docker", "--docker-constraint", f"bench.run={run}",
         "--admin", f"127.0.0.1:{admin}", "--data-dir", work, "--log-level", "info"],
        stdout=log, stderr=log)
    containers = []
    ok = False
    try:
        base = docker("run", "-d", *labels, IMAGE, "sh", "-c", WEB)
        containers.append(base)
        deadline = time.time() + 20
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("drover never served the base container")
            time.sleep(0.05)
        load = Load(port)
        events = Events(run)
        time.sleep(0.5)
        starts, stops, start_events, kill_events = [], [], [], []
        for i in range(args.runs):
            cid = docker("create", *labels, IMAGE, "sh", "-c", WEB)
            containers.append(cid)
            host = cid[:12]
            docker("start", cid)
            started = time.time()
            while load.first_from(host, started) is None:
                if time.time() - started > 10:
                    raise SystemExit(f"run {i}: the new container never got a request")
                time.sleep(0.001)
            first = load.first_from(host, started)
            starts.append((first - started) * 1000)
            start_events.append((first - events.wait(cid, "start")) * 1000)
            time.sleep(0.2)
            stopping = time.time()
            docker("stop", "-t", "1", cid)
            time.sleep(0.2)
            last = load.last_from(host)
            stops.append(max(0.0, (last - stopping) * 1000))
            kill_events.append(max(0.0, (last - events.wait(cid, "kill")) * 1000))
            docker("rm", "-f", cid)
            containers.remove(cid)
        load.close()
        events.close()
        requests = len(load.answers)
        ok = True
    finally:
        for c in containers:
            subprocess.run(["docker", "rm", "-f", c], capture_output=True)
        drover.terminate()
        drover.wait()
        if not ok:
            print(open(os.path.join(work, "drover.log")).read()[-3000:])
        shutil.rmtree(work, ignore_errors=True)

    def summary(values):
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values), "all": values}

    result = {
        "runs": args.runs,
        "requests": requests,
        "start_ms": summary(starts),
        "start_event_ms": summary(start_events),
        "stop_ms": summary(stops),
        "kill_event_ms": summary(kill_events),
        "docker": docker("version", "--format", "{{.Server.Version}}"),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "docker-propagation.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"| measure ({args.runs} runs) | p50 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, key in [("`docker start` returned → first request served", "start_ms"),
                      ("Docker's `start` event → first request served", "start_event_ms"),
                      ("`docker stop` called → last request served", "stop_ms"),
                      ("Docker's `kill` event → last request served", "kill_event_ms")]:
        r = result[key]
        print(f"| {name} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |")


if __name__ == "__main__":
    main()
