//! What the E2B listener shares between its REST and envd halves: the daemon, the API key, each
//! sandbox's envd access token, the guest users already resolved, and a count of open streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_agent::protocol::UserInfo;

use crate::daemon::Daemon;
use crate::daemon::sandbox::Sandbox;

/// The envd version kilnd reports: the newest whose features it serves, so the SDK never calls
/// what is missing. 0.5.7 brings closing stdin (0.5.2), default users (0.4.0) and octet-stream
/// uploads (0.5.7); file metadata (0.6.2) and watch details (0.6.3+) would need what kilnd lacks.
pub const ENVD_VERSION: &str = "0.5.7";

/// The port envd listens on inside an E2B sandbox; the SDK names it in `E2b-Sandbox-Port`.
pub const ENVD_PORT: u16 = 49983;

/// The file in a sandbox's folder holding its envd access token.
const TOKEN_FILE: &str = "envd-access-token";

/// The E2B listener's shared state.
pub struct E2b {
    /// The daemon it translates to.
    pub daemon: Arc<Daemon>,
    /// Whether a create that says nothing of the network gets the internet, as on E2B
    /// (`kilnd --e2b-internet-default allow`), rather than its template's default policy.
    pub internet_default: bool,
    api_key: String,
    tokens: Mutex<HashMap<String, String>>,
    users: Mutex<HashMap<(String, String), UserInfo>>,
    streams: AtomicUsize,
}

/// Compares without stopping at the first difference.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl E2b {
    /// The state for `daemon`, checking requests against `api_key`; `internet_default` is what
    /// a create that says nothing of the network gets (see [`E2b::internet_default`]).
    pub fn new(daemon: Arc<Daemon>, api_key: String, internet_default: bool) -> Arc<E2b> {
        Arc::new(E2b {
            daemon,
            internet_default,
            api_key,
            tokens: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            streams: AtomicUsize::new(0),
        })
    }

    /// Whether `given` is the API key.
    pub fn api_key_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| same_secret(g, &self.api_key))
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sandbox `sb`'s envd access token, made the first time it is asked for. It lives in the
    /// sandbox's folder, so it survives a pause and a kilnd restart and goes when the sandbox
    /// does; forks get their own.
    pub fn token(&self, sb: &Sandbox) -> String {
        if let Some(t) = self.tokens().get(&sb.id) {
            return t.clone();
        }
        let path = sb.dir.join(TOKEN_FILE);
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().len() >= 32 => t.trim().to_string(),
            _ => {
                let t = crate::daemon::new_id() + &crate::daemon::new_id();
                if let Err(e) = write_private(&path, &t) {
                    tracing::warn!(sandbox = %sb.id, "cannot keep its envd token in {}: {e}", path.display());
                }
                t
            }
        };
        self.tokens().insert(sb.id.clone(), token.clone());
        token
    }

    /// Forgets what is kept for sandboxes that no longer exist.
    pub fn forget_gone(&self) {
        let live: std::collections::HashSet<String> = self
            .daemon
            .all_sandboxes()
            .iter()
            .map(|s| s.id.clone())
            .collect();
        self.tokens().retain(|id, _| live.contains(id));
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _), _| live.contains(id));
    }

    /// A user of sandbox `id` resolved before.
    pub fn cached_user(&self, id: &str, user: &str) -> Option<UserInfo> {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(id.to_string(), user.to_string()))
            .cloned()
    }

    /// Remembers a resolved user of sandbox `id`.
    pub fn remember_user(&self, id: &str, user: &str, info: UserInfo) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((id.to_string(), user.to_string()), info);
    }

    /// Counts a stream open until the guard drops.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Streams open now (process output being followed, files being transferred).
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }
}

/// One open stream, counted while it lives.
pub struct StreamGuard(Arc<E2b>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }
}
