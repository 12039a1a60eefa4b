//! Splitting input files into map tasks at line boundaries.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// One map task's input: `len` bytes of `file` from `offset`, whole lines only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The file, as named on the command line.
    pub file: String,
    /// First byte.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// Splits every file into chunks of about `chunk_bytes`, each ending after a newline (or at
/// the end of the file). An empty file is one empty chunk. Fails, naming the file, if any
/// input is missing, not a regular file, or unreadable: before any work starts.
pub fn split_inputs(files: &[String], chunk_bytes: u64) -> Result<Vec<Chunk>, String> {
    assert!(chunk_bytes > 0, "chunk size must be positive");
    let mut chunks = Vec::new();
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| format!("input {f}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("input {f}: not a regular file"));
        }
        let mut file = File::open(f).map_err(|e| format!("input {f}: {e}"))?;
        let size = meta.len();
        if size == 0 {
            chunks.push(Chunk { file: f.clone(), offset: 0, len: 0 });
            continue;
        }
        let mut offset = 0;
        while offset < size {
            let mut end = (offset + chunk_bytes).min(size);
            if end < size {
                end = next_line_start(&mut file, end, size).map_err(|e| format!("input {f}: {e}"))?;
            }
            chunks.push(Chunk { file: f.clone(), offset, len: end - offset });
            offset = end;
        }
    }
    Ok(chunks)
}

/// The position just after the first newline at or after `from` (or `size`).
fn next_line_start(file: &mut File, from: u64, size: u64) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(from))?;
    let mut buf = [0u8; 64 << 10];
    let mut pos = from;
    while pos < size {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(pos + i as u64 + 1);
        }
        pos += n as u64;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_file_and_end_at_newlines() {
        let dir = std::env::temp_dir().join(format!("sixfive-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("in.txt");
        let text: String = (0..1000).map(|i| format!("line {i} {}\n", "x".repeat(i % 37))).collect();
        std::fs::write(&p, &text).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let names = vec![p.to_string_lossy().to_string(), empty.to_string_lossy().to_string()];
        let chunks = split_inputs(&names, 1000).unwrap();
        let (file_chunks, rest): (Vec<_>, Vec<_>) = chunks.iter().partition(|c| c.file == names[0]);
        assert!(file_chunks.len() > 20);
        let mut pos = 0;
        for c in &file_chunks {
            assert_eq!(c.offset, pos, "no gap, no overlap");
            let piece = &text.as_bytes()[c.offset as usize..(c.offset + c.len) as usize];
            assert_eq!(*piece.last().unwrap(), b'\n', "ends at a line boundary");
            pos += c.len;
        }
        assert_eq!(pos, text.len() as u64);
        assert_eq!(rest, vec![&Chunk { file: names[1].clone(), offset: 0, len: 0 }]);
        let err = split_inputs(&["/nonexistent/x".to_string()], 10).unwrap_err();
        assert!(err.contains("/nonexistent/x"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
