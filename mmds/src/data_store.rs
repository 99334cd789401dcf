//! The MMDS data store: one JSON document, replaced (`PUT /mmds`) or merged into (`PATCH /mmds`,
//! RFC 7396) by the host, read by the guest one path at a time.

use serde_json::{Map, Value};

use crate::token::{TokenAuthority, TokenError};

/// Firecracker's default limit on the data store's size, in bytes of compact JSON.
pub const DEFAULT_LIMIT: usize = 51_200;

/// V1 answers any GET; V2 wants a session token first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MmdsVersion {
    /// No session tokens.
    #[default]
    V1,
    /// Session tokens required.
    V2,
}

/// How a value is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// As JSON (`Accept: application/json`).
    Json,
    /// EC2's IMDS text: an object's keys one a line (`key/` for an object), a string as itself.
    Imds,
}

/// Why the store refused a change or a read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsError {
    /// The document would grow past the limit.
    #[error(
        "The MMDS data store would be {size} bytes, more than its limit of {limit} bytes (kiln-vmm --mmds-size-limit)"
    )]
    TooLarge {
        /// The document's size after the change.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Nothing was ever put.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// The path names nothing.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// The value at the path has no IMDS text form (a number, a boolean, an array).
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
    /// V2's token keys could not be made.
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// The metadata store of one VM.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    limit: usize,
    tokens: Option<TokenAuthority>,
    imds_compat: bool,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT)
    }
}

impl Mmds {
    /// An empty, uninitialized store of at most `limit` bytes, V1.
    pub fn new(limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            limit,
            tokens: None,
            imds_compat: false,
        }
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Switches to `version`; V2 makes a fresh token key (earlier tokens become invalid).
    pub fn set_version(&mut self, version: MmdsVersion) -> Result<(), MmdsError> {
        self.tokens = match version {
            MmdsVersion::V1 => None,
            MmdsVersion::V2 => Some(TokenAuthority::new()?),
        };
        Ok(())
    }

    /// The version in force.
    pub fn version(&self) -> MmdsVersion {
        match self.tokens {
            Some(_) => MmdsVersion::V2,
            None => MmdsVersion::V1,
        }
    }

    /// Answer `text/plain` whatever the guest's `Accept` header says, as EC2's IMDS does.
    pub fn set_imds_compat(&mut self, on: bool) {
        self.imds_compat = on;
    }

    /// True when answers are always IMDS text.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// The token authority, in V2.
    pub fn tokens(&self) -> Option<&TokenAuthority> {
        self.tokens.as_ref()
    }

    fn check_size(&self, value: &Value) -> Result<(), MmdsError> {
        let size = value.to_string().len();
        if size > self.limit {
            return Err(MmdsError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Replaces the document with `data`.
    pub fn put(&mut self, data: Value) -> Result<(), MmdsError> {
        self.check_size(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Merges `patch` into the document (RFC 7396: `null` removes a key); refused before any
    /// [`Mmds::put`], and refused whole if the result would be too large.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        if !self.initialized {
            return Err(MmdsError::NotInitialized);
        }
        let mut merged = self.data.clone();
        merge_patch(&mut merged, patch);
        self.check_size(&merged)?;
        self.data = merged;
        Ok(())
    }

    /// The whole document (`{}` if it was never set), for `GET /mmds`.
    pub fn document(&self) -> Result<&Value, MmdsError> {
        if !self.initialized {
            return Err(MmdsError::NotInitialized);
        }
        Ok(&self.data)
    }

    /// The value at `path` (`/a/b`; `//` counts as `/`, a trailing `/` is ignored) in `format`.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, MmdsError> {
        let mut pointer = String::with_capacity(path.len());
        for part in path.split('/').filter(|p| !p.is_empty()) {
            pointer.push('/');
            pointer.push_str(part);
        }
        let value = self.data.pointer(&pointer).ok_or(MmdsError::NotFound)?;
        if value.is_null() && !self.initialized {
            return Err(MmdsError::NotFound);
        }
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => imds_text(value),
        }
    }
}

/// RFC 7396 JSON merge patch of `target` with `patch`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in fields {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn imds_text(value: &Value) -> Result<String, MmdsError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| {
                if v.is_object() {
                    format!("{k}/")
                } else {
                    k.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(MmdsError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mmds {
        let mut m = Mmds::default();
        m.put(json!({
            "latest": {"meta-data": {"ami-id": "ami-12345", "instance-id": "i-1"}},
            "age": 43, "phones": ["+40", "+44"], "name": "kiln"
        }))
        .unwrap();
        m
    }

    #[test]
    fn paths_are_answered_as_json_or_imds_text() {
        let m = store();
        assert_eq!(
            m.get("/latest/meta-data/ami-id", OutputFormat::Imds)
                .unwrap(),
            "ami-12345"
        );
        assert_eq!(
            m.get("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "\"ami-12345\""
        );
        assert_eq!(
            m.get("//latest//meta-data/", OutputFormat::Imds).unwrap(),
            "ami-id\ninstance-id"
        );
        assert_eq!(
            m.get("/", OutputFormat::Imds).unwrap(),
            "age\nlatest/\nname\nphones"
        );
        assert_eq!(m.get("/age", OutputFormat::Json).unwrap(), "43");
        assert_eq!(
            m.get("/age", OutputFormat::Imds),
            Err(MmdsError::UnsupportedValueType)
        );
        assert_eq!(m.get("/phones/1", OutputFormat::Imds).unwrap(), "+44");
        assert_eq!(m.get("/nope", OutputFormat::Json), Err(MmdsError::NotFound));
    }

    #[test]
    fn patch_merges_and_removes_and_needs_a_put_first() {
        let mut m = Mmds::default();
        assert_eq!(m.patch(&json!({"a": 1})), Err(MmdsError::NotInitialized));
        assert_eq!(m.document(), Err(MmdsError::NotInitialized));
        m.put(json!({"a": {"b": 1, "c": 2}, "d": 3})).unwrap();
        m.patch(&json!({"a": {"b": null, "e": [1]}, "d": "x"}))
            .unwrap();
        assert_eq!(
            m.document().unwrap(),
            &json!({"a": {"c": 2, "e": [1]}, "d": "x"})
        );
    }

    #[test]
    fn the_limit_refuses_puts_and_patches_whole() {
        let mut m = Mmds::new(20);
        m.put(json!({"k": "0123456789"})).unwrap();
        let e = m.patch(&json!({"j": "0123456789"})).unwrap_err();
        assert_eq!(
            e,
            MmdsError::TooLarge {
                size: 35,
                limit: 20
            }
        );
        assert_eq!(
            m.document().unwrap(),
            &json!({"k": "0123456789"}),
            "unchanged"
        );
        assert!(
            m.put(json!({"k": "x".repeat(30)}))
                .unwrap_err()
                .to_string()
                .contains("limit of 20 bytes")
        );
    }

    #[test]
    fn versions() {
        let mut m = Mmds::default();
        assert_eq!(m.version(), MmdsVersion::V1);
        m.set_version(MmdsVersion::V2).unwrap();
        assert_eq!(m.version(), MmdsVersion::V2);
        assert!(m.tokens().is_some());
    }
}
