#!/usr/bin/env python3
"""Idle memory of the elb-quorum listener under a real supervisord, beside supervisor's own minimal
Python listener (childutils wait/ok loop) in the same supervisord, after both handled the same events.

    idle_rss.py --bin target/release/elb-quorum [--events 2000]

Both listeners subscribe to PROCESS_STATE, REMOTE_COMMUNICATION and TICK_5. A flapping program and
REMOTE_COMMUNICATION events (type `bench`, ignored by elb-quorum) give them work; then VmRSS and
VmHWM are read from /proc, with the memory the kernel cannot reclaim (anonymous plus private
dirty pages, /proc/PID/smaps_rollup), the figure that matters on a loaded host. The binary is read whole before the start, so that the page cache
holds all of it: the kernel then maps every 64 KiB window around a touched page of it
(fault-around), the worst case and a repeatable one (a partly cached binary measured up to 1 MiB
less, by chance). `--smaps` adds elb-quorum's resident memory per mapping. elb-quorum runs with a
static identity and no AWS endpoint reachable (127.0.0.1:9): it makes no AWS call while idle.
Everything binds 127.0.0.1 or a unix socket.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xmlrpc.client

from supervisor.xmlrpc import SupervisorTransport

# elb-quorum as both benchmarks run it: a static identity, no supervisord needed at start, AWS
# pointed at a closed port (no call is made while idle). benches/hot_text.py uses the same.
def listen_args(state_dir):
    return ["listen", "--lb", "bench", "--instance-id", "i-bench", "--hostname", "n.bench.example.com",
            "--members", "static:4", "--state-dir", state_dir, "--log-level", "warn"]


LISTEN_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "us-east-1",
              "AWS_EC2_METADATA_DISABLED": "true", "ELB_QUORUM_LOG_TARGET": "stderr"}

MINIMAL = """import sys
from supervisor import childutils
while True:
    headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
    childutils.listener.ok(sys.stdout)
"""


def status(pid):
    """VmRSS and VmHWM, and from smaps_rollup the pages the kernel cannot drop under pressure without
    swap: Anonymous plus the Private_Dirty pages that are not anonymous (a file mapping's pages
    written by the dynamic loader). Clean file pages (the binary's text) are reclaimable."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    roll = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Anonymous", "Private_Dirty", "Shared_Dirty"):
                roll[k] = int(v.split()[0])
    # Anonymous pages are private dirty (or zero) pages too: count the larger of the two, plus shared dirty.
    out["Unreclaimable"] = max(roll.get("Anonymous", 0), roll.get("Private_Dirty", 0)) + roll.get("Shared_Dirty", 0)
    out["Anonymous"] = roll.get("Anonymous", 0)
    out["Private_Dirty"] = roll.get("Private_Dirty", 0)
    return out


def print_smaps(pid):
    """Resident KiB per mapping (file pages and anonymous pages apart), largest first."""
    rows, cur = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                cur = {"name": parts[5] if len(parts) > 5 else "[anon]", "perms": parts[1]}
                rows.append(cur)
            elif first in ("Rss:", "Anonymous:"):
                cur[first[:-1]] = int(line.split()[1])
    rows.sort(key=lambda r: -r.get("Rss", 0))
    print("  resident per mapping (KiB; anon = private dirty/anonymous):")
    for r in rows:
        if r.get("Rss", 0):
            print("    %6d  anon %6d  %s %s" % (r["Rss"], r.get("Anonymous", 0), r["perms"], r["name"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--smaps", action="store_true", help="also print elb-quorum's resident memory per mapping")
    ap.add_argument("--wrap", default="", help="command put before elb-quorum's (benches/hot_text.py runs it under valgrind)")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="elb-quorum-rss-")
    try:
        with open(os.path.join(d, "minimal.py"), "w") as f:
            f.write(MINIMAL)
        conf = os.path.join(d, "supervisord.conf")
        with open(conf, "w") as f:
            f.write(f"""[unix_http_server]
file={d}/s.sock
[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:flap]
command=sh -c 'sleep 0.3'
startsecs=0
autorestart=true
[eventlistener:elb-quorum]
command={a.wrap + " " if a.wrap else ""}{os.path.abspath(a.bin)} {" ".join(listen_args(d + "/state"))}
events=PROCESS_STATE,REMOTE_COMMUNICATION,TICK_5
buffer_size=1000
environment={",".join('%s="%s"' % kv for kv in LISTEN_ENV.items())}
[eventlistener:python-minimal]
command={sys.executable} {d}/minimal.py
events=PROCESS_STATE,REMOTE_COMMUNICATION,TICK_5
buffer_size=1000
""")
        with open(a.bin, "rb") as f:  # page cache: all of the binary (see above)
            while f.read(1 << 20):
                pass
            # A binary just written is dirty in the page cache, and its mapped pages would count as
            # private dirty until written back: write it back first.
            os.fsync(f.fileno())
        sup = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "supervisord"), "-n", "-c", conf],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sock = os.path.join(d, "s.sock")
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, "unix://" + sock))
            for _ in range(200):
                infos = {i["name"]: i for i in rpc.supervisor.getAllProcessInfo()}
                if all(infos.get(n, {}).get("statename") == "RUNNING" for n in ("elb-quorum", "python-minimal")):
                    break
                time.sleep(0.05)
            for i in range(a.events):
                rpc.supervisor.sendRemoteCommEvent("bench", "event %d" % i)
            time.sleep(3)  # flapping adds PROCESS_STATE events; let the buffers drain
            infos = {i["name"]: i for i in rpc.supervisor.getAllProcessInfo()}
            ours, py = status(infos["elb-quorum"]["pid"]), status(infos["python-minimal"]["pid"])
            print("idle memory after %d REMOTE_COMMUNICATION events plus PROCESS_STATE events from a flapping program:" % a.events)
            print("  elb-quorum listen      VmRSS %6d KiB  VmHWM %6d KiB" % (ours["VmRSS"], ours["VmHWM"]))
            print("  python childutils      VmRSS %6d KiB  VmHWM %6d KiB" % (py["VmRSS"], py["VmHWM"]))
            print("  ratio (RSS)            %.3f" % (ours["VmRSS"] / py["VmRSS"]))
            for name, st in (("elb-quorum listen", ours), ("python childutils", py)):
                print("  %-22s anonymous %5d KiB  private dirty %5d KiB  unreclaimable %5d KiB"
                      % (name, st["Anonymous"], st["Private_Dirty"], st["Unreclaimable"]))
            print("  ratio (unreclaimable)  %.3f" % (ours["Unreclaimable"] / py["Unreclaimable"]))
            if a.smaps:
                print_smaps(infos["elb-quorum"]["pid"])
            assert infos["elb-quorum"]["statename"] == "RUNNING", infos["elb-quorum"]
        finally:
            sup.terminate()
            sup.wait(timeout=30)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
