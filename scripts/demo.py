#!/usr/bin/env python3
"""elb-quorum demo: a local cluster restarted all at once, taking turns under quorum.

Starts the AWS emulator (moto, serialized by tests/fixtures/moto_locked.py so that its DynamoDB is
atomic like the real one) on 127.0.0.1, creates a Classic ELB with N instances named
nodeI.demo.example.com, starts one real supervisord per simulated instance (a `web` program and the
elb-quorum listener, identity given by flags), asks every instance to restart `web` at the same
moment, and shows live how many instances serve and the quorum line while they take turns. It does
this three times: without strict mode (settle pause and recheck only), then with `--strict`
(DynamoDB permits), then with `--strict` on two attachments per instance, the Classic ELB and an
ALB's target group (an instance serves when it serves in both), and shows the fewest instances
serving in each run side by side. Cleans up. Nothing leaves 127.0.0.1.

Run it through scripts/demo (which makes the venv and builds the binary).
"""
import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import boto3

NS = "demo.example.com"
LB = "demo-example-com"
TG = "demo-web"
RUNS = {
    "plain": "Classic ELB, without strict mode",
    "strict": "Classic ELB, --strict",
    "alb": "Classic ELB + ALB target group, --strict",
}


def wait_for(what, fn, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    sys.exit("demo: timed out waiting for %s" % what)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the elb-quorum binary")
    ap.add_argument("--instances", type=int, default=6)
    ap.add_argument("--quorum", default="0.75")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--only", choices=list(RUNS), help="run only one of the runs")
    a = ap.parse_args()
    venv_bin = os.path.dirname(sys.executable)
    results = {}
    for mode, label in RUNS.items():
        if a.only and a.only != mode:
            continue
        print("=" * 20, "run %d: %s" % (len(results) + 1, label), "=" * 20)
        results[mode] = one_run(a, venv_bin, mode)
        print()
    print("side by side (%d instances, quorum %s):" % (a.instances, a.quorum))
    print("  %-40s %-16s %-24s %s" % ("run", "fewest serving", "restarted exactly once", "total"))
    failed = False
    for mode, (restarted, min_serving, required, total) in results.items():
        below = "" if min_serving >= required else "  (below the quorum line %d)" % required
        print("  %-40s %-16s %-24s %.1f s%s" % (RUNS[mode], "%d/%d" % (min_serving, a.instances),
                                              "%d/%d" % (restarted, a.instances), total, below))
        failed |= restarted != a.instances or (mode != "plain" and min_serving < required)
    if "plain" in results and results["plain"][1] < results["plain"][2]:
        print("without strict mode, instances that pass the gate at the same moment can race below quorum for a")
        print("moment (the recheck sends them back); --strict closes that window with a conditional write.")
    if failed:
        sys.exit(1)


def one_run(a, venv_bin, mode):
    work = tempfile.mkdtemp(prefix="elb-quorum-demo-")
    procs = []
    try:
        return run(a, venv_bin, work, procs, mode)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if a.keep:
            print("work directory kept: %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(a, venv_bin, work, procs, mode):
    strict = mode != "plain"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", ELB_QUORUM_LOG_TARGET="stderr",
               PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    env.pop("AWS_PROFILE", None)
    locked = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "moto_locked.py")
    # Port 0: the kernel picks a free port, which the fixture prints once it listens.
    moto = subprocess.Popen([sys.executable, locked, "127.0.0.1", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    procs.append(moto)
    line = moto.stdout.readline()
    if not line.startswith("PORT "):
        sys.exit("demo: moto did not start (is the venv complete? scripts/test-env)")
    endpoint = "http://127.0.0.1:%d" % int(line.split()[1])
    env["AWS_ENDPOINT_URL"] = endpoint
    print("starting the AWS emulator (moto, serialized) on %s" % endpoint)
    kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2, elb = boto3.client("ec2", **kw), boto3.client("elb", **kw)
    elb.create_load_balancer(LoadBalancerName=LB, AvailabilityZones=["us-east-1a"],
                             Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 8080}])
    image = ec2.describe_images()["Images"][0]["ImageId"]
    nodes = []
    for i in range(a.instances):
        host = "node%d.%s" % (i, NS)
        r = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": "us-east-1a"},
                              TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": host}]}])
        nodes.append({"host": host, "id": r["Instances"][0]["InstanceId"], "dir": os.path.join(work, "node%d" % i)})
    elb.register_instances_with_load_balancer(LoadBalancerName=LB, Instances=[{"InstanceId": n["id"]} for n in nodes])
    print("created Classic ELB %s with %d instances named node0..node%d.%s" % (LB, len(nodes), len(nodes) - 1, NS))
    tg_arn = None
    attach = ""
    if mode == "alb":
        v2 = boto3.client("elbv2", **kw)
        subnets = sorted(ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"],
                         key=lambda s: s["AvailabilityZone"])[:2]
        alb = v2.create_load_balancer(Name="demo-alb", Subnets=[s["SubnetId"] for s in subnets], Scheme="internal",
                                      Type="application")["LoadBalancers"][0]["LoadBalancerArn"]
        tg_arn = v2.create_target_group(Name=TG, Protocol="HTTP", Port=80, VpcId=subnets[0]["VpcId"], TargetType="instance",
                                        HealthCheckIntervalSeconds=5, HealthyThresholdCount=2)["TargetGroups"][0]["TargetGroupArn"]
        v2.register_targets(TargetGroupArn=tg_arn, Targets=[{"Id": n["id"], "Port": 80} for n in nodes])
        v2.create_listener(LoadBalancerArn=alb, Protocol="HTTP", Port=80,
                           DefaultActions=[{"Type": "forward", "TargetGroupArn": tg_arn}])
        attach = " --lb %s --target-group %s" % (LB, TG)
        print("created ALB demo-alb with target group %s (the same instances on port 80); each listener leaves and" % TG)
        print("rejoins both attachments together. moto keeps one port per instance (the last registered wins), so")
        print("one instance on two ports is shown by the tests against the in-process fake, not here.")
    if strict:
        boto3.client("dynamodb", **kw).create_table(
            TableName="elb-quorum-permits", KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
        print("created the permit table elb-quorum-permits (DynamoDB); every listener runs with --strict")

    for n in nodes:
        d = n["dir"]
        os.makedirs(d)
        listen = ("%s listen --hostname %s --domain example.com --instance-id %s --quorum %s "
                  "--check-interval 1 --max-checks 300 --poll-interval 0.3 --settle 1.5 --state-dir %s/state%s%s"
                  % (a.bin, n["host"], n["id"], a.quorum, d, " --strict" if strict else "", attach))
        with open(os.path.join(d, "supervisord.conf"), "w") as f:
            f.write(f"""[unix_http_server]
file={d}/supervisor.sock
username=demo
password=demo-secret

[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{d}/supervisor.sock
username=demo
password=demo-secret

; the service: takes 3 s to start (startsecs), like a server warming up
[program:web]
command=sleep 100000
startsecs=3

[eventlistener:elb-quorum]
command={listen}
events=REMOTE_COMMUNICATION,PROCESS_COMMUNICATION,PROCESS_STATE
buffer_size=100
stopwaitsecs=120
stderr_logfile={d}/elb-quorum.log
environment=SUPERVISOR_USERNAME="demo",SUPERVISOR_PASSWORD="demo-secret"
""")
        procs.append(subprocess.Popen([os.path.join(venv_bin, "supervisord"), "-n", "-c", os.path.join(d, "supervisord.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    ctl = lambda n, *args: subprocess.run([os.path.join(venv_bin, "supervisorctl"), "-c", os.path.join(n["dir"], "supervisord.conf")] + list(args),
                                          capture_output=True, text=True, env=env).stdout
    for n in nodes:
        wait_for("%s's programs" % n["host"], lambda: "RUNNING" in ctl(n, "status", "web") and "RUNNING" in ctl(n, "status", "elb-quorum"))
        n["pid"] = ctl(n, "pid", "web").strip()
    members = len(nodes)
    required = math.ceil(members * float(a.quorum) - 1e-9)
    print("every instance runs supervisord with `web` and the elb-quorum listener; quorum %s of %d: at least %d must serve"
          % (a.quorum, members, required))
    print("asking all %d instances to restart web at once (elb-quorum request web on each)...\n" % members)

    t0 = time.time()
    reqs = []
    for n in nodes:
        e = dict(env, SUPERVISOR_SERVER_URL="unix://%s/supervisor.sock" % n["dir"], SUPERVISOR_USERNAME="demo", SUPERVISOR_PASSWORD="demo-secret")
        reqs.append(subprocess.Popen([a.bin, "request", "web"], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for r in reqs:
        r.wait()
    short = {n["id"]: n["host"].split(".")[0] for n in nodes}
    last, min_serving = None, members
    done = set()
    while len(done) < len(nodes) and time.time() - t0 < 600:
        states = {s["InstanceId"]: s["State"] for s in elb.describe_instance_health(LoadBalancerName=LB)["InstanceStates"]}
        serving = [i for i, s in states.items() if s == "InService"]
        if tg_arn:
            healthy = {d["Target"]["Id"] for d in v2.describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
                       if d["TargetHealth"]["State"] == "healthy"}
            serving = [i for i in serving if i in healthy]
        out = [short[n["id"]] for n in nodes if n["id"] not in serving]
        for n in nodes:
            try:
                with open(os.path.join(n["dir"], "elb-quorum.log")) as f:
                    if "cycle done" in f.read():
                        done.add(n["id"])
            except FileNotFoundError:
                pass
        min_serving = min(min_serving, len(serving))
        line = (len(serving), tuple(out), len(done))
        if line != last:
            bar = "#" * len(serving) + "." * (members - len(serving))
            flag = "" if len(serving) >= required else "   BELOW QUORUM"
            print("%6.1fs  serving %d/%d [%s]  quorum line %d  out: %-14s restarted: %d/%d%s"
                  % (time.time() - t0, len(serving), members, bar, required, ",".join(out) or "-", len(done), members, flag), flush=True)
            last = line
        time.sleep(0.1)
    total = time.time() - t0
    restarted = 0
    for n in nodes:
        pid = ctl(n, "pid", "web").strip()
        cycles = open(os.path.join(n["dir"], "elb-quorum.log")).read().count("cycle done")
        restarted += int(pid != n["pid"] and cycles == 1)
    print("\nsummary: %d of %d instances restarted exactly once; fewest serving %d/%d (%.0f%%, quorum line %d); total %.1f s"
          % (restarted, members, min_serving, members, 100.0 * min_serving / members, required, total))
    print("(the emulator's view was sampled every ~0.1 s; with --keep the listener logs stay in %s/node*/elb-quorum.log)" % work)
    return restarted, min_serving, required, total


if __name__ == "__main__":
    main()
