//! Framing shared by the peer and client protocols: `[u32 length][u32 crc32c][payload]`, both
//! numbers little-endian, the checksum over the payload.
//!
//! A frame longer than the reader's limit, or whose checksum does not match, is refused before
//! anything acts on it: the connection is closed with the reason logged (a sender that got the
//! framing wrong once cannot be trusted to be in step afterwards).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 8;
/// Largest frame between peers: one Append carries at least one entry, and an entry may hold a
/// value of up to 32 MiB, so the limit is above that.
pub const MAX_PEER_FRAME: usize = 64 << 20;
/// Largest frame between a client and a server (a 32 MiB value and its key, with room to spare).
pub const MAX_CLIENT_FRAME: usize = 40 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection ended cleanly between two frames.
    #[error("connection closed")]
    Closed,
    /// The header announced more than the limit.
    #[error("oversized frame: {len} bytes announced, the limit is {max}")]
    Oversized {
        /// Announced length.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// The payload does not match its checksum.
    #[error("frame checksum mismatch (garbage, or a corrupted stream)")]
    Checksum,
    /// The payload does not decode as the protocol's message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// The operating system reported an error (including an end of stream inside a frame).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `payload` as one frame.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + HEADER_BYTES);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Writes one frame (not flushed).
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await
}

/// Writes one frame whose payload is `head` followed by `body` (not flushed), without joining them.
pub async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; HEADER_BYTES];
    header[..4].copy_from_slice(&((head.len() + body.len()) as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c_append(crc32c::crc32c(head), body).to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(head).await?;
    w.write_all(body).await
}

/// Reads a frame header: the payload's length (checked against `max`) and checksum.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<(usize, u32), FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    // A clean end of stream is only clean before the first header byte.
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    r.read_exact(&mut header[n..]).await?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    Ok((len, crc))
}

/// Reads one non-empty frame as its first payload byte and the rest (so a tagged payload needs
/// no copy), with [`read`]'s checks.
pub async fn read_tagged<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<(u8, Vec<u8>), FrameError> {
    let (len, crc) = read_header(r, max).await?;
    if len == 0 {
        return Err(FrameError::Decode("empty frame".into()));
    }
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).await?;
    let mut rest = vec![0u8; len - 1];
    r.read_exact(&mut rest).await?;
    if crc32c::crc32c_append(crc32c::crc32c(&tag), &rest) != crc {
        return Err(FrameError::Checksum);
    }
    Ok((tag[0], rest))
}

/// Reads one frame's payload, refusing frames above `max` bytes or with a bad checksum.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let (len, crc) = read_header(r, max).await?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if crc32c::crc32c(&payload) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(payload)
}

/// Reads one frame and decodes it with postcard.
pub async fn read_msg<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    let payload = read(r, max).await?;
    postcard::from_bytes(&payload).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Encodes `msg` with postcard and writes it as one frame, flushed.
pub async fn write_msg<W: AsyncWrite + Unpin, T: serde::Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let payload = postcard::to_allocvec(msg).expect("protocol messages encode");
    write(w, &payload).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    #[test]
    fn round_trip_and_refusals() {
        block_on(async {
            let mut buf = encode(b"hello");
            buf.extend(encode(b""));
            let mut r = &buf[..];
            assert_eq!(read(&mut r, 100).await.unwrap(), b"hello");
            assert_eq!(read(&mut r, 100).await.unwrap(), b"");
            assert!(matches!(read(&mut r, 100).await, Err(FrameError::Closed)));

            let big = encode(&[7u8; 50]);
            assert!(matches!(read(&mut &big[..], 49).await, Err(FrameError::Oversized { len: 50, max: 49 })));

            let mut bad = encode(b"payload");
            *bad.last_mut().unwrap() ^= 1;
            assert!(matches!(read(&mut &bad[..], 100).await, Err(FrameError::Checksum)));

            let mut parts = Vec::new();
            write_parts(&mut parts, b"\x02head", b"body").await.unwrap();
            assert_eq!(parts, encode(b"\x02headbody"));
            assert_eq!(read_tagged(&mut &parts[..], 100).await.unwrap(), (2, b"headbody".to_vec()));
            assert!(matches!(read_tagged(&mut &encode(b"")[..], 100).await, Err(FrameError::Decode(_))));
            let mut bad = parts.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(matches!(read_tagged(&mut &bad[..], 100).await, Err(FrameError::Checksum)));

            let torn = &encode(b"payload")[..10];
            assert!(matches!(read(&mut &torn[..], 100).await, Err(FrameError::Io(_))));
        });
    }
}
