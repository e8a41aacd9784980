#!/usr/bin/env python3
"""Idle memory of the elb-quorum listener under a real supervisord, beside supervisor's own minimal
Python listener (childutils wait/ok loop) in the same supervisord, after both handled the same events.

    idle_rss.py --bin target/release/elb-quorum [--events 2000]

Both listeners subscribe to PROCESS_STATE, REMOTE_COMMUNICATION and TICK_5. A flapping program and
REMOTE_COMMUNICATION events (type `bench`, ignored by elb-quorum) give them work; then VmRSS and
VmHWM are read from /proc. elb-quorum runs with a static identity and no AWS endpoint reachable
(127.0.0.1:9): it makes no AWS call while idle. Everything binds 127.0.0.1 or a unix socket.
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

MINIMAL = """import sys
from supervisor import childutils
while True:
    headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
    childutils.listener.ok(sys.stdout)
"""


def status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--events", type=int, default=2000)
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
command={os.path.abspath(a.bin)} listen --lb bench --instance-id i-bench --hostname n.bench.example.com --members static:4 --state-dir {d}/state --log-level warn
events=PROCESS_STATE,REMOTE_COMMUNICATION,TICK_5
buffer_size=1000
environment=AWS_ENDPOINT_URL="http://127.0.0.1:9",AWS_REGION="us-east-1",AWS_EC2_METADATA_DISABLED="true",ELB_QUORUM_LOG_TARGET="stderr"
[eventlistener:python-minimal]
command={sys.executable} {d}/minimal.py
events=PROCESS_STATE,REMOTE_COMMUNICATION,TICK_5
buffer_size=1000
""")
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
            assert infos["elb-quorum"]["statename"] == "RUNNING", infos["elb-quorum"]
        finally:
            sup.terminate()
            sup.wait(timeout=30)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
