//! Logging: journald when its socket exists (or `--log-target journald`), else stderr. Never stdout:
//! in `listen` mode stdout belongs to supervisor's protocol.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Sets the global subscriber. Returns where logs go, for the first log line.
pub fn init(format: LogFormat, level: Option<&str>, target: Option<&str>) -> Result<&'static str, String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // The AWS SDK logs every retry at info; keep its noise at warn unless asked. Its credential
    // chain (and the profile provider) warn with a debug dump of the provider's error, which the
    // product's own error line says in one line (`identity::aws_failure`): those warnings only at
    // `--log-level debug`.
    let filter = if level.is_none() && std::env::var_os("RUST_LOG").is_none() {
        filter
            .add_directive("aws_smithy_runtime=warn".parse().expect("static directive"))
            .add_directive("aws_config=warn".parse().expect("static directive"))
            .add_directive("aws_config::meta::credentials::chain=error".parse().expect("static directive"))
            .add_directive("aws_config::profile::credentials=error".parse().expect("static directive"))
    } else {
        filter
    };
    let journald = match target.unwrap_or("auto") {
        "auto" => Path::new(JOURNALD_SOCKET).exists(),
        "journald" => true,
        "stderr" => false,
        other => return Err(format!("--log-target {other:?}: expected auto, journald or stderr")),
    };
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // No field prefix: fields are queryable as `journalctl INSTANCE_ID=i-...`.
                let layer = layer.with_syslog_identifier("elb-quorum".into()).with_field_prefix(None);
                tracing_subscriber::registry().with(filter).with(layer).init();
                return Ok("journald");
            }
            Err(e) if target == Some("journald") => return Err(format!("--log-target journald: {e}")),
            Err(_) => {}
        }
    }
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false)).init()
        }
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    Ok("stderr")
}
