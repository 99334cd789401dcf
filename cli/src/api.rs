//! Talking to a `kiln-vmm` API socket: one keep-alive connection, JSON bodies from `kiln-api`'s
//! types, and every refusal reported as the request that failed with the VMM's `fault_message`.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use kiln_api::client::{Client, ClientError};
use kiln_api::requests::instance::InstanceState;
use kiln_api::requests::snapshot::{SnapshotCreate, SnapshotLoad};
use kiln_api::requests::vm::{VmState, VmStateBody};
use serde::Serialize;

/// Why an API request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing answers on the socket.
    #[error("cannot reach the VMM's API socket: {0}")]
    Connect(ClientError),
    /// The VMM refused: its `fault_message`.
    #[error("{request} failed: {message}")]
    Fault {
        /// Method and path, e.g. `PUT /snapshot/load`.
        request: String,
        /// The VMM's `fault_message`.
        message: String,
    },
    /// The request got no usable answer.
    #[error("{request} failed: {source}")]
    Transport {
        /// Method and path.
        request: String,
        /// What went wrong on the socket.
        source: ClientError,
    },
    /// An answer that is not what the API documents.
    #[error("{request} failed: unexpected answer {status} {body:?}")]
    Unexpected {
        /// Method and path.
        request: String,
        /// The HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
}

/// A connection to a VMM's API socket.
pub struct Api {
    client: Client,
}

impl Api {
    /// Connects to the socket at `sock`.
    pub fn connect(sock: &Path) -> Result<Api, ApiError> {
        Ok(Api {
            client: Client::connect(sock).map_err(ApiError::Connect)?,
        })
    }

    /// Connects to the socket at `sock` once it answers, retrying until `deadline`; `gone` is
    /// asked between attempts and ends the wait with its reason (the VMM exited, say).
    pub fn wait(
        sock: &Path,
        deadline: Instant,
        mut gone: impl FnMut() -> Option<String>,
    ) -> Result<Api, String> {
        loop {
            let err = match Api::connect(sock) {
                Ok(api) => return Ok(api),
                Err(e) => e,
            };
            if let Some(reason) = gone() {
                return Err(reason);
            }
            if Instant::now() >= deadline {
                return Err(format!("{err} (gave up waiting for {})", sock.display()));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives up on a request after `timeout`.
    pub fn set_timeout(&self, timeout: Duration) {
        // Only fails for a zero duration, which callers do not pass.
        let _ = self.client.set_timeout(Some(timeout));
    }

    /// Sends `method path` with `body` serialized as JSON; the answer's body on success.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<String, ApiError> {
        let request = format!("{method} {path}");
        let json = body.map(|b| serde_json::to_string(b).unwrap_or_default());
        let (status, answer) =
            self.client
                .request(method, path, json.as_deref())
                .map_err(|source| ApiError::Transport {
                    request: request.clone(),
                    source,
                })?;
        match status {
            200..=299 => Ok(answer),
            _ => match fault_message(&answer) {
                Some(message) => Err(ApiError::Fault { request, message }),
                None => Err(ApiError::Unexpected {
                    request,
                    status,
                    body: answer,
                }),
            },
        }
    }

    /// `GET /`: the instance's state.
    pub fn state(&mut self) -> Result<InstanceState, ApiError> {
        let body = self.call("GET", "/", None::<&()>)?;
        let state = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("state")?.clone()).ok());
        state.ok_or(ApiError::Unexpected {
            request: "GET /".into(),
            status: 200,
            body,
        })
    }

    /// `PATCH /vm`: pause or resume.
    pub fn set_state(&mut self, state: VmState) -> Result<(), ApiError> {
        self.call("PATCH", "/vm", Some(&VmStateBody { state }))
            .map(drop)
    }

    /// `PUT /snapshot/create`.
    pub fn create_snapshot(&mut self, body: &SnapshotCreate) -> Result<(), ApiError> {
        self.call("PUT", "/snapshot/create", Some(body)).map(drop)
    }

    /// `PUT /snapshot/load`.
    pub fn load_snapshot(&mut self, body: &SnapshotLoad) -> Result<(), ApiError> {
        self.call("PUT", "/snapshot/load", Some(body)).map(drop)
    }
}

/// The `fault_message` of an error body.
fn fault_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v.get("fault_message")?.as_str()?.to_string())
}

/// `path` made absolute against this process's directory: the VMM resolves paths against its
/// own, which need not be ours.
pub fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_messages() {
        assert_eq!(
            fault_message(r#"{"fault_message": "snapshot/load: no"}"#).as_deref(),
            Some("snapshot/load: no")
        );
        assert_eq!(fault_message("oops"), None);
        assert_eq!(fault_message(r#"{"fault_message": 3}"#), None);
    }
}
