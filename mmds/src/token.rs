//! MMDS V2 session tokens. A token is its expiry time and an HMAC-SHA256 of it under a key made
//! when V2 is switched on, in hex: checking one needs only the key, so the guest can ask for as
//! many as it likes without the VMM remembering any (Firecracker encrypts the expiry for the same
//! reason). Times are on a monotonic clock from the authority's creation, so a token does not
//! outlive its VMM process (nor survive a snapshot restore, as in Firecracker).

use std::time::{Duration, Instant};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest lifetime a token may be asked for, in seconds.
pub const MIN_TTL_SECONDS: u32 = 1;
/// Longest lifetime a token may be asked for, in seconds (six hours, as IMDSv2).
pub const MAX_TTL_SECONDS: u32 = 21_600;

/// HMAC-SHA256's block size: a key of exactly this length is used as is.
const KEY_LEN: usize = 64;
const MAC_LEN: usize = 32;
/// Hex characters of a token: 8 bytes of expiry, then the MAC.
pub const TOKEN_LEN: usize = 2 * (8 + MAC_LEN);

/// Why a token could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The lifetime asked for is out of range.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
    )]
    Ttl(u64),
    /// No random key could be read.
    #[error("cannot make the MMDS token key: {0}")]
    Key(String),
}

/// Makes and checks the tokens of one VM.
pub struct TokenAuthority {
    key: [u8; KEY_LEN],
    epoch: Instant,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("TokenAuthority").finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// An authority with a fresh random key.
    pub fn new() -> Result<Self, TokenError> {
        let mut key = [0u8; KEY_LEN];
        let mut filled = 0;
        while filled < KEY_LEN {
            let rest = &mut key[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid
            // and exclusively borrowed for the call.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n <= 0 {
                return Err(TokenError::Key(std::io::Error::last_os_error().to_string()));
            }
            filled += n as usize;
        }
        Ok(Self {
            key,
            epoch: Instant::now(),
        })
    }

    fn hmac(&self, expiry_ms: u64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&self.key.into());
        mac.update(&expiry_ms.to_le_bytes());
        mac
    }

    /// A token valid for `ttl_seconds` from `now`.
    pub fn issue(&self, ttl_seconds: u64, now: Instant) -> Result<String, TokenError> {
        if !(u64::from(MIN_TTL_SECONDS)..=u64::from(MAX_TTL_SECONDS)).contains(&ttl_seconds) {
            return Err(TokenError::Ttl(ttl_seconds));
        }
        let expiry = now.saturating_duration_since(self.epoch) + Duration::from_secs(ttl_seconds);
        let expiry_ms = expiry.as_millis() as u64;
        let mut bytes = Vec::with_capacity(8 + MAC_LEN);
        bytes.extend_from_slice(&expiry_ms.to_le_bytes());
        bytes.extend_from_slice(&self.hmac(expiry_ms).finalize().into_bytes());
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// True if `token` was issued here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        if token.len() != TOKEN_LEN || !token.is_ascii() {
            return false;
        }
        let mut bytes = [0u8; 8 + MAC_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            match u8::from_str_radix(&token[2 * i..2 * i + 2], 16) {
                Ok(v) => *b = v,
                Err(_) => return false,
            }
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&bytes[..8]);
        let expiry_ms = u64::from_le_bytes(expiry);
        // Constant-time comparison, so a guest learns nothing from how long a check took.
        if self.hmac(expiry_ms).verify_slice(&bytes[8..]).is_err() {
            return false;
        }
        (now.saturating_duration_since(self.epoch).as_millis() as u64) < expiry_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_valid_until_they_expire_and_only_here() {
        let a = TokenAuthority::new().unwrap();
        let t0 = Instant::now();
        let token = a.issue(60, t0).unwrap();
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(a.is_valid(&token, t0));
        assert!(a.is_valid(&token, t0 + Duration::from_secs(59)));
        assert!(!a.is_valid(&token, t0 + Duration::from_secs(61)));
        let other = TokenAuthority::new().unwrap();
        assert!(!other.is_valid(&token, t0), "another VM's key");
        let mut forged = token.clone().into_bytes();
        forged[0] = if forged[0] == b'f' { b'e' } else { b'f' };
        assert!(!a.is_valid(std::str::from_utf8(&forged).unwrap(), t0));
        assert!(!a.is_valid("short", t0));
        assert!(!a.is_valid(&"g".repeat(TOKEN_LEN), t0));
        assert!(!a.is_valid(&"é".repeat(TOKEN_LEN / 2), t0));
    }

    #[test]
    fn lifetimes_are_bounded() {
        let a = TokenAuthority::new().unwrap();
        assert_eq!(a.issue(0, Instant::now()), Err(TokenError::Ttl(0)));
        assert_eq!(
            a.issue(21_601, Instant::now()),
            Err(TokenError::Ttl(21_601))
        );
        assert!(a.issue(21_600, Instant::now()).is_ok());
    }
}
