//! The body of the `restored` request, sent once to each VM restored from a snapshot: fresh host
//! entropy, the host's wall-clock time and the environment for later execs. Clones of one
//! snapshot wake up with the same RNG state and a clock stuck at snapshot time; this is what makes
//! them differ. [`RestoreSpec::validate`] is the one place its rules live, used by the agent (and
//! available to hosts that want to check before sending).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::net::{Net, NetSpec, NetSpecError};

/// The least entropy a `restored` request carries, in bytes (256 bits: the kernel's CRNG key).
pub const MIN_ENTROPY: usize = 32;
/// The most entropy a `restored` request may carry, in bytes.
pub const MAX_ENTROPY: usize = 512;

/// A `restored` request as sent: entropy as hex text, so the JSON stays plain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// Fresh host entropy, [`MIN_ENTROPY`] to [`MAX_ENTROPY`] bytes, as hex (either case).
    pub entropy: String,
    /// The host's `CLOCK_REALTIME`, nanoseconds since the epoch, read just before sending.
    pub time_ns: u64,
    /// The agent's default environment from now on (replacing any earlier one); each exec's
    /// own `env` still adds to it or overrides it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Network settings to apply to eth0 again (address, route, name servers), for a VM with a
    /// network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetSpec>,
}

/// A [`RestoreSpec`] whose values were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// The entropy bytes.
    pub entropy: Vec<u8>,
    /// The time to step `CLOCK_REALTIME` to, nanoseconds since the epoch (at most `i64::MAX`).
    pub time_ns: u64,
    /// The new default environment.
    pub env: BTreeMap<String, String>,
    /// eth0's settings, if any were sent.
    pub net: Option<Net>,
}

/// Why a [`RestoreSpec`] is not acceptable; each message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreSpecError {
    /// `entropy` has a character that is not a hex digit.
    #[error("entropy: {found:?} at offset {offset} is not a hex digit")]
    NotHex {
        /// The offending character.
        found: char,
        /// Its character offset.
        offset: usize,
    },
    /// `entropy` has an odd number of hex digits.
    #[error("entropy: {digits} hex digits is not a whole number of bytes")]
    OddHex {
        /// How many digits it has.
        digits: usize,
    },
    /// `entropy` is too short or too long.
    #[error("entropy: {bytes} bytes; {MIN_ENTROPY} to {MAX_ENTROPY} are needed")]
    EntropySize {
        /// How many bytes it decodes to.
        bytes: usize,
    },
    /// `time_ns` is 0 or beyond what a signed 64-bit nanosecond count holds.
    #[error("time_ns: {0} is not a time after the epoch that the clock can hold")]
    Time(u64),
    /// An `env` name is empty or holds `=` or NUL.
    #[error("env: variable name {0:?} is empty or contains '=' or a NUL byte")]
    EnvName(String),
    /// An `env` value holds a NUL byte.
    #[error("env: the value of {0} contains a NUL byte")]
    EnvValue(String),
    /// `net` breaks a rule.
    #[error(transparent)]
    Net(#[from] NetSpecError),
}

impl RestoreSpec {
    /// A request carrying `entropy`, `time` and `env`. A `time` before the epoch becomes 0, which
    /// the agent refuses.
    pub fn new(entropy: &[u8], time: SystemTime, env: BTreeMap<String, String>) -> RestoreSpec {
        let time_ns = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        RestoreSpec {
            entropy: encode_hex(entropy),
            time_ns,
            env,
            net: None,
        }
    }

    /// This request with network settings for eth0.
    pub fn with_net(mut self, net: Option<NetSpec>) -> RestoreSpec {
        self.net = net;
        self
    }

    /// Checks every field and decodes the entropy.
    pub fn validate(&self) -> Result<Restore, RestoreSpecError> {
        let entropy = decode_hex(&self.entropy)?;
        if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
            return Err(RestoreSpecError::EntropySize {
                bytes: entropy.len(),
            });
        }
        if self.time_ns == 0 || i64::try_from(self.time_ns).is_err() {
            return Err(RestoreSpecError::Time(self.time_ns));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(RestoreSpecError::EnvName(k.clone()));
            }
            if v.contains('\0') {
                return Err(RestoreSpecError::EnvValue(k.clone()));
            }
        }
        let net = self.net.as_ref().map(NetSpec::validate).transpose()?;
        Ok(Restore {
            entropy,
            time_ns: self.time_ns,
            env: self.env.clone(),
            net,
        })
    }
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The bytes of hex text (either case).
pub fn decode_hex(text: &str) -> Result<Vec<u8>, RestoreSpecError> {
    let mut nibbles = Vec::with_capacity(text.len());
    for (offset, c) in text.chars().enumerate() {
        let n = c
            .to_digit(16)
            .ok_or(RestoreSpecError::NotHex { found: c, offset })?;
        nibbles.push(n as u8);
    }
    if nibbles.len() % 2 != 0 {
        return Err(RestoreSpecError::OddHex {
            digits: nibbles.len(),
        });
    }
    Ok(nibbles.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(entropy: &str) -> RestoreSpec {
        RestoreSpec {
            entropy: entropy.into(),
            time_ns: 1_700_000_000_000_000_000,
            env: BTreeMap::new(),
            net: None,
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(&encode_hex(&bytes)).unwrap(), bytes);
        assert_eq!(decode_hex("00FFa5").unwrap(), [0, 255, 0xa5]);
        assert_eq!(
            decode_hex("0g"),
            Err(RestoreSpecError::NotHex {
                found: 'g',
                offset: 1
            })
        );
        assert_eq!(
            decode_hex("abc"),
            Err(RestoreSpecError::OddHex { digits: 3 })
        );
        // A non-ASCII digit (a full-width '1') is not hex, and does not panic.
        assert!(decode_hex("\u{ff11}0").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let ok = spec(&"ab".repeat(32)).validate().unwrap();
        assert_eq!(ok.entropy, vec![0xab; 32]);
        let e = spec(&"ab".repeat(31)).validate().unwrap_err();
        assert_eq!(e.to_string(), "entropy: 31 bytes; 32 to 512 are needed");
        let e = spec(&"ab".repeat(513)).validate().unwrap_err();
        assert!(e.to_string().starts_with("entropy: 513 bytes"), "{e}");
        let e = spec("xy").validate().unwrap_err();
        assert!(e.to_string().starts_with("entropy: 'x'"), "{e}");

        let mut s = spec(&"00".repeat(32));
        s.time_ns = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("time_ns: 0 ")
        );
        s.time_ns = u64::MAX;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("time_ns: ")
        );
        s.time_ns = 1;
        s.env.insert("A=B".into(), "x".into());
        let e = s.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "env: variable name \"A=B\" is empty or contains '=' or a NUL byte"
        );
        s.env.clear();
        s.env.insert("A".into(), "x\0y".into());
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "env: the value of A contains a NUL byte"
        );
    }

    #[test]
    fn new_encodes_entropy_and_time() {
        let t = UNIX_EPOCH + Duration::new(5, 7);
        let s = RestoreSpec::new(&[1, 2], t, BTreeMap::new());
        assert_eq!((s.entropy.as_str(), s.time_ns), ("0102", 5_000_000_007));
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(RestoreSpec::new(&[], before, BTreeMap::new()).time_ns, 0);
    }
}
