#!/usr/bin/env python3
"""`make bench-membership`: Grapevine's agent beside HashiCorp Serf (LAN profile) and beside the
agent's previous membership (one global chitchat pool, commit 6ac710f, built by
scripts/build_baseline.sh), in one run on loopback, at N = 10, 30, 60 and 100 processes.

For each system and N it measures:
  - join convergence: all N started at once, time until every member has seen all N alive;
  - detection: kill -9 of one member, time until the first and the last survivor mark it dead;
  - idle traffic per agent: bytes/s and datagrams/s on the wire (tcpdump on lo, IP headers
    included), and the largest datagram;
  - RSS and CPU% per agent at idle (from /proc).

Events are timed when each agent's log line arrives here (Serf's logs carry only whole
seconds): Serf's "EventMemberJoin"/"EventMemberFailed", Grapevine's "member state changed".
Every figure is printed beside Serf's from the same run, with the ratio. Figures on a shared
2-core machine are noisy: compare ratios, and rerun for medians (`--runs`).
"""
import argparse
import json
import os
import random
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target", "release", "agent")
BASELINE = os.path.join(ROOT, "target", "baseline", "release", "agent")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """One agent process whose output lines are stamped with their arrival time."""

    def __init__(self, name, argv, on_line):
        self.name = name
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, args=(on_line,), daemon=True)
        self.thread.start()

    def _read(self, on_line):
        for line in self.p.stdout:
            on_line(self.name, time.monotonic(), line)

    def rss_kb(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for l in f:
                if l.startswith("VmRSS:"):
                    return int(l.split()[1])
        return 0

    def cpu_ticks(self):
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class System:
    """How to start one system's agent and read its membership events from its log."""

    def __init__(self, label):
        self.label = label


class Serf(System):
    JOIN = re.compile(r"EventMemberJoin: (\S+)")
    FAIL = re.compile(r"EventMemberFailed: (\S+)")

    def __init__(self):
        super().__init__("serf")

    def argv(self, i, n, base, workdir):
        return ["serf", "agent", f"-node=s{i}", f"-bind=127.0.0.1:{base + i}",
                f"-rpc-addr=127.0.0.1:{base + 200 + i}", "-profile=lan", "-log-level=info",
                f"-retry-join=127.0.0.1:{base}", "-retry-interval=1s"]

    def parse(self, line):
        m = self.JOIN.search(line)
        if m:
            return ("alive", m.group(1))
        m = self.FAIL.search(line)
        if m:
            return ("dead", m.group(1))
        return None

    def node(self, i):
        return f"s{i}"


class Grapevine(System):
    """Agents at default settings, spread round-robin over `regions` regions (region pools,
    SWIM, two gateways per region); `extra` adds agent flags."""

    def __init__(self, regions, extra=()):
        super().__init__(f"grapevine/{regions}r" + ("".join(" " + e for e in extra)))
        self.regions = regions
        self.extra = list(extra)
        self.key = None

    def argv(self, i, n, base, workdir):
        if i == 0:
            self.key = os.path.join(workdir, "cluster.key")
            with open(self.key, "w") as f:
                f.write(subprocess.check_output([AGENT, "keygen"], text=True))
        return [AGENT, "run", "--node-id", f"g{i}", "--region", f"r{i % self.regions}", "--log-format", "json",
                "--gossip-addr", f"127.0.0.1:{base + i}", "--admin-addr", f"127.0.0.1:{base + 200 + i}", "--dns-addr", "127.0.0.1:0",
                "--cluster-key-file", self.key, "--data-dir", os.path.join(workdir, f"g{i}"),
                "--join", f"127.0.0.1:{base}"] + self.extra

    def parse(self, line):
        if "member state changed" not in line:
            return None
        try:
            d = json.loads(line)
        except ValueError:
            return None
        if d.get("state") in ("alive", "dead"):
            return (d["state"], d["member"])
        return None

    def node(self, i):
        return f"g{i}"


class Baseline(Grapevine):
    """The agent before region pools and SWIM (commit 6ac710f): one chitchat pool for the whole
    cluster at its defaults then (500 ms rounds, phi failure detection); same regions."""

    def __init__(self, regions):
        super().__init__(regions)
        self.label = f"chitchat-1pool/{regions}r"

    def argv(self, i, n, base, workdir):
        return [BASELINE] + super().argv(i, n, base, workdir)[1:]


def capture(ports, seconds):
    """Bytes, datagrams and the largest datagram on lo to or from the port range, per second."""
    lo, hi = ports
    cmd = ["tcpdump", "-i", "lo", "-nn", "-q", "-l", "-B", "16384",
           f"(udp or tcp) and portrange {lo}-{hi}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    time.sleep(0.5)  # let tcpdump attach
    start = time.monotonic()
    total = pkts = largest = 0
    deadline = start + seconds
    while time.monotonic() < deadline:
        for _ in sel.select(timeout=0.2):
            line = p.stdout.readline()
            m = re.search(r"length (\d+)", line)
            if m:
                # tcpdump -q reports the UDP/TCP payload length; add IPv4 + UDP/TCP headers.
                size = int(m.group(1)) + (28 if " UDP" in line else 40)
                total += size
                pkts += 1
                largest = max(largest, size)
    elapsed = time.monotonic() - start
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=5)
    dropped = re.search(r"(\d+) packets dropped by kernel", err or "")
    return total / elapsed, pkts / elapsed, largest, int(dropped.group(1)) if dropped else 0


def run_one(system, n, base, idle_seconds, settle):
    events = []  # (time, observer, kind, subject)
    lock = threading.Lock()

    def on_line(name, t, line):
        ev = system.parse(line)
        if ev:
            with lock:
                events.append((t, name, ev[0], ev[1]))

    workdir = tempfile.mkdtemp(prefix="bench-" + re.sub(r"[^A-Za-z0-9]+", "-", system.label) + "-")
    procs = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            procs.append(Proc(system.node(i), system.argv(i, n, base, workdir), on_line))
        names = [system.node(i) for i in range(n)]

        def seen_alive(observer):
            with lock:
                return {s for (_, o, k, s) in events if o == observer and k == "alive"} | {observer}

        deadline = t0 + 120
        converged = None
        while time.monotonic() < deadline:
            dead = [p.name for p in procs if p.p.poll() is not None]
            if dead:
                raise RuntimeError(f"{system.label}: agents {dead} exited during start-up")
            if all(len(seen_alive(o)) >= n for o in names):
                with lock:
                    converged = max(t for (t, o, k, s) in events if k == "alive") - t0
                break
            time.sleep(0.05)
        # Idle: let the join settle, then measure traffic, memory and CPU.
        time.sleep(settle)
        cpu0 = {p.name: p.cpu_ticks() for p in procs}
        c0 = time.monotonic()
        bps, dps, largest, dropped = capture((base, base + n), idle_seconds)
        cpu_secs = time.monotonic() - c0
        cpu = statistics.mean((p.cpu_ticks() - cpu0[p.name]) / CLK_TCK / cpu_secs * 100 for p in procs)
        rss = statistics.median(p.rss_kb() for p in procs) / 1024
        # Crash one member (not the seed) and time the survivors' verdicts.
        victim = procs[random.randrange(1, n)]
        tk = time.monotonic()
        victim.kill()
        survivors = [p.name for p in procs if p is not victim]
        first = last = None
        while time.monotonic() < tk + 90:
            with lock:
                seen = {o: t for (t, o, k, s) in events if k == "dead" and s == victim.name and t >= tk}
            if seen and first is None:
                first = min(seen.values()) - tk
            if all(o in seen for o in survivors):
                last = max(seen.values()) - tk
                break
            time.sleep(0.05)
        return {
            "converge_s": converged, "detect_first_s": first, "detect_all_s": last,
            "bytes_per_agent_s": bps / n, "datagrams_per_agent_s": dps / n, "largest_datagram": largest,
            "tcpdump_dropped": dropped, "rss_mb": rss, "cpu_pct": cpu,
        }
    finally:
        for p in procs:
            p.kill()
        subprocess.run(["rm", "-rf", workdir])


def fmt(v, unit):
    if v is None:
        return "timeout"
    return f"{v:.2f} {unit}" if v < 100 else f"{v:.0f} {unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,30,60,100", help="cluster sizes (at most 100: admin ports sit 200 above gossip ports)")
    ap.add_argument("--regions", default="1,3", help="Grapevine runs: agents spread over this many regions")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle traffic capture (the region pool's anti-entropy round is 90 s, so short captures are noisy)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between join convergence and the idle capture")
    ap.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-pool chitchat agent (needs commit 6ac710f in this clone)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    regions = [int(r) for r in args.regions.split(",")]
    grapevines = [Grapevine(r) for r in regions]
    baselines = {} if args.no_baseline else {r: Baseline(r) for r in regions}
    systems = [Serf()] + grapevines + list(baselines.values())
    results = {}
    # Ports stay below Linux's ephemeral range (32768 up), so no outgoing connection holds one.
    base = 20000
    for n in sizes:
        for s in systems:
            runs = []
            for r in range(args.runs):
                for attempt in range(2):
                    base += 300
                    print(f"  {s.label} N={n} run {r + 1}/{args.runs} ...", file=sys.stderr, flush=True)
                    try:
                        runs.append(run_one(s, n, base, args.idle, args.settle))
                        break
                    except RuntimeError as e:
                        if attempt == 1:
                            raise
                        print(f"  {e}; retrying on other ports", file=sys.stderr, flush=True)
            med = {}
            for k in runs[0]:
                vals = [x[k] for x in runs if x[k] is not None]
                med[k] = statistics.median(vals) if vals else None
            results[(s.label, n)] = med
    rows = [
        ("join convergence (all N see N alive)", "converge_s", "s"),
        ("kill -9 seen dead by the first survivor", "detect_first_s", "s"),
        ("kill -9 seen dead by every survivor", "detect_all_s", "s"),
        ("idle bytes/s per agent (wire, with headers)", "bytes_per_agent_s", "B/s"),
        ("idle datagrams/s per agent", "datagrams_per_agent_s", "/s"),
        ("largest datagram", "largest_datagram", "B"),
        ("RSS per agent (median)", "rss_mb", "MB"),
        ("CPU per agent at idle", "cpu_pct", "%"),
    ]
    print()
    print("membership beside Serf (LAN profile) and the single-pool chitchat agent, loopback;")
    print(f"medians of {args.runs} run(s); ratio = grapevine / serf")
    for s in grapevines:
        b = baselines.get(s.regions)
        print(f"\n{s.label} (default settings, {s.regions} region(s)):")
        print(f"  {'metric':<46} {'N':>3} {'grapevine':>12} {'1-pool':>12} {'serf':>12} {'ratio':>7}")
        for title, key, unit in rows:
            for n in sizes:
                g, f = results[(s.label, n)][key], results[("serf", n)][key]
                c = fmt(results[(b.label, n)][key], unit) if b else "-"
                ratio = f"{g / f:.2f}" if g is not None and f else "-"
                print(f"  {title:<46} {n:>3} {fmt(g, unit):>12} {c:>12} {fmt(f, unit):>12} {ratio:>7}")
    drops = {k: v["tcpdump_dropped"] for k, v in results.items() if v["tcpdump_dropped"]}
    if drops:
        print(f"\nnote: tcpdump dropped packets in {drops}; traffic figures there are low bounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}/N={k[1]}": v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
