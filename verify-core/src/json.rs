//! Strict JSON: derived structs already refuse unknown and duplicate members
//! (serde's derive reports `duplicate field`); maps use [`UniqueMap`], which does the same.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

/// Parses one JSON value from all of `bytes` (trailing non-whitespace is an error).
/// serde_json bounds nesting depth at 128, so deep input fails instead of overflowing.
pub fn from_slice_strict<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    serde_json::from_slice(bytes)
}

/// A string map that refuses a key given twice (serde's own maps keep the last one,
/// which would let two parties read one document differently).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct UniqueMap(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!("duplicate key `{k}`")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// Checks that no object anywhere in `bytes` names a member twice. Used where a
/// document must be read as a generic value (serde_json's `Value` keeps the last).
pub fn reject_duplicate_keys(bytes: &[u8]) -> serde_json::Result<()> {
    struct Walk;
    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element::<Checked>()?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                if !seen.insert(k.clone()) {
                    return Err(de::Error::custom(format_args!("duplicate key `{k}`")));
                }
                map.next_value::<Checked>()?;
            }
            Ok(())
        }
    }
    struct Checked;
    impl<'de> Deserialize<'de> for Checked {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Walk).map(|()| Checked)
        }
    }
    from_slice_strict::<Checked>(bytes).map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nested_duplicates_are_found() {
        assert!(reject_duplicate_keys(br#"{"a":[{"b":1,"c":{"d":2}}],"e":null}"#).is_ok());
        assert!(reject_duplicate_keys(br#"{"a":[{"b":1,"b":2}]}"#).is_err());
        assert!(reject_duplicate_keys(br#"{"a":1,"a":1}"#).is_err());
        assert!(reject_duplicate_keys(br#"{"a":1} x"#).is_err());
    }

    use super::*;

    #[test]
    fn unique_map_refuses_duplicates() {
        let ok: UniqueMap = from_slice_strict(br#"{"A":"1","B":"2"}"#).unwrap();
        assert_eq!(ok.0.len(), 2);
        let err = from_slice_strict::<UniqueMap>(br#"{"A":"1","A":"2"}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate key `A`"), "{err}");
    }

    #[test]
    fn derived_structs_refuse_duplicate_fields() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            a: u32,
        }
        let err = from_slice_strict::<S>(br#"{"a":1,"a":2}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate field"), "{err}");
        assert!(from_slice_strict::<S>(br#"{"a":1} x"#).is_err());
    }
}
