//! Lowercase hex, strict: even length, `0-9a-f` only.

/// Why a hex string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HexError {
    #[error("hex of odd length")]
    OddLength,
    #[error("`{0}` is not lowercase hex")]
    NotLowercaseHex(char),
}

pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

pub fn decode(text: &str) -> Result<Vec<u8>, HexError> {
    if !text.len().is_multiple_of(2) {
        return Err(HexError::OddLength);
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(HexError::NotLowercaseHex(char::from(c))),
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_strictness() {
        assert_eq!(super::encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(super::decode("00abff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert_eq!(super::decode("0"), Err(super::HexError::OddLength));
        assert_eq!(
            super::decode("AB"),
            Err(super::HexError::NotLowercaseHex('A'))
        );
        assert_eq!(
            super::decode("0g"),
            Err(super::HexError::NotLowercaseHex('g'))
        );
    }
}
