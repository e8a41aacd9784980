//! Decoder throughput (events/s, MB/s) on a generated stream, with ASCII payloads (the mix of
//! `../shared/bench/gen_events.py`) and with non-ASCII payloads (where `len` counts characters).
//! `ELB_QUORUM_BENCH_STREAM=/tmp/events-100k.bin` benchmarks that file too, so the figure can be set
//! beside supervisor's own `childutils` on the same bytes (`benches/run.sh`).
//!
//! `framing/*` is the floor under any decoder of these streams: the same 64 KiB chunks copied into
//! a buffer, each header line found and its `len` read, the payload skipped unread (no tokens, no
//! character count, no validation, no event). A decoder cannot go faster than that.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elb_quorum::protocol::EventDecoder;

/// A deterministic mix like gen_events.py's: 40 % PROCESS_STATE, 20 % TICK_5, 10 % REMOTE_COMMUNICATION,
/// 20 % PROCESS_COMMUNICATION (200 characters), 10 % PROCESS_LOG (4096 characters).
fn stream(n: usize, text: &str) -> (Vec<u8>, usize) {
    let mut rng = fastrand::Rng::with_seed(20251125);
    let mut out = Vec::new();
    let filler: String = text.chars().cycle().take(4096).collect();
    for serial in 0..n {
        let (name, payload) = match rng.u32(0..10) {
            0..=3 => (
                "PROCESS_STATE_RUNNING",
                format!(
                    "processname:web{0} groupname:web{0} from_state:STARTING pid:{1}",
                    rng.u32(0..9),
                    rng.u32(1000..99999)
                ),
            ),
            4 | 5 => ("TICK_5", format!("when:{}", rng.u64(1_700_000_000..1_800_000_000))),
            6 => ("REMOTE_COMMUNICATION", "type:other\nrestart web".to_string()),
            7 | 8 => (
                "PROCESS_COMMUNICATION_STDOUT",
                format!(
                    "processname:talker groupname:talker pid:42\n{}",
                    &filler.chars().take(200).collect::<String>()
                ),
            ),
            _ => ("PROCESS_LOG_STDOUT", format!("processname:web groupname:web pid:42 channel:stdout\n{filler}")),
        };
        out.extend(format!("ver:3.0 server:supervisor serial:{serial} pool:elb-quorum poolserial:{serial} eventname:{name} len:{}\n", payload.chars().count()).bytes());
        out.extend(payload.bytes());
    }
    (out, n)
}

fn decode(bytes: &[u8], chunk: usize) -> usize {
    let mut d = EventDecoder::default();
    let mut n = 0;
    for c in bytes.chunks(chunk) {
        d.feed(c);
        while let Ok(Some(_)) = d.next_event() {
            n += 1;
        }
    }
    n
}

/// The floor: copy each chunk into a buffer, find every header line (memchr) and its `len`, jump
/// over `len` bytes. Only right for streams whose payloads are ASCII (`len` counts bytes then).
fn framing(bytes: &[u8], chunk: usize) -> usize {
    let mut buf: Vec<u8> = Vec::with_capacity(4 * chunk);
    let (mut start, mut n) = (0, 0);
    for c in bytes.chunks(chunk) {
        buf.drain(..start);
        start = 0;
        buf.extend_from_slice(c);
        while let Some(i) = memchr::memchr(b'\n', &buf[start..]) {
            let line = &buf[start..start + i];
            let at = memchr::memmem::rfind(line, b"len:").expect("every header has len") + 4;
            let len: usize = std::str::from_utf8(&line[at..]).ok().and_then(|l| l.parse().ok()).expect("numeric len");
            if start + i + 1 + len > buf.len() {
                break;
            }
            start += i + 1 + len;
            n += 1;
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let mut streams = vec![
        ("ascii", stream(20_000, "log line: request served in 12 ms\tstatus=200\n")),
        ("non-ascii", stream(20_000, "café ✓ 日本語 ログ 🎉 Ünïcödé\n")),
    ];
    if let Ok(path) = std::env::var("ELB_QUORUM_BENCH_STREAM") {
        let bytes = std::fs::read(&path).expect("ELB_QUORUM_BENCH_STREAM is readable");
        let n = decode(&bytes, 64 * 1024);
        streams.push(("file", (bytes, n)));
    }
    let mut g = c.benchmark_group("decode");
    for (name, (bytes, n)) in &streams {
        assert_eq!(decode(bytes, 64 * 1024), *n, "{name}: every event decodes");
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::new("events", name), bytes, |b, bytes| b.iter(|| decode(bytes, 64 * 1024)));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("bytes", name), bytes, |b, bytes| b.iter(|| decode(bytes, 64 * 1024)));
    }
    g.finish();
    let mut g = c.benchmark_group("framing");
    for (name, (bytes, n)) in streams.iter().filter(|(name, _)| *name != "non-ascii") {
        assert_eq!(framing(bytes, 64 * 1024), *n, "{name}: framing finds every event");
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::new("events", name), bytes, |b, bytes| b.iter(|| framing(bytes, 64 * 1024)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
