//! Serde for `Vec<u8>` fields as one byte string (`#[serde(with = "sixfive_raft::bytes")]`),
//! as the `serde_bytes` crate does: serde's default treats a `Vec<u8>` as a sequence of
//! numbers, which postcard then encodes and decodes one byte at a time. The encoding is the
//! same in postcard (a length, then the bytes), so what was written before still reads; only
//! the work per byte goes away (the replicated KV's commands and entries are copied as blocks).

use serde::de::{Error, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Serializes `v` (a `Vec<u8>`, an `Arc<[u8]>`...) as one byte string.
pub fn serialize<S: Serializer, T: AsRef<[u8]> + ?Sized>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v.as_ref())
}

/// What a byte string deserializes into: from a borrowed slice with one copy, from an owned
/// buffer with none where the type can take the buffer over.
pub trait FromByteString: Sized {
    /// From borrowed bytes.
    fn from_slice(v: &[u8]) -> Self;
    /// From an owned buffer.
    fn from_vec(v: Vec<u8>) -> Self;
}

impl FromByteString for Vec<u8> {
    fn from_slice(v: &[u8]) -> Self {
        v.to_vec()
    }
    fn from_vec(v: Vec<u8>) -> Self {
        v
    }
}

impl FromByteString for std::sync::Arc<[u8]> {
    fn from_slice(v: &[u8]) -> Self {
        std::sync::Arc::from(v)
    }
    fn from_vec(v: Vec<u8>) -> Self {
        std::sync::Arc::from(v)
    }
}

impl FromByteString for bytes::Bytes {
    fn from_slice(v: &[u8]) -> Self {
        bytes::Bytes::copy_from_slice(v)
    }
    fn from_vec(v: Vec<u8>) -> Self {
        bytes::Bytes::from(v)
    }
}

/// Deserializes a byte string (or, from formats without one, a sequence of bytes) into a
/// `Vec<u8>`, an `Arc<[u8]>`, a `Bytes`.
pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromByteString,
{
    struct Bytes<T>(std::marker::PhantomData<T>);
    impl<'de, T: FromByteString> Visitor<'de> for Bytes<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<T, E> {
            Ok(T::from_slice(v))
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<T, E> {
            Ok(T::from_vec(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(T::from_vec(out))
        }
    }
    d.deserialize_byte_buf(Bytes(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Plain(Vec<u8>);
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Fast(#[serde(with = "super")] Vec<u8>);
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Shared(#[serde(with = "super")] std::sync::Arc<[u8]>);
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Counted(#[serde(with = "super")] bytes::Bytes);

    #[test]
    fn same_bytes_in_postcard_as_a_plain_vec() {
        for v in [vec![], vec![0u8, 1, 255], vec![7u8; 300]] {
            let plain = postcard::to_allocvec(&Plain(v.clone())).unwrap();
            let fast = postcard::to_allocvec(&Fast(v.clone())).unwrap();
            assert_eq!(plain, fast);
            assert_eq!(postcard::from_bytes::<Fast>(&plain).unwrap(), Fast(v.clone()));
            assert_eq!(postcard::from_bytes::<Shared>(&plain).unwrap(), Shared(v.clone().into()));
            assert_eq!(postcard::from_bytes::<Counted>(&plain).unwrap(), Counted(v.clone().into()));
            assert_eq!(postcard::to_allocvec(&Shared(v.clone().into())).unwrap(), plain);
            assert_eq!(postcard::to_allocvec(&Counted(v.clone().into())).unwrap(), plain);
            assert_eq!(postcard::from_bytes::<Plain>(&fast).unwrap(), Plain(v));
        }
        assert!(postcard::from_bytes::<Fast>(&[5, 1, 2]).is_err(), "a short byte string is refused");
    }
}
