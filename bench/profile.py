#!/usr/bin/env python3
"""Profile drover under the benchmark's centre scenario (64 keep-alive
connections, 1 KiB bodies, drover alone on CPU 0 with one worker).

    python3 bench/profile.py perf [SECONDS]        # perf record (cpu-clock), default 10 s
    python3 bench/profile.py callgrind [SECONDS]   # valgrind callgrind, default 20 s
    python3 bench/profile.py massif [CONNS]        # valgrind massif: the heap with CONNS
                                                   # idle keep-alive connections (default 1000)
    python3 bench/profile.py heaptrack [CONNS]     # heaptrack: what CONNS idle keep-alive
                                                   # connections hold (default 2000)
    python3 bench/profile.py syscalls [SECONDS]    # strace -c: syscalls per request,
                                                   # drover, nginx and HAProxy (default 5 s)

CONNS sets the connections of the perf and callgrind runs (default 64; callgrind wants
CONNS=4, see below), CLOSE=1 makes them open a new connection per request, and POST=N
makes every request a POST with an N-byte body.
PROXY=floor-hyper, floor-half or floor-raw profiles one of bench/floor's minimal proxies
instead of drover with perf or callgrind (reports under profile-PROXY/), to set beside
drover's.

Uses the origin and drover config of bench/bench.py and the release binary
(DROVER_BIN, default target/release/drover; build it with debug info for
symbols: the workspace's release profile has it). Writes to
bench/results/tmp/profile/ and prints the top of the report.
perf needs only the software cpu-clock event, so it works in VMs without
hardware counters; callgrind counts instructions, user space only.
"""

import glob
import os
import resource
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PROXY = os.environ.get("PROXY", "drover")
# Connections of the perf and callgrind runs. Under callgrind drover runs so slowly that
# with 64 connections each one idles between two of its requests past the deadline its
# watchdog timer was set to: the timer then goes back into tokio's timer wheel for about
# every request (36,724 times for 32,975 requests in one 10 s run), which at full speed
# happens for almost none, and the profile counts about 1,200 instructions per request
# more than with CONNS=4, where each connection's requests come back to back.
CONNS = int(os.environ.get("CONNS", "64"))
# CLOSE=1: a new connection per request (wrk sends `Connection: close`).
CLOSE = os.environ.get("CLOSE", "0") not in ("", "0")
# POST=N: every request a POST with an N-byte body.
POST = int(os.environ.get("POST", "0") or 0)
OUT = os.path.join(bench.TMP, "profile" if PROXY == "drover" else f"profile-{PROXY}")


def syscalls(secs):
    """Syscalls per request for each proxy, counted by strace -c over one wrk run.
    strace slows the proxy down; the counts per request are what matter."""
    rows = {}
    sc = bench.scenario(64, "1k")
    for name in ("drover", "nginx", "haproxy"):
        proc, err = bench.start_proxy(name, 1, str(bench.PROXY_CPU))
        if err:
            print(f"{name}: {err}")
            continue
        try:
            bench.run_tool(bench.load_cmd(sc, name, 1, str(bench.LOAD_CPU)),
                           os.path.join(OUT, "warmup.txt"), 60)
            pids = bench.proc_tree(proc.pid)
            worker = pids[-1]  # nginx: the worker; the others: the process itself
            out = os.path.join(OUT, f"strace-{name}.txt")
            st = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(worker)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            text = bench.run_tool(bench.load_cmd(sc, name, secs, str(bench.LOAD_CPU)),
                                  os.path.join(OUT, f"wrk-strace-{name}.txt"), secs + 60)
            time.sleep(0.5)
            st.send_signal(2)
            st.wait(30)
            reqs = bench.report.parse_wrk(text)["requests"] or 1
            calls = {}
            with open(out) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        calls[parts[-1]] = int(parts[3])
            rows[name] = {k: v / reqs for k, v in calls.items()}
            rows[name]["_total"] = sum(calls.values()) / reqs
        finally:
            proc.stop()
            bench.wait_port_free(bench.LISTEN_PORT)
    names = sorted({k for r in rows.values() for k in r},
                   key=lambda k: -max(r.get(k, 0) for r in rows.values()))
    print("| syscall per request | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in names:
        if max(r.get(k, 0) for r in rows.values()) >= 0.05:
            print(f"| {k.strip('_')} | " + " | ".join(f"{r.get(k, 0):.2f}" for r in rows.values()) + " |")


def raise_file_limit(conns):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (conns + 500, max(conns + 500, hard)))


def heaptrack(conns):
    """Holds CONNS idle keep-alive connections against drover under heaptrack, then kills
    drover outright: it frees nothing, so what the connections hold is reported as leaked.
    Divide each leak by CONNS for the bytes per connection."""
    for old in glob.glob(f"{OUT}/heaptrack*"):
        os.remove(old)
    proc, err = bench.start_proxy("drover", 1, str(bench.PROXY_CPU),
                                  ["heaptrack", "-o", f"{OUT}/heaptrack"], ready_timeout=60)
    if err:
        raise SystemExit(f"drover: {err}")
    raise_file_limit(conns)
    socks = bench.hold_idle(conns)
    time.sleep(3)
    drover = [p for p in bench.proc_tree(proc.pid)
              if open(f"/proc/{p}/cmdline", "rb").read().startswith(bench.DROVER_BIN.encode())]
    for p in drover:
        os.kill(p, signal.SIGKILL)
    proc.p.wait(60)  # heaptrack finishes writing its file
    proc.stop()
    for s_ in socks:
        s_.close()
    data = glob.glob(f"{OUT}/heaptrack*")
    if not data:
        raise SystemExit("heaptrack wrote no data")
    with open(f"{OUT}/heaptrack.txt", "w") as f:
        subprocess.run(["heaptrack_print", "-f", data[0], "--print-leaks", "1"], stdout=f)
    print(f"heaptrack report ({conns} connections): {OUT}/heaptrack.txt, "
          "section MEMORY LEAKS")


def main():
    tool = sys.argv[1] if len(sys.argv) > 1 else "perf"
    if tool == "syscalls":
        os.makedirs(OUT, exist_ok=True)
        os.sched_setaffinity(0, {bench.LOAD_CPU})
        bench.start_origin()
        try:
            syscalls(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
        finally:
            bench.stop_all()
        return
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else (10 if tool == "perf" else 20)
    os.makedirs(OUT, exist_ok=True)
    os.sched_setaffinity(0, {bench.LOAD_CPU})
    bench.start_origin()
    try:
        if tool == "heaptrack":
            heaptrack(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
            return
        if tool == "massif":
            conns = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
            wrapper = ["valgrind", "--tool=massif", "--threshold=0.2", "--max-snapshots=40",
                       f"--massif-out-file={OUT}/massif.out"]
            proc, err = bench.start_proxy("drover", 1, str(bench.PROXY_CPU), wrapper,
                                          ready_timeout=120)
            if err:
                raise SystemExit(f"drover: {err}")
            raise_file_limit(conns)
            socks = bench.hold_idle(conns)
            time.sleep(3)
            proc.stop()
            for s_ in socks:
                s_.close()
            with open(f"{OUT}/massif.txt", "w") as f:
                subprocess.run(["ms_print", f"{OUT}/massif.out"], stdout=f)
            print(f"massif report: {OUT}/massif.txt")
            return
        if tool == "callgrind":
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={OUT}/callgrind.out",
                       "--dump-instr=no", "--collect-jumps=no"]
        elif tool == "perf":
            wrapper = []
        else:
            raise SystemExit("tool: perf, callgrind, massif, heaptrack or syscalls")
        if PROXY not in ("drover",) + bench.FLOORS:
            raise SystemExit(f"PROXY: drover, {' or '.join(bench.FLOORS)}")
        proc, err = bench.start_proxy(PROXY, 1, str(bench.PROXY_CPU), wrapper, ready_timeout=120)
        if err:
            raise SystemExit(f"{PROXY}: {err}")
        sc = bench.scenario(CONNS, "1k", close=CLOSE, post=POST)
        bench.run_tool(bench.load_cmd(sc, "drover", 2, str(bench.LOAD_CPU)),
                       os.path.join(OUT, "warmup.txt"), 60)
        perf = None
        if tool == "perf":
            perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "1999",
                                     "--call-graph", "dwarf,16384", "-o", f"{OUT}/perf.data",
                                     "-p", str(proc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        text = bench.run_tool(bench.load_cmd(sc, "drover", secs, str(bench.LOAD_CPU)),
                              os.path.join(OUT, "wrk.txt"), secs + 120)
        print(text, file=sys.stderr)
        if perf:
            perf.send_signal(2)
            perf.wait(120)
        proc.stop()  # callgrind writes its output as the proxy exits
    finally:
        bench.stop_all()
    if tool == "perf":
        for children, name in (("--no-children", "self"), ("--children", "inclusive")):
            with open(f"{OUT}/perf-{name}.txt", "w") as f:
                subprocess.run(["perf", "report", "-i", f"{OUT}/perf.data", "--stdio", children,
                                "-g", "none", "--percent-limit", "0.5", "--sort", "dso,sym"],
                               stdout=f, stderr=subprocess.DEVNULL)
        print(f"perf reports: {OUT}/perf-self.txt, {OUT}/perf-inclusive.txt")
    else:
        for incl, name in (("no", "self"), ("yes", "inclusive")):
            with open(f"{OUT}/callgrind-{name}.txt", "w") as f:
                subprocess.run(["callgrind_annotate", f"--inclusive={incl}", "--threshold=99",
                                f"{OUT}/callgrind.out"], stdout=f)
        print(f"callgrind reports: {OUT}/callgrind-self.txt, {OUT}/callgrind-inclusive.txt")


if __name__ == "__main__":
    main()
