#!/usr/bin/env python3
"""Parse wrk output and write the benchmark report (standard library only).

    report.py parse WRK_OUTPUT_FILE [CPU_FILE]
        one-line summary of a single wrk run (used for progress output)

    report.py report --tmp DIR --proxies "drover nginx ..." --json OUT --md OUT
                     [--meta key=value ...]
        reads DIR/status-<proxy>, DIR/wrk-<proxy>-<n>.txt and (for proxies)
        DIR/cpu-<proxy>-<n>.txt written by run.sh, writes the JSON and
        Markdown reports, prints the table.

A CPU file holds key=value lines; cpu_seconds is the CPU time (user + system)
the proxy and its child processes used while wrk ran, wall_seconds the wall
time it was measured over.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

# wrk prints durations with these units (see its format_time()).
UNIT_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}

# Display names in the order rows are printed.
DISPLAY = {"drover": "drover", "nginx": "nginx", "haproxy": "HAProxy", "direct": "direct (no proxy)"}


def to_ms(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unrecognised duration: {text!r}")
    return float(m.group(1)) * UNIT_TO_MS[m.group(2)]


def parse_wrk(text):
    """Return a dict with rps, p99_ms, requests and error counts (None where absent)."""
    res = {
        "rps": None,
        "p99_ms": None,
        "requests": None,
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non_2xx_3xx": 0,
    }
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if m:
        res["rps"] = float(m.group(1))
    # Latency distribution block: "     99%    1.23ms"
    m = re.search(r"^\s*99%\s+(\S+)", text, re.M)
    if m:
        res["p99_ms"] = to_ms(m.group(1))
    m = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if m:
        res["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()))
        )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        res["non_2xx_3xx"] = int(m.group(1))
    return res


def parse_cpu(path):
    """Return {"cpu_seconds": float, "wall_seconds": float, ...} or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    res = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            try:
                res[key.strip()] = float(value)
            except ValueError:
                pass
    if res.get("cpu_seconds") is None or not res.get("wall_seconds"):
        return None
    return res


def cpu_figures(run, cpu):
    """(CPU µs per request, busy fraction of the proxy core) or (None, None)."""
    if cpu is None or not run.get("requests"):
        return None, None
    us_per_req = cpu["cpu_seconds"] / run["requests"] * 1e6
    busy = cpu["cpu_seconds"] / cpu["wall_seconds"]
    return us_per_req, busy


def run_errors(run):
    return sum(run["socket_errors"].values()) + run["non_2xx_3xx"]


def run_failed(run):
    """A run that produced no usable numbers."""
    return run["rps"] is None or run["p99_ms"] is None or not run["requests"]


def cmd_parse(args):
    try:
        with open(args.file) as f:
            run = parse_wrk(f.read())
    except (OSError, ValueError) as e:
        print(f"could not parse: {e}")
        return 0
    if run_failed(run):
        print("FAILED (no results; see " + args.file + ")")
        return 0
    line = f"{run['rps']:,.0f} req/s, p99 {run['p99_ms']:.3f} ms"
    if args.cpu_file:
        us, busy = cpu_figures(run, parse_cpu(args.cpu_file))
        if us is None:
            line += ", proxy CPU: not measured"
        else:
            line += f", proxy CPU {us:.2f} µs/req, core busy {busy:.0%}"
    if run_errors(run):
        line += (
            f"  ERRORS: socket {run['socket_errors']}, non-2xx/3xx {run['non_2xx_3xx']}"
        )
    print(line)
    return 0


def summarize(proxy, tmp):
    status_path = os.path.join(tmp, f"status-{proxy}")
    try:
        with open(status_path) as f:
            status = f.read().strip()
    except OSError:
        status = "not available: not run"
    row = {"proxy": proxy, "available": status == "available"}
    if not row["available"]:
        row.update(
            runs=0, rps_median=None, rps_min=None, rps_max=None,
            p99_ms_median=None, errors=None,
            cpu_us_per_req_median=None, proxy_cpu_busy_median=None,
            note=status.split(":", 1)[-1].strip(),
        )
        return row

    def run_number(path):
        return int(re.search(r"-(\d+)\.txt$", path).group(1))

    files = sorted(glob.glob(os.path.join(tmp, f"wrk-{proxy}-*.txt")), key=run_number)
    runs = []
    for path in files:
        with open(path) as f:
            try:
                run = parse_wrk(f.read())
            except ValueError:
                run = {"rps": None, "p99_ms": None, "requests": None,
                       "socket_errors": {}, "non_2xx_3xx": 0}
        # No CPU file for "direct" (there is no proxy to measure).
        run["cpu"] = (None if proxy == "direct" else
                      parse_cpu(os.path.join(tmp, f"cpu-{proxy}-{run_number(path)}.txt")))
        runs.append(run)
    good = [r for r in runs if not run_failed(r)]
    cpu_us, busy, cpu_s = [], [], []
    for r in good:
        us, b = cpu_figures(r, r["cpu"])
        if us is not None:
            cpu_us.append(round(us, 3))
            busy.append(round(b, 4))
            cpu_s.append(round(r["cpu"]["cpu_seconds"], 3))
    rps = [r["rps"] for r in good]
    p99 = [r["p99_ms"] for r in good]
    socket = {k: sum(r["socket_errors"].get(k, 0) for r in runs)
              for k in ("connect", "read", "write", "timeout")}
    non2xx = sum(r["non_2xx_3xx"] for r in runs)
    row.update(
        runs=len(good),
        rps_median=round(statistics.median(rps), 2) if rps else None,
        rps_min=round(min(rps), 2) if rps else None,
        rps_max=round(max(rps), 2) if rps else None,
        p99_ms_median=round(statistics.median(p99), 3) if p99 else None,
        errors=sum(socket.values()) + non2xx,
        error_detail={"socket": socket, "non_2xx_3xx": non2xx},
        runs_with_errors=sum(1 for r in runs if run_errors(r)),
        failed_runs=len(runs) - len(good),
        rps_runs=rps,
        p99_ms_runs=p99,
        # CPU the proxy (all its processes and threads) used during each run,
        # per request completed, and as a fraction of its one core.
        cpu_us_per_req_median=round(statistics.median(cpu_us), 3) if cpu_us else None,
        proxy_cpu_busy_median=round(statistics.median(busy), 4) if busy else None,
        cpu_us_per_req_runs=cpu_us,
        proxy_cpu_busy_runs=busy,
        cpu_seconds_runs=cpu_s,
        cpu_measured_runs=len(cpu_us),
    )
    if not good:
        row["available"] = False
        row["note"] = "every wrk run failed"
    return row


def fmt_int(x):
    return f"{x:,.0f}"


def markdown(rows, meta):
    by_proxy = {r["proxy"]: r for r in rows}

    def ratio(row, base):
        b = by_proxy.get(base)
        if not row["available"] or not b or not b["available"] or not b["rps_median"]:
            return "–"
        return f"{row['rps_median'] / b['rps_median']:.2f}"

    def cpu_ratio(row, base):
        b = by_proxy.get(base)
        if (not row.get("cpu_us_per_req_median") or not b or not b["available"]
                or not b.get("cpu_us_per_req_median")):
            return "–"
        return f"{row['cpu_us_per_req_median'] / b['cpu_us_per_req_median']:.2f}"

    lines = [
        "| proxy | req/s (median) | spread | p99 ms | vs nginx | vs HAProxy "
        "| CPU µs/req | proxy core busy | CPU/req vs nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        name = DISPLAY.get(row["proxy"], row["proxy"])
        if not row["available"]:
            lines.append(f"| {name} | not available | – | – | – | – | – | – | – |")
            notes.append(f"- {name}: not available ({row.get('note', '')})")
            continue
        if row["proxy"] != "direct" and row["cpu_measured_runs"] < row["runs"]:
            notes.append(
                f"- {name}: proxy CPU measured in {row['cpu_measured_runs']} of "
                f"{row['runs']} run(s) (see cpu-{row['proxy']}-*.txt in the tmp dir)"
            )
        if row.get("cpu_us_per_req_median") is not None:
            cpu_cells = (f"{row['cpu_us_per_req_median']:.2f} | "
                         f"{row['proxy_cpu_busy_median']:.0%} | {cpu_ratio(row, 'nginx')}")
        else:
            cpu_cells = "– | – | –"
        if row["errors"] or row["failed_runs"]:
            name += " ⚠"
            notes.append(
                f"- {name}: {row['errors']} errors in {row['runs_with_errors']} run(s), "
                f"{row['failed_runs']} failed run(s); detail {json.dumps(row['error_detail'])}"
            )
        spread = f"{fmt_int(row['rps_min'])}–{fmt_int(row['rps_max'])}"
        lines.append(
            f"| {name} | {fmt_int(row['rps_median'])} | {spread} | "
            f"{row['p99_ms_median']:.2f} | {ratio(row, 'nginx')} | {ratio(row, 'haproxy')} | "
            f"{cpu_cells} |"
        )
    footer = [
        "CPU µs/req: CPU time (user + system, all processes and threads) the proxy "
        "used during a run, divided by the requests completed in it; proxy core busy: "
        "that CPU time as a share of its one core over the run. "
        "CPU/req vs nginx: the row's CPU µs/req divided by nginx's; lower is better."
    ]
    direct = by_proxy.get("direct")
    if direct and direct["available"] and direct["rps_median"]:
        footer.append(
            f"direct (no proxy) reaches {fmt_int(direct['rps_median'])} req/s: when a proxy's "
            "row is close to it, CPU µs/req is the figure that tells the proxies apart."
        )
    header = (
        f"Core benchmark, {meta.get('date', '?')}: wrk -t1 -c{meta.get('connections', '?')} "
        f"-d{meta.get('duration_s', '?')}s, median of {meta.get('runs_requested', '?')} run(s); "
        f"proxy on CPU {meta.get('proxy_cpu', '?')}, origin + wrk on CPU {meta.get('load_cpu', '?')} "
        f"(nproc {meta.get('nproc', '?')}, kernel {meta.get('kernel', '?')}).\n"
        f"drover {meta.get('drover_commit', '?')}; {meta.get('nginx_version', '?')}; "
        f"{meta.get('haproxy_version', '?')}; {meta.get('wrk_version', '?')}.\n"
    )
    text = header + "\n" + "\n".join(lines) + "\n\n" + "\n\n".join(footer) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def cmd_report(args):
    meta = {}
    for item in args.meta:
        key, _, value = item.partition("=")
        meta[key] = value.strip()
    for key in ("nproc", "duration_s", "runs_requested", "connections", "proxy_cpu", "load_cpu"):
        if meta.get(key, "").isdigit():
            meta[key] = int(meta[key])
    rows = [summarize(p, args.tmp) for p in args.proxies.split()]
    md = markdown(rows, meta)
    with open(args.json, "w") as f:
        # One flat object per proxy, each carrying the run's metadata, so that
        # results from several dates can simply be concatenated.
        json.dump([{**row, **meta} for row in rows], f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(args.md, "w") as f:
        f.write(md)
    print(md, end="")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("file")
    p.add_argument("cpu_file", nargs="?")
    p.set_defaults(func=cmd_parse)
    r = sub.add_parser("report")
    r.add_argument("--tmp", required=True)
    r.add_argument("--proxies", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--md", required=True)
    r.add_argument("--meta", action="append", default=[])
    r.set_defaults(func=cmd_report)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
