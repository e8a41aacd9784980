//! `--metrics-file`: the Prometheus text format for node_exporter's textfile collector, written
//! atomically (a temporary file in the same directory, then a rename) after every quorum check and
//! at the end of every cycle. Counters continue from the values already in the file, so that they
//! survive a listener restart and add up over one-shot runs. Never fails a cycle: a write that
//! fails is logged.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The counters and gauges, each with its help text; labels are part of the key.
const FAMILIES: [(&str, &str, &str); 9] = [
    ("elb_quorum_cycles_total", "counter", "Restart cycles by how they ended."),
    ("elb_quorum_checks_total", "counter", "Quorum checks made at the gate."),
    ("elb_quorum_refusals_total", "counter", "Quorum checks that refused leaving, by reason."),
    ("elb_quorum_aws_throttled_total", "counter", "AWS calls that stayed throttled after the SDK's retries."),
    ("elb_quorum_in_service", "gauge", "1 when this instance served in every attachment at the last check."),
    ("elb_quorum_permit_held", "gauge", "1 while this instance holds a strict-mode permit."),
    ("elb_quorum_last_cycle_end_timestamp_seconds", "gauge", "When the last cycle ended (Unix time)."),
    ("elb_quorum_last_cycle_phase_seconds", "gauge", "Duration of each phase of the last finished cycle."),
    ("elb_quorum_last_cycle_checks", "gauge", "Quorum checks the last cycle made."),
];

/// A sample's key: the family and its labels, as written (`name{label="value"}`).
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// The metrics of one instance, written to `path`.
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
    samples: Mutex<BTreeMap<String, f64>>,
}

/// How a cycle ended, for `elb_quorum_cycles_total{outcome}`.
pub type Outcome = &'static str;

impl Metrics {
    /// Metrics for `path`, continuing the counters already written there.
    pub fn open(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut samples = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                if let Some((k, v)) = line.rsplit_once(' ') {
                    if k.split('{').next().is_some_and(|n| n.ends_with("_total")) {
                        if let Ok(v) = v.parse::<f64>() {
                            samples.insert(k.to_owned(), v);
                        }
                    }
                }
            }
        }
        Metrics { path, samples: Mutex::new(samples) }
    }

    /// Checks that a metrics file can be written in `path`'s directory (a configuration error
    /// otherwise, found at start).
    pub fn check_writable(path: &Path) -> Result<(), String> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let probe = dir.join(format!(".elb-quorum-metrics-probe.{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(format!("--metrics-file {}: cannot write in {}: {e}", path.display(), dir.display())),
        }
    }

    fn add(&self, k: String, by: f64) {
        *self.samples.lock().unwrap().entry(k).or_default() += by;
    }

    fn set(&self, k: String, v: f64) {
        self.samples.lock().unwrap().insert(k, v);
    }

    /// One quorum check: `refused` is the refusal's reason (kebab-case), if any; `in_service`
    /// whether this instance served in every attachment.
    pub fn check(&self, refused: Option<&str>, in_service: Option<bool>) {
        self.add(key("elb_quorum_checks_total", &[]), 1.0);
        if let Some(reason) = refused {
            self.add(key("elb_quorum_refusals_total", &[("reason", reason)]), 1.0);
        }
        if let Some(s) = in_service {
            self.set(key("elb_quorum_in_service", &[]), f64::from(u8::from(s)));
        }
        self.write();
    }

    /// An AWS call that stayed throttled.
    pub fn throttled(&self) {
        self.add(key("elb_quorum_aws_throttled_total", &[]), 1.0);
    }

    /// Strict mode: a permit taken or given back.
    pub fn permit(&self, held: bool) {
        self.set(key("elb_quorum_permit_held", &[]), f64::from(u8::from(held)));
        self.write();
    }

    /// The end of a cycle, with its phases when it finished.
    pub fn cycle_end(&self, outcome: Outcome, phases: Option<&crate::cycle::Summary>, in_service: Option<bool>) {
        self.add(key("elb_quorum_cycles_total", &[("outcome", outcome)]), 1.0);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.set(key("elb_quorum_last_cycle_end_timestamp_seconds", &[]), now.as_secs_f64());
        if let Some(s) = phases {
            let phase = |name: &str, d: Duration| (key("elb_quorum_last_cycle_phase_seconds", &[("phase", name)]), d);
            for (k, d) in [
                phase("waited_for_quorum", s.waited_for_quorum),
                phase("drain", s.drain),
                phase("restart", s.restart),
                phase("back_in_service", s.back_in_service),
            ] {
                self.set(k, d.as_secs_f64());
            }
            self.set(key("elb_quorum_last_cycle_checks", &[]), f64::from(s.checks));
        }
        if let Some(s) = in_service {
            self.set(key("elb_quorum_in_service", &[]), f64::from(u8::from(s)));
        }
        self.set(key("elb_quorum_permit_held", &[]), 0.0);
        self.write();
    }

    /// The file's text: every family with `# HELP` and `# TYPE`, then its samples.
    pub fn render(&self) -> String {
        let samples = self.samples.lock().unwrap();
        let mut out = String::new();
        for (name, kind, help) in FAMILIES {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            let mine = samples.iter().filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")));
            let mut any = false;
            for (k, v) in mine {
                out.push_str(&format!("{k} {v}\n"));
                any = true;
            }
            if !any && kind == "counter" && !name.contains("refusals") && !name.contains("cycles") {
                out.push_str(&format!("{name} 0\n"));
            }
        }
        out
    }

    /// Writes the file atomically; a failure is logged, never fatal.
    fn write(&self) {
        let text = self.render();
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.{}",
            self.path.file_name().and_then(|n| n.to_str()).unwrap_or("elb-quorum.prom"),
            std::process::id()
        ));
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the metrics file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_continue_from_the_file_and_gauges_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("elb-quorum.prom");
        let m = Metrics::open(&path);
        m.check(Some("below-quorum"), Some(true));
        m.cycle_end("gave-up", None, Some(true));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# TYPE elb_quorum_cycles_total counter\n"), "{text}");
        assert!(text.contains("elb_quorum_cycles_total{outcome=\"gave-up\"} 1\n"), "{text}");
        assert!(text.contains("elb_quorum_refusals_total{reason=\"below-quorum\"} 1\n"), "{text}");
        assert!(text.contains("elb_quorum_aws_throttled_total 0\n"), "{text}");
        let again = Metrics::open(&path);
        again.check(None, Some(true));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("elb_quorum_checks_total 2\n"), "counters continue: {text}");
        assert!(text.contains("elb_quorum_cycles_total{outcome=\"gave-up\"} 1\n"), "{text}");
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name() != "elb-quorum.prom").collect();
        assert!(leftovers.is_empty(), "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn an_unwritable_directory_is_refused() {
        assert!(Metrics::check_writable(Path::new("/nonexistent/dir/m.prom")).unwrap_err().contains("cannot write in"));
        let dir = tempfile::tempdir().unwrap();
        Metrics::check_writable(&dir.path().join("m.prom")).unwrap();
    }
}
