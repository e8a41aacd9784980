//! The crash-safety record (`state.json`) and the lock file (`lock`) in `--state-dir`.
//!
//! Written atomically (temporary file, fsync, rename) with mode 0600 before each side effect, so a
//! listener killed with -9 finds on restart what it had done and finishes the cycle.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lb::{Kind, Target};

/// Where the cycle stood when the record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// About to deregister (or deregistered: the call may have gone through).
    Deregistering,
    /// Out of the load balancer; restarting the programs.
    Restarting,
    /// The programs did not come back: deliberately left out of the load balancer.
    ServicesDown,
    /// Registering again.
    Registering,
}

/// One attachment the cycle took this instance out of, and exactly which targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub kind: Kind,
    /// What finds it again: a Classic load balancer's name, a target group's ARN.
    pub id: String,
    /// As configured, for messages.
    pub name: String,
    pub targets: Vec<Target>,
}

/// How the instance leaves its attachments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaveVia {
    /// Deregister from every attachment, register again after.
    #[default]
    Deregister,
    /// Auto Scaling Standby (`EnterStandby`, decrementing the desired capacity), `ExitStandby` after:
    /// the group takes the instance out of its load balancers and stops health-checking it.
    Standby,
}

impl LeaveVia {
    pub fn parse(s: &str) -> Option<LeaveVia> {
        match s {
            "deregister" => Some(LeaveVia::Deregister),
            "standby" => Some(LeaveVia::Standby),
            _ => None,
        }
    }
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OnDisk")]
pub struct Record {
    pub step: Step,
    pub instance_id: String,
    /// How the instance left: reconcile comes back the same way.
    pub via: LeaveVia,
    /// The Auto Scaling group, with `via: standby`.
    pub group: Option<String>,
    /// Every (attachment, target) pair taken out, written before the first deregistration:
    /// reconcile and every failure path put back exactly these.
    pub attachments: Vec<Taken>,
    pub programs: Vec<String>,
    /// Unix seconds when the cycle deregistered.
    pub since: u64,
    pub pid: u32,
}

/// A record as read: also the older form, which named one Classic load balancer (`lb`).
#[derive(Deserialize)]
struct OnDisk {
    step: Step,
    instance_id: String,
    #[serde(default)]
    via: LeaveVia,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    attachments: Vec<Taken>,
    #[serde(default)]
    lb: Option<String>,
    programs: Vec<String>,
    since: u64,
    pid: u32,
}

impl From<OnDisk> for Record {
    fn from(d: OnDisk) -> Self {
        let mut attachments = d.attachments;
        if let (true, Some(lb)) = (attachments.is_empty(), d.lb) {
            attachments.push(Taken {
                kind: Kind::Classic,
                id: lb.clone(),
                name: lb,
                targets: vec![Target::instance(&d.instance_id)],
            });
        }
        Record {
            step: d.step,
            instance_id: d.instance_id,
            via: d.via,
            group: d.group,
            attachments,
            programs: d.programs,
            since: d.since,
            pid: d.pid,
        }
    }
}

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("cannot create state directory {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write state file {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read state file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt ({detail}); it was moved to {moved} and ignored")]
    Corrupt { path: PathBuf, detail: String, moved: PathBuf },
    #[error("another elb-quorum restart holds the lock {path} (pid {holder}); not running two cycles at once")]
    Locked { path: PathBuf, holder: String },
    #[error("cannot open lock file {path}")]
    Lock { path: PathBuf, source: std::io::Error },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

impl StateFile {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn ensure_dir(&self) -> Result<(), StateFileError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateFileError::CreateDir { path: self.dir.clone(), source })
    }

    /// Writes the record atomically.
    pub fn save(&self, record: &Record) -> Result<(), StateFileError> {
        self.ensure_dir()?;
        let path = self.path();
        let tmp = self.dir.join(format!(".state.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(record).expect("a record always serializes"))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| StateFileError::Write { path, source })
    }

    /// The record, if any. A corrupt file is moved aside and reported.
    pub fn load(&self) -> Result<Option<Record>, StateFileError> {
        let path = self.path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateFileError::Read { path, source }),
        };
        match serde_json::from_slice(&text) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let moved = self.set_aside("corrupt")?;
                Err(StateFileError::Corrupt { path, detail: e.to_string(), moved })
            }
        }
    }

    /// Removes the record (the cycle finished).
    pub fn clear(&self) -> Result<(), StateFileError> {
        match fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StateFileError::Write { path: self.path(), source: e })
            }
            _ => Ok(()),
        }
    }

    /// Moves the record aside (`state.json.<why>-<unix time>`), never acting on it.
    pub fn set_aside(&self, why: &str) -> Result<PathBuf, StateFileError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let to = self.dir.join(format!("state.json.{why}-{now}"));
        fs::rename(self.path(), &to).map_err(|source| StateFileError::Write { path: self.path(), source })?;
        Ok(to)
    }

    /// Takes the lock without waiting; `Locked` when another process holds it.
    pub fn try_lock(&self) -> Result<LockGuard, StateFileError> {
        self.ensure_dir()?;
        let path = self.dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StateFileError::Lock { path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = file.write_all(std::process::id().to_string().as_bytes());
                Ok(LockGuard { _file: file })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                Err(StateFileError::Locked { path, holder: if holder.is_empty() { "unknown".into() } else { holder } })
            }
            Err(fs::TryLockError::Error(source)) => Err(StateFileError::Lock { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record() -> Record {
        Record {
            step: Step::Restarting,
            instance_id: "i-1".into(),
            via: LeaveVia::Standby,
            group: Some("web-asg".into()),
            attachments: vec![
                Taken {
                    kind: Kind::Classic,
                    id: "web".into(),
                    name: "web".into(),
                    targets: vec![Target::instance("i-1")],
                },
                Taken {
                    kind: Kind::TargetGroup,
                    id: "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/tg/1".into(),
                    name: "tg".into(),
                    targets: vec![Target::on_port("i-1", 80), Target::on_port("i-1", 8080)],
                },
            ],
            programs: vec!["web".into()],
            since: 1,
            pid: 2,
        }
    }

    #[test]
    fn save_load_clear() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::new(dir.path().join("sub"));
        assert_eq!(sf.load().unwrap(), None);
        sf.save(&record()).unwrap();
        assert_eq!(fs::metadata(sf.path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(sf.load().unwrap(), Some(record()));
        sf.clear().unwrap();
        assert_eq!(sf.load().unwrap(), None);
        sf.clear().unwrap();
    }

    /// A record written before target groups named one Classic load balancer: read as that one.
    #[test]
    fn older_record_names_one_classic_load_balancer() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::new(dir.path());
        fs::write(
            sf.path(),
            br#"{"step":"restarting","instance_id":"i-1","lb":"web","programs":["web"],"since":1,"pid":2}"#,
        )
        .unwrap();
        let r = sf.load().unwrap().unwrap();
        assert_eq!(r.attachments, vec![record().attachments[0].clone()]);
        assert_eq!((r.via, r.group), (LeaveVia::Deregister, None), "older records deregistered");
        assert_eq!((r.step, r.programs), (Step::Restarting, vec!["web".to_string()]));
    }

    #[test]
    fn corrupt_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::new(dir.path());
        fs::write(sf.path(), b"{not json").unwrap();
        assert!(matches!(sf.load(), Err(StateFileError::Corrupt { .. })));
        assert_eq!(sf.load().unwrap(), None, "moved aside");
    }

    /// Each cause is printed once in the chained message: in the source, not also in the message.
    #[test]
    fn a_cause_appears_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, b"").unwrap();
        let sf = StateFile::new(file.join("sub")); // a directory below a file
        let e = sf.save(&record()).unwrap_err();
        let chained = crate::cycle::chain(&e);
        assert!(chained.starts_with("cannot create state directory"), "{chained}");
        let cause = std::error::Error::source(&e).expect("a cause").to_string();
        assert_eq!(chained.matches(&cause).count(), 1, "{chained}");
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateFile::new(dir.path());
        let guard = a.try_lock().unwrap();
        match a.try_lock() {
            Err(StateFileError::Locked { holder, .. }) => assert_eq!(holder, std::process::id().to_string()),
            other => panic!("{other:?}"),
        }
        drop(guard);
        a.try_lock().unwrap();
    }
}
