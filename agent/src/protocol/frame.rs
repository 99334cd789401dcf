//! Framing: `u32 LE length | u8 kind | u64 LE request id | payload`, where the length counts
//! everything after itself. Reading never allocates more than [`MAX_FRAME_LEN`] bytes, whatever
//! the peer claims.

use std::io::{self, Read};

use super::MAX_FRAME_LEN;

/// Bytes after the length prefix that every frame has: the kind and the request id.
pub const FRAME_OVERHEAD: u32 = 1 + 8;

/// A frame as read off the wire, before its payload is interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The frame kind (see [`super::message`] for the known ones).
    pub kind: u8,
    /// The request this frame belongs to; 0 for the connection itself.
    pub id: u64,
    /// Everything after the header.
    pub payload: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes of the current piece that arrived.
        got: usize,
        /// Bytes the piece needed.
        want: usize,
    },
    /// The length prefix is below the header size or above [`MAX_FRAME_LEN`].
    #[error("frame length {len} is outside {FRAME_OVERHEAD}..={MAX_FRAME_LEN}")]
    BadLength {
        /// The length the peer announced.
        len: u32,
    },
    /// The transport failed.
    #[error("reading a frame: {0}")]
    Io(#[from] io::Error),
}

/// Reads as much of `buf` as the stream gives before it ends; returns how many bytes arrived.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<RawFrame>, FrameError> {
    let mut len_bytes = [0u8; 4];
    match read_full(r, &mut len_bytes)? {
        0 => return Ok(None),
        4 => {}
        got => return Err(FrameError::Truncated { got, want: 4 }),
    }
    let len = u32::from_le_bytes(len_bytes);
    if !(FRAME_OVERHEAD..=MAX_FRAME_LEN).contains(&len) {
        return Err(FrameError::BadLength { len });
    }
    let mut body = vec![0u8; len as usize];
    let got = read_full(r, &mut body)?;
    if got < body.len() {
        return Err(FrameError::Truncated {
            got,
            want: body.len(),
        });
    }
    let kind = body[0];
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[1..9]);
    body.drain(..9);
    Ok(Some(RawFrame {
        kind,
        id: u64::from_le_bytes(id),
        payload: body,
    }))
}

/// Encodes a frame whose payload is the concatenation of `parts`.
///
/// # Panics
/// If the payload exceeds [`MAX_FRAME_LEN`]; callers bound their payloads (data chunks by
/// [`super::MAX_CHUNK`], JSON by construction), so this is a bug in the caller, not bad input.
pub fn encode_frame(kind: u8, id: u64, parts: &[&[u8]]) -> Vec<u8> {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(payload + FRAME_OVERHEAD as usize)
        .ok()
        .filter(|l| *l <= MAX_FRAME_LEN)
        .expect("frame payload within MAX_FRAME_LEN");
    let mut out = Vec::with_capacity(4 + len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so failures reproduce.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode_frame(4, 77, &[b"ab", b"cd"]);
        let frame = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(
            frame,
            RawFrame {
                kind: 4,
                id: 77,
                payload: b"abcd".to_vec()
            }
        );
    }

    #[test]
    fn clean_end_and_truncation() {
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        let bytes = encode_frame(2, 1, &[b"hello"]);
        for cut in 1..bytes.len() {
            let err = read_frame(&mut &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn lengths_out_of_range_are_refused_before_allocating() {
        for len in [0u32, 1, 8, MAX_FRAME_LEN + 1, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&[0; 16]);
            let err = read_frame(&mut &bytes[..]).unwrap_err();
            assert!(
                matches!(err, FrameError::BadLength { len: l } if l == len),
                "{err}"
            );
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let n = (rng.next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            // Half the time, make the length plausible so the body parser is exercised too.
            if n >= 4 && rng.next().is_multiple_of(2) {
                let len = (n as u32 - 4).max(FRAME_OVERHEAD);
                bytes[..4].copy_from_slice(&len.to_le_bytes());
            }
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_frame(&mut r) {}
        }
    }
}
