//! Turns a byte stream, fed in chunks of any size, into events.
//!
//! Consumes exactly header + `len` characters per event. A well-framed event with bad content is consumed
//! and reported as a recoverable error, so the stream stays in sync; a header without a usable `len`
//! is fatal. Payloads above the limit are skipped as they arrive, never buffered. Scanning resumes
//! where it stopped, so a large payload fed in small chunks costs linear time.

use super::parse::{header_line, parse_body, parse_header_interned, Interner, MAX_HEADER_LINE};
use super::{quote, Event, EventBody, Header, ProtocolError};

/// Bounds on what the decoder buffers.
#[derive(Debug, Clone, Copy)]
pub struct DecoderLimits {
    /// Largest payload kept, in characters; larger ones are skipped whole (supervisor's own
    /// PROCESS_LOG chunks are far smaller).
    pub max_payload_chars: usize,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self { max_payload_chars: 8 * 1024 * 1024 }
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for a complete header line.
    Header,
    /// Header parsed (`header_bytes` long in the buffer); `scanned` payload bytes hold `len - chars_left`
    /// complete characters.
    Payload { header: Header, header_bytes: usize, scanned: usize, chars_left: usize },
    /// Discarding an oversized payload: `chars_left` characters, of which the current one still
    /// needs `cont_left` continuation bytes.
    Skip { header: Header, chars_left: usize, cont_left: usize },
    /// A fatal error was returned; nothing more is decoded.
    Broken,
}

/// Streaming decoder: `feed` bytes, then call `next_event` until it returns `Ok(None)`.
#[derive(Debug)]
pub struct EventDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already consumed.
    start: usize,
    state: State,
    limits: DecoderLimits,
    strings: Interner,
}

impl Default for EventDecoder {
    fn default() -> Self {
        Self::new(DecoderLimits::default())
    }
}

/// Length in bytes of the UTF-8 sequence a lead byte starts (1 for bytes that cannot lead, so that
/// invalid input still advances).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

fn is_continuation(b: u8) -> bool {
    (b as i8) < -64 // 0x80..=0xBF
}

/// Continuation bytes in `bytes`, counted with byte-wide accumulators (255 bytes at a time), which
/// the compiler turns into 16 bytes per instruction; a `usize` count would widen every byte.
fn continuations(bytes: &[u8]) -> usize {
    bytes.chunks(255).map(|c| c.iter().fold(0u8, |n, &b| n + u8::from(is_continuation(b))) as usize).sum()
}

/// Advances over up to `chars_left` whole characters of `avail`, starting at byte `pos`; returns the
/// new position and the characters still missing. Counts character starts a block at a time (a
/// block of k bytes holds at most k characters), which the compiler vectorises, and never counts a
/// character whose bytes are not all there yet.
fn advance_chars(avail: &[u8], mut pos: usize, mut chars_left: usize) -> (usize, usize) {
    while chars_left > 0 && pos < avail.len() {
        let mut end = (pos + chars_left).min(avail.len());
        // Leave out a last character that continues past the block.
        if let Some(last) = avail[pos..end].iter().rposition(|&b| !is_continuation(b)) {
            let last = pos + last;
            if last + utf8_width(avail[last]) > end {
                if last + utf8_width(avail[last]) <= avail.len() && end - pos == chars_left {
                    // The block holds `chars_left` starts at most; extend to finish the last one.
                    end = last + utf8_width(avail[last]);
                } else {
                    end = last;
                }
            }
        }
        if end == pos {
            break;
        }
        let block = &avail[pos..end];
        let starts = block.len() - continuations(block);
        pos = end;
        chars_left -= starts.min(chars_left);
    }
    (pos, chars_left)
}

impl EventDecoder {
    pub fn new(limits: DecoderLimits) -> Self {
        Self { buf: Vec::new(), start: 0, state: State::Header, limits, strings: Interner::default() }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && (self.start == self.buf.len() || self.start >= 64 * 1024) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// True when no partial event is buffered.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header) && self.start == self.buf.len()
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete event, `Ok(None)` when more input is needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, ProtocolError> {
        loop {
            match std::mem::replace(&mut self.state, State::Header) {
                State::Broken => {
                    self.state = State::Broken;
                    return Ok(None);
                }
                State::Header => {
                    let input = &self.buf[self.start..];
                    match header_line(input) {
                        Ok((_, line)) => {
                            let header_bytes = line.len() + 1;
                            let header = match parse_header_interned(line, &mut self.strings) {
                                Ok(h) => h,
                                Err(e) => {
                                    self.state = State::Broken;
                                    return Err(e);
                                }
                            };
                            if header.len > self.limits.max_payload_chars {
                                self.start += header_bytes;
                                let chars_left = header.len;
                                self.state = State::Skip { header, chars_left, cont_left: 0 };
                            } else {
                                let chars_left = header.len;
                                self.state = State::Payload { header, header_bytes, scanned: 0, chars_left };
                            }
                        }
                        Err(nom::Err::Incomplete(_)) => {
                            if input.len() > MAX_HEADER_LINE {
                                self.state = State::Broken;
                                return Err(ProtocolError::BadHeader {
                                    quoted: quote(input, 120),
                                    reason: "no end of line within 4096 bytes",
                                });
                            }
                            return Ok(None);
                        }
                        Err(_) => unreachable!("take_till and a one-byte tag fail only with Incomplete"),
                    }
                }
                State::Payload { header, header_bytes, mut scanned, mut chars_left } => {
                    let payload_start = self.start + header_bytes;
                    let avail = &self.buf[payload_start..];
                    (scanned, chars_left) = advance_chars(avail, scanned, chars_left);
                    if chars_left > 0 {
                        self.state = State::Payload { header, header_bytes, scanned, chars_left };
                        return Ok(None);
                    }
                    // Parsed in place; only the parts an event keeps are copied out.
                    let raw = &avail[..scanned];
                    let parsed = match std::str::from_utf8(raw) {
                        Ok(text) => parse_body(&header.eventname, text),
                        Err(_) => parse_body(&header.eventname, &String::from_utf8_lossy(raw)),
                    };
                    self.start = payload_start + scanned;
                    return match parsed {
                        Ok(body) => Ok(Some(Event { header, body })),
                        Err(reason) => Err(ProtocolError::BadPayload {
                            serial: header.serial,
                            eventname: header.eventname.to_string(),
                            reason,
                        }),
                    };
                }
                State::Skip { header, mut chars_left, mut cont_left } => {
                    let input = &self.buf[self.start..];
                    let mut used = 0;
                    while used < input.len() && (chars_left > 0 || cont_left > 0) {
                        if cont_left > 0 {
                            cont_left -= 1;
                        } else {
                            cont_left = utf8_width(input[used]) - 1;
                            chars_left -= 1;
                        }
                        used += 1;
                    }
                    self.start += used;
                    if chars_left > 0 || cont_left > 0 {
                        self.state = State::Skip { header, chars_left, cont_left };
                        return Ok(None);
                    }
                    return Err(ProtocolError::Oversized {
                        serial: header.serial,
                        eventname: header.eventname.to_string(),
                        len: header.len,
                        limit: self.limits.max_payload_chars,
                    });
                }
            }
        }
    }
}

impl Event {
    /// A short description for logs: name, serial and the body's kind.
    pub fn describe(&self) -> String {
        let kind = match &self.body {
            EventBody::Unknown { .. } => " (unknown event)",
            _ => "",
        };
        format!("{} serial {}{}", self.header.eventname, self.header.serial, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, serial: u64, payload: &str) -> Vec<u8> {
        format!(
            "ver:3.0 server:supervisor serial:{serial} pool:elb-quorum poolserial:{serial} eventname:{name} len:{}\n{payload}",
            payload.chars().count()
        )
        .into_bytes()
    }

    #[test]
    fn every_prefix_is_incomplete_then_whole_event() {
        let bytes = frame("PROCESS_COMMUNICATION_STDOUT", 3, "processname:t groupname:t pid:1\ncafé ✓ 🎉\nrestart");
        for cut in 0..bytes.len() {
            let mut d = EventDecoder::default();
            d.feed(&bytes[..cut]);
            assert_eq!(d.next_event(), Ok(None), "prefix of {cut} bytes");
            d.feed(&bytes[cut..]);
            let ev = d.next_event().unwrap().expect("whole event");
            assert_eq!(ev.header.serial, 3);
            assert!(d.is_idle());
        }
    }

    #[test]
    fn len_counts_characters_not_bytes() {
        // Measured on supervisor 4.3.0: `café ✓` in a payload of len:61 with 64 bytes on the wire.
        let payload = "processname:talker groupname:talker pid:13898\nrestart café ✓";
        let mut bytes = frame("PROCESS_COMMUNICATION_STDOUT", 1, payload);
        bytes.extend(frame("TICK_5", 2, "when:1"));
        let mut d = EventDecoder::default();
        d.feed(&bytes);
        let ev = d.next_event().unwrap().unwrap();
        assert_eq!(ev.header.len, payload.chars().count());
        assert!(matches!(ev.body, EventBody::ProcessCommunication { ref data, .. } if data == "restart café ✓"));
        assert_eq!(d.next_event().unwrap().unwrap().body, EventBody::Tick { period: 5, when: 1 });
        assert_eq!(d.next_event(), Ok(None));
    }

    #[test]
    fn bad_payload_is_consumed_and_stream_stays_in_sync() {
        let mut bytes = frame("TICK_5", 1, "when:soon");
        bytes.extend(frame("TICK_5", 2, "when:7"));
        let mut d = EventDecoder::default();
        d.feed(&bytes);
        let err = d.next_event().unwrap_err();
        assert!(err.is_recoverable(), "{err}");
        assert_eq!(d.next_event().unwrap().unwrap().body, EventBody::Tick { period: 5, when: 7 });
    }

    #[test]
    fn bad_header_is_fatal_and_quoted() {
        let mut d = EventDecoder::default();
        d.feed(b"ver:3.0 eventname:TICK_5 len:x\nwhen:1");
        let err = d.next_event().unwrap_err();
        assert!(!err.is_recoverable());
        assert!(err.to_string().contains("len:x"), "{err}");
        assert_eq!(d.next_event(), Ok(None), "a broken decoder yields nothing more");
    }

    #[test]
    fn endless_header_is_fatal() {
        let mut d = EventDecoder::default();
        d.feed(&vec![b'a'; MAX_HEADER_LINE + 1]);
        assert!(matches!(d.next_event(), Err(ProtocolError::BadHeader { .. })));
    }

    #[test]
    fn oversized_payload_is_skipped_without_buffering() {
        let mut d = EventDecoder::new(DecoderLimits { max_payload_chars: 10 });
        let big = format!("processname:p groupname:p pid:1\n{}", "é".repeat(5000));
        let mut bytes = frame("PROCESS_LOG_STDOUT", 1, &big);
        bytes.extend(frame("TICK_5", 2, "when:9"));
        let mut errors = 0;
        let mut events = vec![];
        for chunk in bytes.chunks(7) {
            d.feed(chunk);
            assert!(d.buffered() < 200, "skipping must not buffer the payload");
            loop {
                match d.next_event() {
                    Ok(Some(e)) => events.push(e),
                    Ok(None) => break,
                    Err(ProtocolError::Oversized { len, .. }) => {
                        assert_eq!(len, big.chars().count());
                        errors += 1
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(errors, 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].body, EventBody::Tick { period: 5, when: 9 });
    }

    #[test]
    fn invalid_utf8_in_payload_is_replaced_not_fatal() {
        let mut bytes = b"ver:3.0 serial:1 eventname:REMOTE_COMMUNICATION len:8\ntype:x\n\xff".to_vec();
        bytes.extend(frame("TICK_5", 2, "when:1"));
        let mut d = EventDecoder::default();
        d.feed(&bytes);
        let ev = d.next_event().unwrap().unwrap();
        assert_eq!(ev.body, EventBody::RemoteCommunication { kind: "x".into(), data: "\u{fffd}".into() });
        assert!(d.next_event().unwrap().is_some());
    }
}
