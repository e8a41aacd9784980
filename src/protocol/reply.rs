//! The bytes a listener writes: `READY\n` and the `RESULT` frames. Nothing else may reach stdout.

/// Written when the listener can take the next event.
pub const READY: &[u8] = b"READY\n";
/// Acknowledges an event.
pub const RESULT_OK: &[u8] = b"RESULT 2\nOK";
/// Rejects an event: supervisord buffers it and sends it again later.
pub const RESULT_FAIL: &[u8] = b"RESULT 4\nFAIL";
