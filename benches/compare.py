#!/usr/bin/env python3
"""tokengate against nginx at the same job, in one run. Start it with `benches/compare.sh`.

The job on both sides: accept HTTP/1.1 keep-alive, add `Authorization: Bearer ...`, forward over
a pooled keep-alive connection to the same nginx upstream, which answers only requests carrying a
Bearer token. Each proxy runs on CPU 1; the load generators and the upstream share CPU 0.

A round measures direct / tokengate / nginx in short windows (--windows of --seconds each),
interleaved, the order reversed from one window to the next, so that drift on this shared
machine, which moves a proxy's cost by 20% within a minute, hits all three alike (on one process
of each proxy throughout; --fresh-processes starts new ones each round); medians of the rounds
are reported, with the spread (max-min over median) and each round's own ratios. CPU per
request is also measured head to head, both proxies loaded at once on the shared CPU 1. A window
in which the hypervisor took more than --steal-limit % of either CPU is run again (--tries). A
latency window's first WARMUP seconds, in which oha opens its connections, are not counted.
Results go to target/compare/results.json and a chart to docs/bench-chart.svg; the Markdown
tables are printed.
"""

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "compare"
BIN = Path(os.environ.get("TOKENGATE_BIN", ROOT / "target" / "release" / "tokengate"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

UPSTREAM, UPSTREAM_H2, NGINX, NGINX_H2, TOKENGATE, ADMIN, AUTH = (
    18081, 18085, 18082, 18084, 18083, 18093, 18090)
ALSO_PORTS = [(18086, 18094), (18087, 18095)]  # (proxy, admin) of --also builds
AGENT, SECRET = "benchAgent01", "bench-secret-4f9Kq2"
JWT_KEY = "11" * 32
SIZES = {"0b": 0, "1k": 1024, "16k": 16 * 1024, "1m": 1024 * 1024}
FROM_MEMORY = ("0b", "1k")  # the sizes the upstream answers from its config (start_upstream)
CONNECTIONS = 64  # closed- and open-loop client connections
# A measurement window in which the hypervisor took more than STEAL_LIMIT % of either CPU (`steal`
# in /proc/stat) is run again, WINDOW_TRIES times at most in all, and the least-stolen try is
# kept: that CPU time was taken by other tenants, not spent by a proxy (docs/BENCHMARKS.md).
# --steal-limit and --tries set them; WINDOWS counts what happened, for the report.
STEAL_LIMIT = 1.0
WINDOW_TRIES = 3
WINDOWS = {"windows": 0, "tries": 0, "kept_over_limit": 0, "frozen": 0}
# A closed-loop window that saw errors and ran more than FROZEN times its length: the whole VM
# stopped (seen once: a 1 s wrk run that took 20 s and timed out on 9 requests), so the window
# is run again like a stolen one, rather than ending the run. So is an open-loop window in which
# no request due after WARMUP completed (seen once, in an hour when both proxies had 0.5-0.75 s
# stalls). A proxy that hangs fails every try, and that still ends the run.
FROZEN = 2.0
# The first WARMUP seconds of an open-loop window, which its latency figures leave out: oha opens
# its CONNECTIONS connections then, and the requests queued behind those handshakes (about 2% of
# a 1 s window's, for some 20 ms) would set its p99. That is connection setup, not the latency
# added at a steady rate (wrk2 leaves its calibration seconds out likewise; docs/BENCHMARKS.md).
WARMUP = 0.2


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def pinned(cpu, *args):
    return ["taskset", "-c", str(cpu), *args]


# --- processes ------------------------------------------------------------------------------

class Proc:
    """A server process; `pid` is the one whose CPU and memory are measured."""

    def __init__(self, name, argv, env=None, measured_child=False):
        self.name = name
        log = open(WORK / f"{name}.log", "w")
        self.popen = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        self.measured_child = measured_child
        self._worker = None

    @property
    def pid(self):
        if not self.measured_child:
            return self.popen.pid
        # nginx: the single worker, not the master (looked up once; nothing here reloads nginx).
        if self._worker is None:
            self._worker = int(sh("pgrep", "-P", str(self.popen.pid)).split()[0])
        return self._worker

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def waited_seconds(self):
        """How long its threads were runnable but waited for a CPU another task held (schedstat)."""
        return sum(int((task / "schedstat").read_text().split()[1])
                   for task in Path(f"/proc/{self.pid}/task").iterdir()) / 1e9

    def user_seconds(self):
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK

    def rss_mb(self):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.popen.send_signal(signal.SIGTERM if self.name != "nginx" else signal.SIGQUIT)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # answering
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not come up")


def nginx_conf(name, body):
    conf = WORK / f"{name}.conf"
    # Run as root, nginx's workers would drop to `nobody`, who cannot reach the upstream's files
    # in a checkout under a private directory (`mktemp -d` makes it 0700): keep them as root.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
{user}
worker_processes 1;
worker_rlimit_nofile 40000;
daemon off;
master_process on;
pid {WORK}/{name}.pid;
error_log {WORK}/{name}.error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {WORK}/{name}-body;
    proxy_temp_path {WORK}/{name}-proxy;
    fastcgi_temp_path {WORK}/{name}-fcgi;
    uwsgi_temp_path {WORK}/{name}-uwsgi;
    scgi_temp_path {WORK}/{name}-scgi;
{body}
}}
""")
    return conf


def start_upstream():
    www = WORK / "www"
    www.mkdir(exist_ok=True)
    for name, size in SIZES.items():
        if name not in FROM_MEMORY:
            (www / name).write_bytes(b"x" * size)
    # Its work per request is kept to the least nginx can do, because it shares CPU 0 with the load
    # generator: 0 B and 1 KiB come from memory (`return`; a config string holds at most 4 KiB),
    # 16 KiB and 1 MiB from files whose descriptors stay open. Serving each request from a file
    # cost open, fstat and close on top of the read, and left CPU 0, not the proxy on CPU 1, to
    # set the closed-loop rate of all three targets (docs/BENCHMARKS.md).
    from_memory = "\n".join(f'        location = /{name} {{ return 200 "{"x" * SIZES[name]}"; }}'
                            for name in FROM_MEMORY)
    conf = nginx_conf("upstream", f"""
    open_file_cache max=16 inactive=1h;
    open_file_cache_valid 1h;
    server {{
        listen 127.0.0.1:{UPSTREAM};
        listen 127.0.0.1:{UPSTREAM_H2} http2;
        root {www};
        default_type application/octet-stream;
        if ($http_authorization !~ "^Bearer .") {{ return 401; }}
{from_memory}
        location / {{ }}
    }}""")
    return Proc("upstream", pinned(0, "nginx", "-c", str(conf)), measured_child=True)


def start_nginx_proxy(token, wrapper=(), master=True):
    conf = nginx_conf("nginx", f"""
    upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 256; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{NGINX};
        listen 127.0.0.1:{NGINX_H2} http2;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_buffering off;
        }}
    }}""")
    if not master:  # one process, so that a wrapper (valgrind) sees the worker itself
        conf.write_text(conf.read_text().replace("master_process on;", "master_process off;"))
    return Proc("nginx", pinned(1, *wrapper, "nginx", "-c", str(conf)), measured_child=master)


def start_tokengate(wrapper=(), binary=BIN, extra_env=None, name="tokengate", port=TOKENGATE, admin=ADMIN):
    conf = WORK / ("proxy.toml" if name == "tokengate" else f"{name}.toml")
    conf.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
max_connections = 20000
[admin]
listen = "127.0.0.1:{admin}"
[credentials.bench]
auth_url = "http://127.0.0.1:{AUTH}/v2/auth"
agent_id = "{AGENT}"
secret = {{ env = "BENCH_SECRET" }}
[[routes]]
upstream = "http://127.0.0.1:{UPSTREAM}"
credential = "bench"
""")
    env = {"BENCH_SECRET": SECRET, "RUST_LOG": "warn", **(extra_env or {})}  # no access log, as nginx's
    p = Proc(name, pinned(1, *wrapper, str(binary), "run", "--config", str(conf)), env=env)
    wait_port(port, timeout=120)
    return p


def start_also(procs, specs):
    """Starts the `--also` builds (LABEL=PATH each) beside the first: label -> (port, process)."""
    started = {}
    for i, spec in enumerate(specs):
        label, port, proc = start_also_build(i, spec)
        procs.append(proc)
        started[label] = (port, proc)
    return started


def start_also_build(i, spec):
    """The `i`th `--also` build, `spec` LABEL=PATH, on its own ports -> (label, port, process)."""
    label, path = spec.split("=", 1)
    port, admin = ALSO_PORTS[i]
    return label, port, start_tokengate(binary=Path(path), name=f"also{i}", port=port, admin=admin)


def metric(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# --- load -----------------------------------------------------------------------------------

def wrk(port, path, seconds, headers, connections=CONNECTIONS):
    return wrk_result(port, sh(*wrk_argv(port, path, seconds, headers, connections)), seconds)


def wrk_argv(port, path, seconds, headers, connections=CONNECTIONS):
    """The closed-loop load: wrk on CPU 0, one thread."""
    return pinned(0, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", *headers,
                  f"http://127.0.0.1:{port}/{path}")


class Frozen(Exception):
    """A window that a stall of the machine spoilt (FROZEN); steady() runs it again."""


def wrk_result(port, out, seconds):
    """wrk's output for a `seconds` run -> (requests, req/s); ends the run if it saw errors,
    unless the machine froze meanwhile (Frozen)."""
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", out)
    n = int(found.group(1))
    took = float(found.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[found.group(3)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        if took > FROZEN * seconds:
            raise Frozen(f"a {seconds} s wrk run against :{port} took {took:.1f} s:\n{out}")
        raise SystemExit(f"wrk saw errors against :{port}:\n{out}")
    return n, rps


def oha(port, path, seconds, headers, rate):
    """One open-loop window, `seconds` at `rate` after WARMUP -> (requests completed, the p50, p99
    and p99.9 in µs of those sent after WARMUP, latency-corrected as oha corrects them)."""
    db = WORK / "oha.db"
    db.unlink(missing_ok=True)
    out = sh(*pinned(0, "oha", "--no-tui", "--output-format", "json", "-z", f"{round((seconds + WARMUP) * 1000)}ms",
                     "-c", str(CONNECTIONS), "-q", str(int(rate)), "--latency-correction", "--db-url", str(db),
                     *headers, f"http://127.0.0.1:{port}/{path}"))
    codes = json.loads(out).get("statusCodeDistribution", {})
    if set(codes) - {"200"}:
        raise SystemExit(f"oha saw statuses {codes} against :{port}")
    con = sqlite3.connect(db)
    try:  # `duration` is oha's latency: from when the request was due, with --latency-correction
        kept = sorted(d for (d,) in con.execute(
            "SELECT duration FROM oha WHERE coalesce(start_latency_correction, start) >= ?", (WARMUP,)))
    finally:
        con.close()
    if not kept:  # a stall longer than the window: run again (FROZEN); a hang fails every try
        raise Frozen(f"no request due after the warm-up completed against :{port}")
    ranked = {k: kept[min(len(kept) - 1, int(q * len(kept)))] * 1e6
              for k, q in (("p50", .5), ("p99", .99), ("p99.9", .999))}
    return sum(codes.values()), ranked


def latency(proc, port, headers, seconds, rate):
    """One open-loop 1 KiB window (oha) -> its percentiles, and how long the proxy `proc` (None:
    direct) waited meanwhile for CPU 1 while another task of the machine held it, in ms."""
    waited = proc.waited_seconds() if proc else 0.0
    result = oha(port, "1k", seconds, headers, rate)[1]
    return {**result, "waited_ms": (proc.waited_seconds() - waited) * 1e3 if proc else 0.0}


def h2load(port, path, seconds, headers):
    out = sh(*pinned(0, "h2load", "-D", str(seconds), "-c", "16", "-m", "16", "-t", "1", *headers,
                     f"http://127.0.0.1:{port}/{path}"))
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    ok = int(re.search(r"(\d+) 2xx", out).group(1))
    if re.search(r"(\d+) failed", out).group(1) != "0":
        raise SystemExit(f"h2load saw failures against :{port}:\n{out}")
    return ok, rps


def steal_ticks():
    """Ticks the hypervisor took from each CPU (`steal` in /proc/stat), by CPU number."""
    return {int(f[0][3:]): int(f[8]) for f in (line.split() for line in Path("/proc/stat").read_text().splitlines())
            if f[0].startswith("cpu") and f[0] != "cpu"}


def with_steal(run):
    """Runs `run()` -> (its result, the % of each CPU the hypervisor stole while it ran)."""
    before, started = steal_ticks(), time.monotonic()
    result = run()
    after, seconds = steal_ticks(), time.monotonic() - started
    return result, {cpu: (after[cpu] - before[cpu]) * 100 / (CLK_TCK * seconds) for cpu in before}


def steady(run):
    """Runs the window `run()`, again while the hypervisor took more than STEAL_LIMIT % of either
    CPU during it, WINDOW_TRIES times at most in all -> (the least-stolen try's result, the % of
    each CPU stolen during it)."""
    best = None
    for n in range(1, WINDOW_TRIES + 1):
        try:
            result, stolen = with_steal(run)
        except Frozen as frozen:
            print(f"run again: {frozen}", flush=True)
            WINDOWS["frozen"] += 1
            continue
        if best is None or max(stolen.values()) < max(best[1].values()):
            best = (result, stolen)
        if max(stolen.values()) <= STEAL_LIMIT:
            break
    if best is None:
        raise SystemExit(f"all {WINDOW_TRIES} tries of a window stalled (the machine, or the proxy hung)")
    WINDOWS["windows"] += 1
    WINDOWS["tries"] += n
    WINDOWS["kept_over_limit"] += max(best[1].values()) > STEAL_LIMIT
    return best


def windows_line(w):
    """What steady() did, in one line."""
    return (f"{w['windows']} windows in {w['tries']} tries ({w['tries'] - w['windows']} run again for more than "
            f"{STEAL_LIMIT}% steal, {w['frozen']} of them because the machine stalled); "
            f"{w['kept_over_limit']} kept above it, after {WINDOW_TRIES} tries")


def measured(proc, run):
    """Runs `run()` -> (requests, result); adds the proxy's CPU µs per request (None direct)."""
    before = proc.cpu_seconds() if proc else 0.0
    n, result = run()
    cpu = (proc.cpu_seconds() - before) * 1e6 / n if proc else None
    return result, cpu


async def hold_idle(port, count):
    """Opens `count` keep-alive connections, one request each, and holds them open."""
    conns = []
    sem = asyncio.Semaphore(256)

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /0b HTTP/1.1\r\nHost: bench\r\n\r\n")
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise SystemExit(f"idle connection got {head[:40]!r}")
            conns.append(w)

    await asyncio.gather(*(one() for _ in range(count)))
    return conns


def idle_rss(proc, port, count):
    before = proc.rss_mb()

    async def run():
        conns = await hold_idle(port, count)
        await asyncio.sleep(2)
        after = proc.rss_mb()
        for w in conns:
            w.close()
        return after

    after = asyncio.run(run())
    return before, after


async def cold_burst(port, count):
    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /0b HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        await w.drain()
        status = (await r.readline()).split()[1]
        w.close()
        return status

    return await asyncio.gather(*(one() for _ in range(count)))


# --- report ---------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs)


def median_interval(xs, least=0.9):
    """A distribution-free interval for the median the rounds were drawn from: the k-th smallest
    and k-th largest of `xs`, k as large as keeps its coverage (by the sign test's binomial) at
    `least` or more; (low, high, coverage). With 8 rounds it is the 2nd and 7th, 93%. Too few
    rounds for `least`: the whole range, with the coverage it has."""
    xs, n = sorted(xs), len(xs)
    coverage = lambda k: 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= least:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def told_apart(xs, bound, fmt, name=None):
    """The paired median's interval, and whether it lies wholly on one side of `bound` (called
    `name`, else as `fmt` writes it)."""
    low, high, coverage = median_interval(xs)
    side = ("below" if high < bound else "above" if low > bound else "not told apart from")
    return f"{coverage:.0%} interval {fmt(low)} to {fmt(high)}: {side} {name or fmt(bound)}"


def spread(xs):
    m = med(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def interleaved(names, run, windows, start=0):
    """`run(name)` for each name in `windows` short windows, the order reversed from one window to
    the next (and from one round, `start`, to the next), so that a drift within them favours
    no one -> name -> [each window's result]."""
    seen = {name: [] for name in names}
    for w in range(windows):
        for name in (names if (start + w) % 2 == 0 else names[::-1]):
            seen[name].append(run(name))
    return seen


def pooled(windows):
    """Equal windows of (req/s, CPU µs per request or None) -> the same over all of them."""
    rps = statistics.mean(r for r, _ in windows)
    if windows[0][1] is None:
        return rps, None
    return rps, sum(r * cpu for r, cpu in windows) / sum(r for r, _ in windows)


def shared_cpu(a, b, ports, seconds, windows):
    """CPU µs per request of the proxies `a` and `b` ((process, headers) each) loaded at once,
    closed-loop on `ports`, both pinned to CPU 1, in `windows` windows (which starts first
    alternates) -> {"ratio": median a / b, "min", "max", "rps_ratio": median}."""
    ratios, rps = [], []
    for w in range(windows):
        pair = [(a, ports[0]), (b, ports[1])]
        pair = pair if w % 2 == 0 else pair[::-1]

        def both():
            before = {id(proc): proc.cpu_seconds() for (proc, _), _ in pair}
            runs = {id(proc): subprocess.Popen(wrk_argv(port, "1k", seconds, headers),
                                               stdout=subprocess.PIPE, text=True)
                    for (proc, headers), port in pair}
            texts = {key: run.communicate()[0] for key, run in runs.items()}
            out = {}
            for (proc, _), port in pair:
                n = wrk_result(port, texts[id(proc)], seconds)[0]
                out[id(proc)] = (n, (proc.cpu_seconds() - before[id(proc)]) * 1e6 / n)
            return out

        out = steady(both)[0]
        (na, ca), (nb, cb) = out[id(a[0])], out[id(b[0])]
        ratios.append(ca / cb)
        rps.append(na / nb)
    return {"ratio": med(ratios), "min": min(ratios), "max": max(ratios), "rps_ratio": med(rps)}


def chart(results, path):
    """A two-panel SVG bar chart: saturation requests/s, and added p99 at the fixed rate."""
    names = list(results["rps"])
    palette = ["#999999", "#2f7ed8", "#4caf50", "#8ab6e8", "#c0c0c0"]
    colors = dict(zip(names, palette))
    panels = [("Saturation, requests/s (1 KiB)", {n: results["rps"][n] for n in names}),
              ("p99 latency at 50% of nginx's saturation, µs", {n: results["p99"][n] for n in names})]
    w, h, pad = 360, 260, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" '
           'font-family="sans-serif" font-size="12">']
    for i, (title, values) in enumerate(panels):
        x0 = i * w
        top = max(values.values()) or 1
        out.append(f'<text x="{x0 + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')
        bw = (w - 2 * pad) / len(names)
        for j, n in enumerate(names):
            bh = (h - 2 * pad - 10) * values[n] / top
            x, y = x0 + pad + j * bw + 8, h - pad - bh
            out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{bw - 16:.0f}" height="{bh:.0f}" fill="{colors[n]}"/>')
            out.append(f'<text x="{x + (bw - 16) / 2:.0f}" y="{y - 4:.0f}" text-anchor="middle">{values[n]:,.0f}</text>')
            out.append(f'<text x="{x + (bw - 16) / 2:.0f}" y="{h - pad + 16}" text-anchor="middle">{n}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    global STEAL_LIMIT, WINDOW_TRIES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating 1 KiB rounds (more, shorter rounds ride out this machine's noise)")
    ap.add_argument("--seconds", type=int, default=1, help="length of each short window")
    ap.add_argument("--windows", type=int, default=6,
                    help="short windows per target in a round, interleaved (the order reversed from "
                         "one window to the next); --profile, --variant and --tail measure in windows "
                         "of --seconds x --windows instead")
    ap.add_argument("--fresh-processes", action="store_true",
                    help="run each round after the first on new proxy processes; they measure nginx "
                         "young, about 2%% dearer than after a few minutes (docs/BENCHMARKS.md)")
    ap.add_argument("--idle", type=int, default=10_000, help="idle keep-alive connections")
    ap.add_argument("--cold", type=int, default=1_000, help="concurrent cold requests")
    ap.add_argument("--profile", action="store_true",
                    help="instead: count tokengate's instructions per request under callgrind")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=PATH",
                    help="another tokengate build (e.g. the release build without PGO) measured beside "
                         "the first in the 1 KiB rounds (and in --tail's windows)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL[,bin=PATH][,ENV=VALUE...]",
                    help="instead: alternate tokengate variants (2 or more) for --rounds rounds and "
                         "report each one's saturation req/s and CPU µs per request (1 KiB)")
    ap.add_argument("--shared", action="store_true",
                    help="with two --variant: measure them head to head instead, loaded at once on the "
                         "shared CPU 1 (--rounds windows), for a CPU per request ratio that drift cancels out of")
    ap.add_argument("--steal-limit", type=float, default=STEAL_LIMIT, metavar="PERCENT",
                    help="run a window again if the hypervisor took more than this share of either CPU "
                         "during it (default %(default)s)")
    ap.add_argument("--tries", type=int, default=WINDOW_TRIES,
                    help="the most times a window is run; the least-stolen try is kept (default %(default)s)")
    ap.add_argument("--tail", type=int, metavar="ROUNDS",
                    help="instead: only the latency windows, direct / tokengate / nginx alternated for "
                         "ROUNDS rounds at 50%% of nginx's saturation, for a verdict on added p99 with more pairs")
    args = ap.parse_args()
    if args.tries < 1 or args.windows < 1:
        ap.error("--tries and --windows must be at least 1")
    span = args.seconds * args.windows  # the window of the modes that measure in one piece
    STEAL_LIMIT, WINDOW_TRIES = args.steal_limit, args.tries

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    procs = []
    try:
        procs.append(start_upstream())
        procs.append(Proc("auth", pinned(0, str(BIN), "sandbox", "auth", "--listen", f"127.0.0.1:{AUTH}",
                                         "--agent", AGENT),
                          env={"SANDBOX_AGENT_SECRET": SECRET, "SANDBOX_JWT_KEY": JWT_KEY}))
        wait_port(UPSTREAM)
        time.sleep(0.5)
        if args.profile:
            return profile(procs, span)
        if args.variant and args.shared:
            return head_to_head(procs, args.variant, args.rounds, span, args.cold)
        if args.variant:
            return variants(procs, args.variant, args.rounds, span)
        if args.tail:
            return tail(procs, args.tail, span, args.also)

        # Exactly one exchange for a burst of concurrent cold requests.
        tg = start_tokengate()
        procs.append(tg)
        statuses = asyncio.run(cold_burst(TOKENGATE, args.cold))
        exchanges = metric("tokengate_token_exchanges_total")
        cold = {"requests": args.cold, "ok": statuses.count(b"200"), "exchanges": exchanges}
        print(f"cold burst: {cold}", flush=True)

        token = read_token()
        # name -> how to start a process of it (answering once started), here and in
        # fresh_processes()
        starts = {"tokengate": start_tokengate,
                  "nginx": lambda: start_variant("nginx", BIN, {}, token)[0]}
        ng = starts["nginx"]()
        procs.append(ng)
        asyncio.run(cold_burst(NGINX, args.cold))  # what tokengate's first process has served
        # name -> (HTTP/1 port, h2c port, measured process, headers the client sends itself)
        bearer = ["-H", f"Authorization: Bearer {token}"]
        targets = {"direct": (UPSTREAM, UPSTREAM_H2, None, bearer),
                   "tokengate": (TOKENGATE, TOKENGATE, tg, []),
                   "nginx": (NGINX, NGINX_H2, ng, [])}
        main_targets = list(targets)
        for i, (label, (port, proc)) in enumerate(start_also(procs, args.also).items()):
            targets[label] = (port, port, proc, [])  # for the 1 KiB rounds only
            starts[label] = lambda i=i: start_also_build(i, args.also[i])[2]
            asyncio.run(cold_burst(port, args.cold))
        proxies = [name for name in targets if name != "direct"]

        def fresh_processes():
            """Each proxy's process replaced by a new one, which serves the same cold burst and
            warm-up as the first (--fresh-processes): one process carries about +-1% of CPU per
            request of its own (its memory layout), which rounds on new processes average out, but
            nginx a minute old costs about 2% more per request than a few minutes on, so this is
            not the default (docs/BENCHMARKS.md, *Method*)."""
            for name in proxies:
                port, h2port, old, headers = targets[name]
                procs.remove(old)
                old.stop()
                new = starts[name]()
                procs.append(new)
                targets[name] = (port, h2port, new, headers)
                asyncio.run(cold_burst(port, args.cold))
                wrk(port, "1k", 2, headers)

        seconds, windows = args.seconds, args.windows

        def sat(name, path, connections=CONNECTIONS):
            """One closed-loop window -> (req/s, CPU µs per request)."""
            port, _, proc, headers = targets[name]
            return steady(lambda: measured(proc, lambda: wrk(port, path, seconds, headers, connections)))[0]

        def lat(name, rate):
            """Latency at `rate` in one window, with how long the proxy waited meanwhile for CPU 1
            while another task held it (ms), and the share of each CPU the hypervisor stole (%)."""
            port, _, proc, headers = targets[name]
            result, stolen = steady(lambda: latency(proc, port, headers, seconds, rate))
            return {**result, "steal_cpu0": stolen[0], "steal_cpu1": stolen[1]}

        def h2(name):
            _, port, proc, headers = targets[name]
            return steady(lambda: measured(proc, lambda: h2load(port, "1k", seconds, headers)))[0]

        for port, _, _, headers in targets.values():  # warm up pools and caches
            wrk(port, "1k", 2, headers)

        rounds = []
        for r in range(args.rounds):
            if r > 0 and args.fresh_processes:
                fresh_processes()
            row = {"rps": {}, "cpu_us": {}, "lat": {}}
            for name, seen in interleaved(list(targets), lambda n: sat(n, "1k"), windows, r).items():
                row["rps"][name], row["cpu_us"][name] = pooled(seen)
            row["rate"] = rate = row["rps"]["nginx"] / 2
            for name, seen in interleaved(list(targets), lambda n: lat(n, rate), windows, r).items():
                row["lat"][name] = {k: med([w[k] for w in seen]) for k in ("p50", "p99", "p99.9")}
                row["lat"][name].update({k: statistics.mean(w[k] for w in seen)
                                         for k in ("steal_cpu0", "steal_cpu1", "waited_ms")})
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)

        res = {"rps": {}, "cpu_us": {}, "p50": {}, "p99": {}, "p99.9": {}, "added": {}, "spread": {},
               "ratios": {}}
        for name in targets:
            res["rps"][name] = med([x["rps"][name] for x in rounds])
            res["spread"][f"rps_{name}"] = spread([x["rps"][name] for x in rounds])
            for p in ("p50", "p99", "p99.9"):
                res[p][name] = med([x["lat"][name][p] for x in rounds])
        for name in proxies:
            res["cpu_us"][name] = med([x["cpu_us"][name] for x in rounds])
            res["spread"][f"cpu_{name}"] = spread([x["cpu_us"][name] for x in rounds])
            added = {p: [x["lat"][name][p] - x["lat"]["direct"][p] for x in rounds]
                     for p in ("p50", "p99", "p99.9")}
            res["added"][name] = {p: med(v) for p, v in added.items()}
            res["spread"][f"added_p99_{name}"] = spread(added["p99"])
        # Within-round ratios against nginx: both sides of each ratio saw the same minute.
        for name in proxies:
            if name == "nginx":
                continue
            res["ratios"][name] = {
                "cpu": [x["cpu_us"][name] / x["cpu_us"]["nginx"] for x in rounds],
                "rps": [x["rps"][name] / x["rps"]["nginx"] for x in rounds],
                "added_p99": [(x["lat"][name]["p99"] - x["lat"]["direct"]["p99"]) -
                              (x["lat"]["nginx"]["p99"] - x["lat"]["direct"]["p99"]) for x in rounds],
            }

        # One run each of the other cases: saturation and CPU per request.
        cases = {}
        for case, path, conns in (("0 B", "0b", CONNECTIONS), ("16 KiB", "16k", CONNECTIONS),
                                  ("1 MiB streamed", "1m", 8)):
            seen = interleaved(main_targets, lambda n: sat(n, path, conns), windows)
            cases[case] = {name: pooled(s) for name, s in seen.items()}
            print(f"{case}: {cases[case]}", flush=True)
        seen = interleaved(main_targets, h2, windows)
        cases["1 KiB, HTTP/2 clients (h2load)"] = {name: pooled(s) for name, s in seen.items()}

        # CPU per request head to head: each tokengate build and nginx loaded at once, sharing
        # CPU 1, so that whatever the machine does in a window it does to both.
        shared = {name: shared_cpu(targets[name][2:], targets["nginx"][2:], [targets[name][0], NGINX],
                                   span, args.rounds)
                  for name in proxies if name != "nginx"}
        print(f"shared CPU: {shared}", flush=True)

        res["rss_mb"] = {name: proc.rss_mb() for name, (_, _, proc, _) in targets.items() if proc}
        idle = {name: idle_rss(targets[name][2], targets[name][0], args.idle)
                for name in main_targets if targets[name][2]}
        nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        results = {"rounds": rounds, "summary": res, "cases": cases, "shared": shared, "idle_rss_mb": idle,
                   "cold": cold, "fresh_processes": args.fresh_processes,
                   "windows": {**WINDOWS, "steal_limit_pct": STEAL_LIMIT},
                   "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release, "nginx": nginx_version}}
        (WORK / "results.json").write_text(json.dumps(results, indent=2))
        chart(res, ROOT / "docs" / "bench-chart.svg")
        report(results)
    finally:
        for p in reversed(procs):
            p.stop()


def profile(procs, seconds):
    """tokengate, then nginx (one process, master_process off), under callgrind, collecting only
    during a warm, steady 1 KiB load: prints instructions per request for each and the top
    functions (inclusive). CG_EXTRA="--cache-sim=yes --branch-sim=yes" adds cache misses and
    a rough cycle estimate."""
    token = bench_token()
    for name in ("tokengate", "nginx"):
        out = WORK / f"callgrind-{name}.out"
        wrapper = ("valgrind", "--tool=callgrind", *os.environ.get("CG_EXTRA", "").split(),
                   f"--callgrind-out-file={out}")
        if name == "tokengate":
            proc, port = start_tokengate(wrapper), TOKENGATE
        else:
            proc, port = start_nginx_proxy(token, wrapper, master=False), NGINX
            wait_port(port, timeout=120)
        procs.append(proc)
        wrk(port, "1k", 5, [], 4)  # warm: token, pool, allocator
        sh("callgrind_control", "-z", str(proc.popen.pid))
        n, _ = wrk(port, "1k", seconds, [], 4)
        sh("callgrind_control", "-d", str(proc.popen.pid))
        proc.stop()
        procs.remove(proc)
        dumps = sorted(WORK.glob(f"callgrind-{name}.out.*"), key=lambda p: p.stat().st_mtime)
        annotated = sh("callgrind_annotate", "--inclusive=yes", str(dumps[-1]))
        totals = next(line for line in annotated.splitlines() if line.endswith("PROGRAM TOTALS"))
        events = dict(zip(re.search(r"^Events shown:\s+(.*)$", annotated, re.M).group(1).split(),
                          (int(x.replace(",", "").replace(".", "0"))
                           for x in re.sub(r"\(\s*[\d.]+%\)", "", totals).split()[:-2])))
        print(f"## {name}\n\n{n} requests, {events['Ir'] / n:,.0f} instructions per request")
        if "I1mr" in events:
            cycles = (events["Ir"] + 10 * (events["I1mr"] + events["D1mr"] + events["D1mw"])
                      + 100 * (events["ILmr"] + events["DLmr"] + events["DLmw"])
                      + 15 * (events.get("Bcm", 0) + events.get("Bim", 0)))
            print(f"L1 instruction misses {events['I1mr'] / n:,.0f}, data misses "
                  f"{(events['D1mr'] + events['D1mw']) / n:,.0f}, mispredicted branches "
                  f"{(events.get('Bcm', 0) + events.get('Bim', 0)) / n:,.0f} per request; estimated cycles "
                  f"(Ir + 10 L1 misses + 100 LL misses + 15 mispredicts) {cycles / n:,.0f}")
        print()
        print("\n".join(annotated.splitlines()[:60]) + "\n", flush=True)


def read_token():
    """The bench credential's token, from the sandbox auth server (`tokengate token --show`),
    for nginx's fixed header; tokengate fetches its own."""
    return re.search(r"token\s+(\S+)", sh(str(BIN), "token", "--config", str(WORK / "proxy.toml"), "bench",
                                          "--show", env={**os.environ, "BENCH_SECRET": SECRET})).group(1)


def bench_token():
    """read_token(), with a tokengate started for it (its config file) and stopped again."""
    tg = start_tokengate()
    try:
        return read_token()
    finally:
        tg.stop()


def parse_variants(specs):
    """`LABEL[,bin=PATH][,ENV=VALUE...]` each -> [(label, binary, env)]."""
    parsed = []
    for spec in specs:
        label, *settings = spec.split(",")
        kv = dict(s.split("=", 1) for s in settings)
        parsed.append((label, Path(kv.pop("bin", BIN)), kv))
    return parsed


def start_variant(label, binary, env, token, name="tokengate", port=TOKENGATE, admin=ADMIN):
    """One variant of parse_variants: the nginx peer proxy (with `token`) if labelled `nginx`,
    else tokengate's `binary` with `env` on `port` -> (process, its port)."""
    if label == "nginx":
        proc = start_nginx_proxy(token)
        wait_port(NGINX)
        return proc, NGINX
    return start_tokengate(binary=binary, extra_env=env, name=name, port=port, admin=admin), port


def variants_token(parsed):
    """The token nginx sends, if one of the variants is nginx."""
    return bench_token() if any(label == "nginx" for label, _, _ in parsed) else None


def head_to_head(procs, specs, windows, seconds, cold):
    """Two variants (`nginx` for the peer proxy) loaded at once, sharing CPU 1, each tokengate
    after a burst of `cold` concurrent cold requests, as the main run's has served: the ratio of
    their CPU per request (shared_cpu)."""
    if len(specs) != 2:
        raise SystemExit("--shared takes exactly two --variant")
    parsed = parse_variants(specs)
    token = variants_token(parsed)
    started = []
    for i, (label, binary, env) in enumerate(parsed):
        port, admin = ALSO_PORTS[i]
        proc, port = start_variant(label, binary, env, token, name=f"also{i}", port=port, admin=admin)
        if label != "nginx":
            asyncio.run(cold_burst(port, cold))
        procs.append(proc)
        wrk(port, "1k", 2, [])  # warm
        started.append((label, proc, port))
    (a, pa, porta), (b, pb, portb) = started
    h = shared_cpu((pa, []), (pb, []), [porta, portb], seconds, windows)
    print(f"{a} / {b}, CPU per request head to head: {h['ratio']:.3f} (windows {h['min']:.3f} to "
          f"{h['max']:.3f}); req/s {h['rps_ratio']:.3f}")


def variants(procs, specs, rounds, seconds):
    """A/B(/C...) of tokengate builds or settings, alternated so drift hits each alike. A variant
    labelled `nginx` is the nginx peer proxy instead, for a side-by-side of the same rounds."""
    parsed = parse_variants(specs)
    token = variants_token(parsed)
    seen = {label: {"rps": [], "cpu_us": [], "user_us": []} for label, _, _ in parsed}
    for r in range(rounds):
        for label, binary, env in parsed:
            proc, port = start_variant(label, binary, env, token)
            procs.append(proc)
            wrk(port, "1k", 2, [])  # warm
            user0 = proc.user_seconds()
            rps, cpu = measured(proc, lambda: wrk(port, "1k", seconds, []))
            user = (proc.user_seconds() - user0) * 1e6 / (rps * seconds)
            proc.stop()
            procs.remove(proc)
            seen[label]["rps"].append(rps)
            seen[label]["cpu_us"].append(cpu)
            seen[label]["user_us"].append(user)
            print(f"round {r + 1} {label}: {rps:,.0f} req/s, {cpu:.1f} µs/request ({user:.1f} user)", flush=True)
    print("\n| variant | req/s (median) | CPU µs/request (median) | of it user | spread req/s | spread CPU |")
    print("|---|---|---|---|---|---|")
    for label, s in seen.items():
        print(f"| {label} | {med(s['rps']):,.0f} | {med(s['cpu_us']):.1f} | {med(s['user_us']):.1f} | "
              f"{spread(s['rps']):.1%} | {spread(s['cpu_us']):.1%} |")


def tail(procs, rounds, seconds, also=()):
    """Added p99 alone, over many alternated rounds: the rate is half of nginx's saturation
    (median of three wrk runs), each round runs direct, tokengate, the --also builds and nginx in
    turn (backward in odd rounds), and the verdict is the paired median with a count of the rounds
    on each side, for each tokengate build against nginx."""
    tg = start_tokengate()
    procs.append(tg)
    token = read_token()
    ng = start_nginx_proxy(token)
    procs.append(ng)
    wait_port(NGINX)
    # name -> (port, measured process or None, headers the client sends itself)
    targets = {"direct": (UPSTREAM, None, ["-H", f"Authorization: Bearer {token}"]),
               "tokengate": (TOKENGATE, tg, [])}
    for label, (port, proc) in start_also(procs, also).items():
        targets[label] = (port, proc, [])
    targets["nginx"] = (NGINX, ng, [])
    builds = [name for name in targets if name not in ("direct", "nginx")]
    proxies = [*builds, "nginx"]
    for port, _, headers in targets.values():
        wrk(port, "1k", 2, headers)  # warm up pools and caches
    rate = med([wrk(NGINX, "1k", seconds, [])[1] for _ in range(3)]) / 2
    print(f"rate: {rate:,.0f} req/s", flush=True)
    p99 = {name: [] for name in targets}
    stolen = {name: [] for name in targets}
    waited = {name: [] for name in targets}
    for r in range(rounds):
        for name in (list(targets) if r % 2 == 0 else list(reversed(targets))):
            port, proc, headers = targets[name]
            window, steal = steady(lambda: latency(proc, port, headers, seconds, rate))
            p99[name].append(window["p99"])
            stolen[name].append(steal[1])
            waited[name].append(window["waited_ms"])
        print(f"round {r + 1}: p99 µs " + ", ".join(f"{n} {p99[n][-1]:,.0f}" for n in targets) +
              "; steal CPU 1 % " + ", ".join(f"{stolen[n][-1]:.0f}" for n in targets) +
              "; waited for CPU 1 ms " + ", ".join(f"{n} {waited[n][-1]:.1f}" for n in proxies), flush=True)
    print(f"\nadded p99 µs, medians: " + ", ".join(f"{n} {med(p99[n]) - med(p99['direct']):,.0f}"
                                                   for n in proxies) +
          f" (direct's own p99 {med(p99['direct']):,.0f})")
    print("waited for CPU 1 while another task held it, ms per window, medians: " +
          ", ".join(f"{n} {med(waited[n]):.1f}" for n in proxies))
    for name in builds:
        diff = [t - n for t, n in zip(p99[name], p99["nginx"])]  # direct's p99 cancels out
        print(f"{name}'s p99 minus nginx's, paired: median {med(diff):+,.0f} µs "
              f"({told_apart(diff, 0, lambda x: f'{x:+,.0f}', 'nginx')}); above in "
              f"{sum(d > 0 for d in diff)} of {rounds} rounds, below in {sum(d < 0 for d in diff)}")
    print(f"latency windows: {windows_line(WINDOWS)}")


def report(results):
    res = results["summary"]
    proxies = [n for n in res["cpu_us"] if n != "nginx"]
    rate = med([x["rate"] for x in results["rounds"]])
    print("\n## 1 KiB, HTTP/1.1 keep-alive (medians of the rounds)\n")
    print("| | direct | " + " | ".join(proxies) + " | nginx |")
    print("|---|---|" + "---|" * len(proxies) + "---|")
    print(f"| saturation req/s | {res['rps']['direct']:,.0f} | " +
          " | ".join(f"{res['rps'][n]:,.0f}" for n in proxies) + f" | {res['rps']['nginx']:,.0f} |")
    print("| proxy CPU µs/request | | " + " | ".join(f"{res['cpu_us'][n]:.1f}" for n in proxies) +
          f" | {res['cpu_us']['nginx']:.1f} |")
    for p in ("p50", "p99", "p99.9"):
        print(f"| added {p} µs (at {rate:,.0f} req/s) | ({res[p]['direct']:,.0f} total) | " +
              " | ".join(f"{res['added'][n][p]:,.0f}" for n in proxies) + f" | {res['added']['nginx'][p]:,.0f} |")
    print("| RSS MB after the runs | | " + " | ".join(f"{res['rss_mb'][n]:.1f}" for n in proxies) +
          f" | {res['rss_mb']['nginx']:.1f} |")
    print("\nspread (max-min)/median over the rounds: " +
          ", ".join(f"{k} {v:.1%}" for k, v in res["spread"].items()))
    print("\nWithin-round ratios against nginx (each round's pair saw the same minute):\n")
    for name, r in res["ratios"].items():
        print(f"- {name}: CPU {', '.join(f'{x:.2f}' for x in r['cpu'])} (median {med(r['cpu']):.2f}); "
              f"req/s {', '.join(f'{x:.2f}' for x in r['rps'])} (median {med(r['rps']):.2f}); "
              f"added p99 minus nginx's, µs: {', '.join(f'{x:,.0f}' for x in r['added_p99'])} "
              f"(median {med(r['added_p99']):,.0f})")
    print("\nCPU per request head to head (loaded at once, sharing CPU 1), against nginx: " +
          "; ".join(f"{name} {h['ratio']:.3f} (windows {h['min']:.3f} to {h['max']:.3f}), req/s "
                    f"{h['rps_ratio']:.3f}" for name, h in results["shared"].items()))
    print("\nEach round after the first on new proxy processes: "
          f"{'yes (--fresh-processes)' if results.get('fresh_processes') else 'no'}.")
    print(f"\nMeasurement windows: {windows_line(results['windows'])}.")
    print("\nCPU time the hypervisor stole during each round's latency window, % of CPU 1 (CPU 0):\n")
    for name in ["direct", *proxies, "nginx"]:
        print(f"- {name}: " + ", ".join(f"{x['lat'][name]['steal_cpu1']:.0f} ({x['lat'][name]['steal_cpu0']:.0f})"
                                         for x in results["rounds"]))
    print("\nHow long the proxy waited on CPU 1's run queue while another task of the machine ran there, "
          "ms per latency window (mean of each round's):\n")
    for name in [*proxies, "nginx"]:
        print(f"- {name}: " + ", ".join(f"{x['lat'][name]['waited_ms']:.1f}" for x in results["rounds"]))
    print("\n## Other cases (one run each): saturation req/s, proxy CPU µs/request\n")
    print("| case | direct | tokengate | nginx | req/s ratio | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for case, row in results["cases"].items():
        (d, _), (t, tc), (n, nc) = row["direct"], row["tokengate"], row["nginx"]
        print(f"| {case} | {d:,.0f} | {t:,.0f} ({tc:.1f} µs) | {n:,.0f} ({nc:.1f} µs) | {t / n:.2f} | {tc / nc:.2f} |")
    print("\n## Idle keep-alive connections: RSS MB before -> after\n")
    for name, (before, after) in results["idle_rss_mb"].items():
        print(f"- {name}: {before:.1f} -> {after:.1f} (+{after - before:.1f} MB)")
    print(f"\n## Cold burst\n\n{results['cold']}")

    # Each target is read two ways: the ratio of the medians (the wording) and the median
    # of the within-round ratios (paired, so drift between rounds cancels). Met only if both agree.
    t = res["ratios"]["tokengate"]
    cpu_m = res["cpu_us"]["tokengate"] / res["cpu_us"]["nginx"]
    rps_m = res["rps"]["tokengate"] / res["rps"]["nginx"]
    p99_m = res["added"]["tokengate"]["p99"] - res["added"]["nginx"]["p99"]
    idle_before, idle_after = results["idle_rss_mb"]["tokengate"]
    cold = results["cold"]
    ratio, micros = (lambda x: f"{x:.2f}x"), (lambda x: f"{x:+,.0f} µs")
    checks = [
        ("CPU per request <= 1.0x nginx", f"{cpu_m:.2f}x of the medians, {med(t['cpu']):.2f}x paired "
         f"({told_apart(t['cpu'], 1.0, ratio)}; head to head on a shared CPU, not part of the verdict: "
         f"{results['shared']['tokengate']['ratio']:.3f}x)",
         cpu_m <= 1.0 and med(t["cpu"]) <= 1.0),
        ("saturation req/s >= 1.0x nginx", f"{rps_m:.2f}x of the medians, {med(t['rps']):.2f}x paired "
         f"({told_apart(t['rps'], 1.0, ratio)})",
         rps_m >= 1.0 and med(t["rps"]) >= 1.0),
        ("added p99 <= nginx's", f"{p99_m:+,.0f} µs between the medians, {med(t['added_p99']):+,.0f} µs paired "
         f"({told_apart(t['added_p99'], 0, micros, 'nginx')})",
         p99_m <= 0 and med(t["added_p99"]) <= 0),
        ("RSS growth with idle keep-alive connections <= 100 MB", f"+{idle_after - idle_before:.1f} MB",
         idle_after - idle_before <= 100),
        ("exactly 1 exchange for the cold burst", f"{cold['exchanges']:.0f} ({cold['ok']}/{cold['requests']} ok)",
         cold["exchanges"] == 1 and cold["ok"] == cold["requests"]),
    ]
    print("\n## Targets\n")
    for what, value, ok in checks:
        print(f"- {'met   ' if ok else 'MISSED'} {what}: {value}")


def exit_on_signal(signum, _frame):
    """SIGTERM and SIGHUP end the run as Ctrl-C does: SystemExit unwinds through each mode's
    `finally`, which stops nginx, tokengate and the sandbox, so their ports are free for the next run."""
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    try:
        sys.exit(main())
    except Frozen as frozen:  # outside a measured window (a warm-up), where nothing runs it again
        sys.exit(f"stalled outside a measured window: {frozen}")
