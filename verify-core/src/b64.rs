//! Strict base64url (RFC 4648 §5, no padding), as RFC 7515 requires.
//!
//! `base64-simd` does the work (it is several times faster than the scalar `base64`
//! engine on this hot path); a property test checks it accepts exactly what the strict
//! scalar `base64` engine accepts: no padding, no whitespace, no characters outside the
//! URL-safe alphabet, and no non-zero trailing bits (one encoding per byte string).

use base64_simd::URL_SAFE_NO_PAD as ENGINE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not canonical unpadded base64url")]
pub struct B64Error;

/// Decodes into a new vector.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, B64Error> {
    ENGINE.decode_to_vec(input).map_err(|_| B64Error)
}

/// Decodes into `out` when the decoded length is exactly `N` bytes.
pub fn decode_exact<const N: usize>(input: &[u8]) -> Result<Option<[u8; N]>, B64Error> {
    let len = ENGINE.decoded_length(input).map_err(|_| B64Error)?;
    if len != N {
        // Still reject garbage as garbage, not as a length problem.
        ENGINE.check(input).map_err(|_| B64Error)?;
        return Ok(None);
    }
    let mut out = [0u8; N];
    ENGINE
        .decode(input, base64_simd::Out::from_slice(&mut out))
        .map_err(|_| B64Error)?;
    Ok(Some(out))
}

/// Checks that `input` is canonical unpadded base64url without decoding it.
pub fn check(input: &[u8]) -> Result<(), B64Error> {
    ENGINE.check(input).map_err(|_| B64Error)
}

pub fn encode(input: &[u8]) -> String {
    ENGINE.encode_to_string(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as SCALAR;
    use base64::Engine as _;
    use proptest::prelude::*;

    #[test]
    fn rejects_non_canonical_trailing_bits() {
        // "QQ" is "A"; "QR" has the same first byte with non-zero trailing bits.
        assert_eq!(decode(b"QQ").unwrap(), b"A");
        assert_eq!(decode(b"QR"), Err(B64Error));
        assert_eq!(decode(b"QUI"), Ok(b"AB".to_vec()));
        assert_eq!(decode(b"QUJ"), Err(B64Error));
    }

    #[test]
    fn rejects_padding_whitespace_and_standard_alphabet() {
        for bad in [
            &b"QQ=="[..],
            b"QQ=",
            b"Q Q",
            b"QQ\n",
            b"+/8",
            b"Q",
            b"?A",
            b"QUJD?",
        ] {
            assert_eq!(
                decode(bad),
                Err(B64Error),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn decode_exact_checks_length_and_content() {
        assert_eq!(decode_exact::<1>(b"QQ"), Ok(Some(*b"A")));
        assert_eq!(decode_exact::<2>(b"QQ"), Ok(None));
        assert_eq!(decode_exact::<2>(b"Q?"), Err(B64Error));
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let text = encode(&bytes);
            prop_assert_eq!(&text, &SCALAR.encode(&bytes));
            prop_assert_eq!(decode(text.as_bytes()), Ok(bytes));
        }

        #[test]
        fn accepts_exactly_what_the_strict_scalar_engine_accepts(
            text in "[A-Za-z0-9_\\-+/=. ?]{0,24}"
        ) {
            let ours = decode(text.as_bytes()).ok();
            let scalar = SCALAR.decode(text.as_bytes()).ok();
            prop_assert_eq!(ours, scalar);
        }

        #[test]
        fn near_alphabet_strings_agree(text in "[A-Za-z0-9_\\-]{0,40}") {
            prop_assert_eq!(decode(text.as_bytes()).ok(), SCALAR.decode(text.as_bytes()).ok());
        }
    }
}
