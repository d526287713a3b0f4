//! Any bytes as a run's CloudEvent, `decision.json` and `sandbox.json`: errors, never
//! panics. Whatever parses must write out and parse back to the same value, and an
//! event we accept must also be a valid CloudEvent to the cloudevents SDK.
#![no_main]

use capsule_gateway::evidence::{DecisionRecord, Event, SandboxRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Event::parse(data) {
        let text = serde_json::to_vec(&e.to_json()).expect("serialise");
        assert_eq!(Event::parse(&text).expect("round trip"), e);
        let sdk: cloudevents::Event =
            serde_json::from_slice(data).expect("the SDK reads what we accept");
        assert_eq!(cloudevents::AttributesReader::id(&sdk), e.id);
    }
    if let Ok(d) = DecisionRecord::parse(data) {
        let text = serde_json::to_vec(&d).expect("serialise");
        assert_eq!(DecisionRecord::parse(&text).expect("round trip"), d);
    }
    if let Ok(s) = SandboxRecord::parse(data) {
        let text = serde_json::to_vec(&s).expect("serialise");
        assert_eq!(SandboxRecord::parse(&text).expect("round trip"), s);
    }
});
