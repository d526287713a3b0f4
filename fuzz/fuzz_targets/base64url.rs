//! Strict base64url: decode(encode(x)) == x, and whatever decodes re-encodes to the
//! very same text (one spelling per byte string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use verify_core::b64;

fuzz_target!(|data: &[u8]| {
    assert_eq!(b64::decode(b64::encode(data).as_bytes()).expect("round trip"), data);
    if let Ok(bytes) = b64::decode(data) {
        assert_eq!(b64::encode(&bytes).as_bytes(), data);
        assert!(b64::check(data).is_ok());
    } else {
        assert!(b64::check(data).is_err());
    }
});
