#!/usr/bin/env python3
"""Compare drover builds (and optionally nginx, haproxy or caddy) on a few scenarios,
interleaved round by round, with the origin, configs and pinning of bench/bench.py.

    python3 bench/ab.py OLD_DROVER NEW_DROVER [nginx ...]

A target is a path to a drover binary, the name of a peer proxy, or floor-hyper,
floor-half or floor-raw (bench/floor's minimal proxies, built by run.sh). Each round starts
every target afresh (in reverse order every other round, so that a drift in the
machine's load does not always favour the same one), warms it up, and measures each
scenario once. Prints the median requests/s and proxy CPU per request per target and
scenario, the CPU split into the proxy's own code (user) and the kernel's work for it.
Knobs, as environment variables:

    SC        scenarios, CONNS:BODY[:POST][,...]; default 64:1k (BODY, the answer's size: 64,
              1k, 16k, 1m; POST, if given, a request body of that many bytes, sent as POST)
    ROUNDS    default 3
    DURATION  seconds per run, as in bench.py (default 5)
    WORKERS   2 for the full run's two-worker setup: each target with two workers, wrk with
              two threads, and the origin, all sharing both CPUs; default 1 (the target
              alone on its CPU)

Run bench/run.sh once first: it installs the tools and builds bench/pace.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PROXIES", "drover")
import bench  # noqa: E402

PEERS = ("nginx", "haproxy", "caddy") + bench.FLOORS


def main():
    targets = sys.argv[1:]
    if not targets or any(t.startswith("-") for t in targets):
        sys.exit(__doc__)
    for t in targets:
        if t not in PEERS and not os.access(t, os.X_OK):
            sys.exit(f"{t}: neither an executable drover binary nor one of {', '.join(PEERS)}")
    rounds = int(os.environ.get("ROUNDS", "3"))
    scenarios = []
    for s in os.environ.get("SC", "64:1k").split(","):
        conns, body, *post = s.split(":")
        scenarios.append(bench.scenario(int(conns), body, post=int(post[0]) if post else 0))
    workers = int(os.environ.get("WORKERS", "1"))
    if workers not in (1, 2):
        sys.exit("WORKERS: 1 or 2")
    # Where the target, and wrk, run; wrk's threads.
    cpus, load_cpus, threads = (str(bench.PROXY_CPU), str(bench.LOAD_CPU), 1)
    if workers == 2:
        cpus, load_cpus, threads = (bench.BOTH_CPUS, bench.BOTH_CPUS, 2)
    os.makedirs(bench.TMP, exist_ok=True)
    os.sched_setaffinity(0, {bench.LOAD_CPU})
    origin = bench.start_origin()
    for pid in bench.proc_tree(origin.pid):
        bench.set_affinity_tree(pid, load_cpus)
    results = {}
    try:
        for rnd in range(1, rounds + 1):
            for target in (targets if rnd % 2 else targets[::-1]):
                name = target if target in PEERS else "drover"
                if name == "drover":
                    bench.DROVER_BIN = target
                proc, err = bench.start_proxy(name, workers, cpus)
                if err:
                    sys.exit(f"{target}: {err}")
                try:
                    bench.warm(name, load_cpus, threads=threads)
                    for sc in scenarios:
                        rec = bench.measure(sc, name, proc, rnd, "ab", load_cpus, threads=threads)
                        results.setdefault((sc["id"], target), []).append(rec)
                        bench.log(f"round {rnd}/{rounds} {target} {sc['id']} {bench.describe(rec)}")
                finally:
                    proc.stop()
                    bench.wait_port_free(bench.LISTEN_PORT)
    finally:
        origin.stop()
    print(f"{'scenario':14} {'target':40} {'req/s':>8} {'µs/req':>7} {'user':>5} "
          f"{'kernel':>6}  runs (k req/s)")
    for (sc, target), recs in results.items():
        rps = [r["rps"] for r in recs if r.get("rps")]
        med = f"{statistics.median(rps) / 1000:.1f}k" if rps else "failed"

        def us(key):
            values = [r[key] for r in recs if r.get(key) is not None]
            return f"{statistics.median(values):.1f}" if values else "-"

        runs = " ".join(f"{x / 1000:.1f}" for x in rps)
        print(f"{sc:14} {target:40} {med:>8} {us('cpu_us_per_req'):>7} "
              f"{us('user_us_per_req'):>5} {us('kernel_us_per_req'):>6}  {runs}")


if __name__ == "__main__":
    main()
