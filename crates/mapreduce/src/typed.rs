//! Apps with values of their own type: implement [`TypedApp`] (values are any serde type:
//! bytes, numbers, structs) and register `Typed(app)`, which is an [`App`]. Values cross the
//! framework as strings: postcard bytes in hex. The combiner, if implemented, works on typed
//! values too.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::App;

/// A MapReduce application whose values are of type `Self::Value`.
pub trait TypedApp: Send + Sync {
    /// The values' type.
    type Value: Serialize + DeserializeOwned;

    /// Calls `emit(key, value)` for each pair the input chunk produces.
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, Self::Value)) -> Result<(), String>;

    /// The output value (text) for `key` given its values, streamed.
    fn reduce(&self, key: &str, values: &mut dyn Iterator<Item = Self::Value>) -> Result<String, String>;

    /// The combiner, if any: folds `value` into `acc` and returns true. The default has none.
    fn combine(&self, _key: &str, _acc: &mut Self::Value, _value: Self::Value) -> bool {
        false
    }
}

/// A [`TypedApp`] as an [`App`].
pub struct Typed<T>(pub T);

fn encode<V: Serialize>(v: &V) -> Result<String, String> {
    let bytes = postcard::to_allocvec(v).map_err(|e| format!("encoding a value: {e}"))?;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from_digit((b >> 4) as u32, 16).expect("a nibble"));
        s.push(char::from_digit((b & 15) as u32, 16).expect("a nibble"));
    }
    Ok(s)
}

fn decode<V: DeserializeOwned>(s: &str) -> Result<V, String> {
    if !s.is_ascii() || !s.len().is_multiple_of(2) {
        return Err(format!("not an encoded value: {s:?}"));
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("not an encoded value: {s:?}")))
        .collect::<Result<Vec<u8>, String>>()?;
    postcard::from_bytes(&bytes).map_err(|e| format!("decoding a value: {e}"))
}

impl<T: TypedApp> App for Typed<T> {
    fn map(&self, file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        let mut err = None;
        self.0.map(file, contents, &mut |k, v| match encode(&v) {
            Ok(s) => emit(k, &s),
            Err(e) => err = Some(e),
        })?;
        err.map_or(Ok(()), Err)
    }

    fn reduce(&self, key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let mut err = None;
        let mut typed = values.map_while(|s| match decode::<T::Value>(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        let r = self.0.reduce(key, &mut typed);
        drop(typed);
        match err {
            Some(e) => Err(e),
            None => r,
        }
    }

    fn combine(&self, key: &str, acc: &mut String, value: &str) -> bool {
        let (Ok(mut a), Ok(v)) = (decode::<T::Value>(acc), decode::<T::Value>(value)) else { return false };
        if !self.0.combine(key, &mut a, v) {
            return false;
        }
        match encode(&a) {
            Ok(s) => {
                *acc = s;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bad_ones_are_errors() {
        let v = (7u64, "é".to_string(), vec![0u8, 255]);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&encode(&v).unwrap()).unwrap(), v);
        assert!(decode::<u64>("zz").is_err() && decode::<u64>("abc").is_err() && decode::<u64>("aéa").is_err());
    }
}
