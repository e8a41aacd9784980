//! The bytes a listener writes: `READY\n` and the `RESULT` frames. Nothing else may reach stdout.

/// Written when the listener can take the next event.
pub const READY: &[u8] = b"READY\n";
/// Acknowledges an event.
pub const RESULT_OK: &[u8] = b"RESULT 2\nOK";
/// Rejects an event: supervisord buffers it and sends it again later.
pub const RESULT_FAIL: &[u8] = b"RESULT 4\nFAIL";
/// `RESULT_OK` and the next `READY`, written together: one write per event.
pub const ACK_READY: &[u8] = b"RESULT 2\nOKREADY\n";

#[cfg(test)]
mod tests {
    #[test]
    fn ack_ready_is_ok_then_ready() {
        assert_eq!(super::ACK_READY, [super::RESULT_OK, super::READY].concat());
    }
}
