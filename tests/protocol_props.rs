//! Property tests of the decoder: any chunking of a valid stream (boundaries inside multi-byte
//! characters included) yields the same events and leaves the decoder idle; arbitrary bytes never
//! panic; payloads of arbitrary text round-trip.

use elb_quorum::protocol::{EventBody, EventDecoder, ProtocolError};
use proptest::prelude::*;

/// Encodes one event as supervisord does: `len` counts characters.
fn encode(serial: usize, name: &str, payload: &str) -> Vec<u8> {
    format!(
        "ver:3.0 server:supervisor serial:{serial} pool:elb-quorum poolserial:{serial} eventname:{name} len:{}\n{payload}",
        payload.chars().count()
    )
    .into_bytes()
}

fn arb_event() -> impl Strategy<Value = (String, String)> {
    let text = "(?s).{0,60}"; // any Unicode, newlines included
    prop_oneof![
        ("[a-z]{1,8}", "[a-z]{1,8}", 0u32..99999, text).prop_map(|(p, g, pid, d)| (
            "PROCESS_COMMUNICATION_STDOUT".to_string(),
            format!("processname:{p} groupname:{g} pid:{pid}\n{d}")
        )),
        ("[a-z]{1,8}", text).prop_map(|(p, d)| (
            "PROCESS_LOG_STDERR".to_string(),
            format!("processname:{p} groupname:{p} pid:1 channel:stderr\n{d}")
        )),
        ("[a-z-]{1,12}", text).prop_map(|(t, d)| ("REMOTE_COMMUNICATION".to_string(), format!("type:{t}\n{d}"))),
        (0u64..u64::MAX).prop_map(|w| ("TICK_60".to_string(), format!("when:{w}"))),
        ("[a-z]{1,8}", 0u8..2, 0u32..99999).prop_map(|(p, e, pid)| (
            "PROCESS_STATE_EXITED".to_string(),
            format!("processname:{p} groupname:{p} from_state:RUNNING expected:{e} pid:{pid}")
        )),
        Just(("SUPERVISOR_STATE_CHANGE_RUNNING".to_string(), String::new())),
        ("[A-Z_]{3,20}", text).prop_map(|(n, d)| (format!("X_{n}"), d)),
    ]
}

fn decode_all(chunks: &[&[u8]]) -> (Vec<EventBody>, Vec<ProtocolError>, EventDecoder) {
    let mut d = EventDecoder::default();
    let (mut events, mut errors) = (vec![], vec![]);
    for c in chunks {
        d.feed(c);
        loop {
            match d.next_event() {
                Ok(Some(e)) => events.push(e.body),
                Ok(None) => break,
                Err(e) => errors.push(e),
            }
        }
    }
    (events, errors, d)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_chunking_yields_the_same_events(events in prop::collection::vec(arb_event(), 1..12), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20)) {
        let mut stream = Vec::new();
        for (i, (name, payload)) in events.iter().enumerate() {
            stream.extend(encode(i, name, payload));
        }
        let (whole, errs, d) = decode_all(&[&stream]);
        prop_assert!(errs.is_empty(), "{errs:?}");
        prop_assert_eq!(whole.len(), events.len());
        prop_assert!(d.is_idle());
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&stream[last..p]);
            last = p;
        }
        chunks.push(&stream[last..]);
        let (chunked, errs, d) = decode_all(&chunks);
        prop_assert!(errs.is_empty());
        prop_assert_eq!(chunked, whole);
        prop_assert!(d.is_idle());
    }

    #[test]
    fn payload_text_round_trips(data in "(?s).{0,200}") {
        let stream = encode(1, "REMOTE_COMMUNICATION", &format!("type:elb-quorum\n{data}"));
        let (events, errs, _) = decode_all(&[&stream]);
        prop_assert!(errs.is_empty());
        prop_assert_eq!(events, vec![EventBody::RemoteCommunication { kind: "elb-quorum".into(), data }]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let _ = decode_all(&refs);
    }

    #[test]
    fn header_shaped_noise_never_panics(len in 0usize..50, name in "[A-Z_]{0,30}", rest in prop::collection::vec(any::<u8>(), 0..80)) {
        let mut s = format!("ver:3.0 serial:1 eventname:{name} len:{len}\n").into_bytes();
        s.extend(rest);
        let _ = decode_all(&[&s]);
    }
}
