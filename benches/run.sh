#!/usr/bin/env bash
# Every benchmark of the project, side by side with the shared baselines, in one run.
#   benches/run.sh [SHARED_DIR]      (default: ../shared beside the repository)
# Needs the test venv (scripts/test-env) and a C compiler. Builds both profiles: release (what
# `cargo install` builds, ~4.5 min) and dist (what the package holds, longer; benches/README.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${1:-$root/../shared}
cd "$root"
bash scripts/test-env
py=${ELB_QUORUM_VENV:-$root/.venv}/bin/python
stream=/tmp/events-100k.bin
cargo build --release --locked --quiet
cargo build --profile dist --locked --quiet
release=${CARGO_TARGET_DIR:-$root/target}/release/elb-quorum
bin=${CARGO_TARGET_DIR:-$root/target}/dist/elb-quorum

echo "== stream: $shared/bench/gen_events.py $stream -n 100000"
[ -s "$stream" ] || "$py" "$shared/bench/gen_events.py" "$stream" -n 100000

echo "== parser: supervisor.childutils on the same stream"
"$py" "$shared/bench/py_parse_bench.py" "$stream" --runs 5
echo "== parser: elb-quorum decoder (criterion)"
ELB_QUORUM_BENCH_STREAM=$stream cargo bench --locked --bench parser -- --noplot 2>&1 | grep -E "^decode|^framing|thrpt"

echo "== listen loop under the shared driver, pinned to CPU 0, dist binary at the default log level (requests go nowhere: no supervisord reachable)"
cc -O2 -o /tmp/ceiling_listener "$shared/bench/ceiling_listener.c"
# The generated stream makes every tenth event a restart request (each a failing cycle attempt here);
# the -norequest copy renames their type so that the protocol loop is measured alone.
sed 's/type:elb-quorum/type:elb-quorun/g' "$stream" > "${stream%.bin}-norequest.bin"
for events in "${stream%.bin}-norequest.bin" "$stream"; do
  for name in c python elb-quorum; do
    case $name in
      c) cmd=(/tmp/ceiling_listener) ;;
      python) cmd=("$py" "$shared/bench/minimal_listener.py") ;;
      elb-quorum) cmd=("$bin" listen --lb bench --instance-id i-bench --hostname n.bench.example.com --members static:4 --state-dir /tmp/elb-quorum-bench-state --log-target stderr) ;;
    esac
    echo "-- $name on $events"
    SUPERVISOR_SERVER_URL=unix:///tmp/elb-quorum-bench-missing.sock \
    "$py" "$shared/bench/py_roundtrip.py" --events "$events" -n 100000 --runs 3 --pin 0 \
      --env AWS_ENDPOINT_URL=http://127.0.0.1:9 --env AWS_REGION=us-east-1 --env AWS_EC2_METADATA_DISABLED=true \
      -- "${cmd[@]}" | tail -1
  done
done

echo "== idle memory under real supervisord: dist, then release"
"$py" benches/idle_rss.py --bin "$bin" --smaps
"$py" benches/idle_rss.py --bin "$release"

echo "== fleet makespan and cycle overhead, plain and strict (fake load balancer and permit store, simulated time)"
cargo bench --locked --bench fleet

echo "== one cycle over several attachments (fake load balancers, simulated time)"
cargo bench --locked --bench attachments

echo "== strict mode: acquire latency against the serialized moto (20 contenders, 2 permits)"
cargo bench --locked --bench lease
