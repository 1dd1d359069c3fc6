#!/usr/bin/env python3
"""`make bench-dataplane`: client -> agent A -> QUIC -> agent B -> backend, beside the same chain
through two haproxy instances with mutual TLS between them, and beside direct, in one run on
loopback.

Chains (all L4, so every byte of the client's connection crosses both proxies):
  direct      wrk -> nginx
  grapevine   wrk -> agent A upstream port -> QUIC (mutual TLS) -> agent B -> nginx
  haproxy     wrk -> haproxy A (tcp) -> TLS 1.3 with client certificates -> haproxy B (tcp) -> nginx
  baseline    (with --baseline-agent PATH) the grapevine chain with another agent binary, to
              compare two builds in one run (figures between runs on a shared machine drift
              more than most changes move them)

Measured per chain: latency p50 and p99 at concurrency 1 and 64 (wrk, HTTP/1.1 keep-alive, a
small body), requests/s at concurrency 64, proxy CPU microseconds per request at concurrency 1 and 64 (both proxies,
from /proc), bulk throughput of one TCP connection (iperf3 through the chain) with the UDP
receive errors during it, and RSS per idle connection (10,000 connections held open; an agent
holds one descriptor per connection, haproxy two, so haproxy holds as many as its descriptor
limit allows, 9,800 under this machine's hard limit of 20,000), for both proxies together and
per proxy process. The idle figure is taken once per chain; the others in rounds (three by
default), every chain once per round, and the medians are shown.
"""
import argparse
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
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target", "release", "agent")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX_PORT, IPERF_PORT = 28080, 28201


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def rss_kb(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def udp_rcv_errors():
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    header, values = lines[0], lines[1]
    # InErrors counts every datagram dropped on receipt, RcvbufErrors (full buffers) included.
    return int(values[header.index("InErrors")])


def to_us(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise RuntimeError(f"cannot read a latency from {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1000, "s": 1e6}[unit]


def wrk(port, conns, seconds):
    threads = min(conns, 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    # The "Latency Distribution" lines start with the percentile (others end with one).
    p50m, p99m = re.search(r"^\s+50%\s+(\S+)", out, re.M), re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not p50m or not p99m:
        raise RuntimeError(f"wrk against port {port} measured nothing:\n{out}")
    p50, p99 = to_us(p50m.group(1)), to_us(p99m.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    return p50, p99, rps, total, errors.group(1) if errors else ""


class Chain:
    def __init__(self, name, port, pids):
        self.name, self.port, self.pids = name, port, pids


def start(argv, **kw):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the latency, saturation and bulk runs; medians are shown")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections for the RSS figure")
    ap.add_argument("--baseline-agent", metavar="PATH",
                    help="another agent binary (an earlier build, say) measured as a fourth chain in the same run")
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The client holds one descriptor per connection, an agent one, haproxy two.
    idle_for = {"grapevine": min(args.idle, hard - 200), "baseline": min(args.idle, hard - 200),
                "haproxy": min(args.idle, max(0, hard // 2 - 200))}
    work = tempfile.mkdtemp(prefix="bench-dataplane-")
    procs = []
    try:
        # Backends: nginx answering a small body, iperf3 for bulk.
        with open(f"{work}/nginx.conf", "w") as f:
            f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 30000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{NGINX_PORT} backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        procs.append(start(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"]))
        procs.append(start(["iperf3", "-s", "-p", str(IPERF_PORT), "-B", "127.0.0.1"]))
        wait_port(NGINX_PORT)
        wait_port(IPERF_PORT)

        # PKI for both chains, from the agent's own commands.
        subprocess.run([AGENT, "ca", "init", "--out", f"{work}/pki"], check=True, capture_output=True)
        for node in ("a", "b", "c", "d"):
            subprocess.run([AGENT, "cert", "issue", "--ca", f"{work}/pki", "--node", node, "--out", f"{work}/pki"], check=True, capture_output=True)
            with open(f"{work}/pki/{node}.both.pem", "w") as f:
                f.write(open(f"{work}/pki/{node}.pem").read() + open(f"{work}/pki/{node}.key").read())
        with open(f"{work}/cluster.key", "w") as f:
            f.write(subprocess.check_output([AGENT, "keygen"], text=True))

        # Grapevine: B fronts nginx and iperf3; A has upstream ports for both (web on port
        # 28001 + 2k, bulk on 28002 + 2k, for pair k). The baseline pair is a cluster of its own.
        common = ["--cluster-key-file", f"{work}/cluster.key", "--ca-file", f"{work}/pki/ca.pem", "--log-level", "warn"]

        def start_pair(binary, k, sender, receiver):
            def ports(i):
                return {"gossip": 28301 + 2 * k + i, "data": 28311 + 2 * k + i, "admin": 28321 + 2 * k + i}
            pa, pb = ports(0), ports(1)

            def agent(node, p, extra):
                return start([binary, "run", "--node-id", node, "--region", "r", *common, "--cert-file", f"{work}/pki/{node}.pem",
                              "--key-file", f"{work}/pki/{node}.key", "--gossip-addr", f"127.0.0.1:{p['gossip']}",
                              "--data-addr", f"127.0.0.1:{p['data']}", "--admin-addr", f"127.0.0.1:{p['admin']}",
                              "--dns-addr", "127.0.0.1:0", "--data-dir", f"{work}/{node}", *extra])
            x = agent(sender, pa, ["--upstream", f"web=127.0.0.1:{28001 + 2 * k}", "--upstream", f"bulk=127.0.0.1:{28002 + 2 * k}"])
            y = agent(receiver, pb, ["--join", f"127.0.0.1:{pa['gossip']}", "--service", f"web={NGINX_PORT}", "--service", f"bulk={IPERF_PORT}"])
            procs.extend([x, y])
            wait_port(28001 + 2 * k)
            # A port already taken (another agent left running) would have the chain measure that one.
            time.sleep(1)
            for name, p in ((sender, x), (receiver, y)):
                if p.poll() is not None:
                    sys.exit(f"agent {name} exited at start (code {p.returncode}): are ports 28001-28330 free?")
            deadline = time.time() + 30
            while time.time() < deadline:
                out = subprocess.run([AGENT, "services", "--json", "--admin-addr", f"127.0.0.1:{pa['admin']}"], capture_output=True, text=True).stdout
                if out.count('"healthy": true') >= 2:
                    break
                time.sleep(0.2)
            return x, y

        a, b = start_pair(AGENT, 0, "a", "b")
        if args.baseline_agent:
            base = start_pair(os.path.abspath(args.baseline_agent), 1, "c", "d")

        # haproxy: A (tcp) -> TLS with client certificates -> B (tcp).
        ca = f"{work}/pki/ca.pem"
        hb = f"""global
  maxconn 9900
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe_web
  bind 127.0.0.1:28102 ssl crt {work}/pki/b.both.pem ca-file {ca} verify required
  default_backend be_web
backend be_web
  server n 127.0.0.1:{NGINX_PORT}
frontend fe_bulk
  bind 127.0.0.1:28104 ssl crt {work}/pki/b.both.pem ca-file {ca} verify required
  default_backend be_bulk
backend be_bulk
  server n 127.0.0.1:{IPERF_PORT}
"""
        ha = f"""global
  maxconn 9900
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe_web
  bind 127.0.0.1:28101
  default_backend be_web
backend be_web
  server b 127.0.0.1:28102 ssl crt {work}/pki/a.both.pem ca-file {ca} verify required verifyhost b sni str(b)
frontend fe_bulk
  bind 127.0.0.1:28103
  default_backend be_bulk
backend be_bulk
  server b 127.0.0.1:28104 ssl crt {work}/pki/a.both.pem ca-file {ca} verify required verifyhost b sni str(b)
"""
        open(f"{work}/hb.cfg", "w").write(hb)
        open(f"{work}/ha.cfg", "w").write(ha)
        hap_b = start(["haproxy", "-db", "-f", f"{work}/hb.cfg"])
        hap_a = start(["haproxy", "-db", "-f", f"{work}/ha.cfg"])
        procs += [hap_a, hap_b]
        wait_port(28101)
        wait_port(28102)

        chains = [Chain("direct", NGINX_PORT, []), Chain("grapevine", 28001, [a.pid, b.pid]), Chain("haproxy", 28101, [hap_a.pid, hap_b.pid])]
        bulk_ports = {"direct": IPERF_PORT, "grapevine": 28002, "haproxy": 28103}
        if args.baseline_agent:
            chains.append(Chain("baseline", 28003, [p.pid for p in base]))
            bulk_ports["baseline"] = 28004
        results = {c.name: {} for c in chains}
        # Idle connections first, on proxies that have only been warmed up: after bulk and
        # saturation runs, their heaps have room to spare and the figure would read low.
        for c in chains:
            wrk(c.port, 1, 1)  # warm up: connections, handshakes
            if not (c.pids and idle_for[c.name]):
                continue
            print(f"  {c.name}: {idle_for[c.name]} idle connections ...", file=sys.stderr, flush=True)
            r = results[c.name]
            before = rss_kb(c.pids)
            socks = []
            for _ in range(idle_for[c.name]):
                s = socket.create_connection(("127.0.0.1", c.port))
                socks.append(s)
            time.sleep(3)
            # Check the last connection really reached the backend.
            socks[-1].sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            socks[-1].settimeout(10)
            ok = socks[-1].recv(100).startswith(b"HTTP/1.1 200")
            r["rss_per_conn"] = (rss_kb(c.pids) - before) * 1024 / len(socks)
            r["idle_conns"] = len(socks)
            r["idle_ok"] = ok
            for s in socks:
                s.close()
            time.sleep(2)

        # Rounds: every chain once per round, in turn, so a burst of noise on this shared
        # machine lands on one round of each rather than on one chain; the medians are shown.
        samples = {c.name: {} for c in chains}
        for rnd in range(args.rounds):
            for c in chains:
                print(f"  round {rnd + 1}/{args.rounds}: {c.name} ...", file=sys.stderr, flush=True)
                m = samples[c.name]
                t0 = cpu_ticks(c.pids) if c.pids else 0
                p50, p99, _, total, _ = wrk(c.port, 1, args.seconds)
                m.setdefault("p50_c1", []).append(p50)
                m.setdefault("p99_c1", []).append(p99)
                m.setdefault("cpu_us_c1", []).append((cpu_ticks(c.pids) - t0) / CLK_TCK * 1e6 / total if c.pids else 0.0)
                t0 = cpu_ticks(c.pids) if c.pids else 0
                p50, p99, rps, total, errors = wrk(c.port, 64, args.seconds)
                m.setdefault("p50_c64", []).append(p50)
                m.setdefault("p99_c64", []).append(p99)
                m.setdefault("rps", []).append(rps)
                m.setdefault("errors", []).append(errors)
                m.setdefault("cpu_us", []).append((cpu_ticks(c.pids) - t0) / CLK_TCK * 1e6 / total if c.pids else 0.0)
                e0 = udp_rcv_errors()
                out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(bulk_ports[c.name]), "-t", "5", "-J"], capture_output=True, text=True)
                try:
                    m.setdefault("gbit", []).append(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9)
                except (ValueError, KeyError):
                    pass
                m.setdefault("udp_errors", []).append(udp_rcv_errors() - e0)
        for name, m in samples.items():
            for key, vals in m.items():
                if key == "errors":
                    results[name][key] = "; ".join(v for v in vals if v)
                elif key == "udp_errors":
                    results[name][key] = sum(vals)
                elif vals:
                    results[name][key] = statistics.median(vals)
                results[name][key + "_all"] = vals

        d, g, h = results["direct"], results["grapevine"], results["haproxy"]
        bl = results.get("baseline")
        print()
        print(f"data plane on loopback, one run, medians of {args.rounds} rounds; added = chain minus direct; ratio = grapevine / haproxy"
              + ("; vs base = grapevine / baseline" if bl else ""))
        print(f"  {'metric':<44} {'direct':>10} {'grapevine':>11} {'haproxy':>10} {'ratio':>7}"
              + (f" {'baseline':>11} {'vs base':>7}" if bl else ""))

        def ratio(x, y):
            return f"{x / y:.2f}" if x is not None and y else "-"

        def line(title, cells, vals):
            text = f"  {title:<44} {cells[0]:>10} {cells[1]:>11} {cells[2]:>10} {ratio(vals[1], vals[2]):>7}"
            if bl:
                text += f" {cells[3]:>11} {ratio(vals[1], vals[3]):>7}"
            print(text)

        def row(title, key, unit, added=False, fmt="{:.0f}"):
            chains_here = [d, g, h] + ([bl] if bl else [])
            vals = [r.get(key) for r in chains_here]
            if added:
                vals = [None] + [r[key] - d[key] for r in chains_here[1:]]
            cells = ["-" if v is None else fmt.format(v) + unit for v in vals]
            line(title, cells, vals)

        row("latency p50, concurrency 1", "p50_c1", " µs")
        row("added p50, concurrency 1", "p50_c1", " µs", added=True)
        row("latency p99, concurrency 1", "p99_c1", " µs")
        row("latency p50, concurrency 64", "p50_c64", " µs")
        row("added p50, concurrency 64", "p50_c64", " µs", added=True)
        row("latency p99, concurrency 64", "p99_c64", " µs")
        row("requests/s, concurrency 64", "rps", "")
        row("proxy CPU per request, concurrency 1", "cpu_us_c1", " µs", fmt="{:.1f}")
        row("proxy CPU per request, concurrency 64", "cpu_us", " µs", fmt="{:.1f}")
        row("bulk, one TCP connection (iperf3)", "gbit", " Gbit/s", fmt="{:.2f}")
        row("UDP receive errors during bulk (all rounds)", "udp_errors", "")
        names = ["grapevine", "haproxy"] + (["baseline"] if bl else [])
        if "rss_per_conn" in g:
            for title, per in (("RSS per idle connection, both proxies", 1), ("RSS per idle connection, per proxy", 2)):
                vals = [None, g["rss_per_conn"] / per, h["rss_per_conn"] / per] + ([bl["rss_per_conn"] / per] if bl else [])
                line(title, ["-" if v is None else f"{v:.0f} B" for v in vals], vals)
            print("  (held open: " + ", ".join(f"{n} {results[n]['idle_conns']}" for n in names) + ")")
            print("  (the last idle connection answered a request: " + ", ".join(f"{n} {results[n]['idle_ok']}" for n in names) + ")")
        print("  (bulk per round, Gbit/s: " + "; ".join(n + " " + " ".join(f"{v:.2f}" for v in results[n].get("gbit_all", [])) for n in names) + ")")
        print("  (UDP receive errors per round: " + "; ".join(n + " " + " ".join(str(v) for v in results[n].get("udp_errors_all", [])) for n in names) + ")")
        for name, r in results.items():
            if r["errors"]:
                print(f"  note: wrk socket errors on {name}: {r['errors']}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
