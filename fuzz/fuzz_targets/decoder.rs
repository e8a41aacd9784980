//! Fuzzes the event decoder: any bytes, fed in chunks chosen by the input itself, must never panic,
//! and a decoder that reported a fatal error must yield nothing more. Run with `cargo fuzz run decoder`
//! (not part of CI).
#![no_main]

use elb_quorum::protocol::EventDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let step = usize::from(split).max(1);
    let mut d = EventDecoder::default();
    let mut fatal = false;
    for chunk in rest.chunks(step) {
        d.feed(chunk);
        loop {
            match d.next_event() {
                Ok(Some(_)) => assert!(!fatal, "events after a fatal error"),
                Ok(None) => break,
                Err(e) => fatal |= !e.is_recoverable(),
            }
        }
    }
});
