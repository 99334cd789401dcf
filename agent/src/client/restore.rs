//! The post-restore step from the host: [`Client::restored`] sends given entropy, time and
//! environment; [`Client::restored_now`] gathers fresh entropy from the host's `getrandom` and
//! reads the host's clock just before sending.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::{Instant, SystemTime};

use super::conn::{Inbound, Req};
use super::connect::{HANDSHAKE_TIMEOUT, connect_pipelined};
use super::exec::Exec;
use super::{Client, Error, unexpected};
use crate::protocol::{Event, ExecSpec, Request, RestoreSpec};

/// Bytes of entropy [`Client::restored_now`] sends (twice the protocol's minimum).
pub const RESTORE_ENTROPY: usize = 64;

/// What the agent did for a `restored` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// How far it stepped the guest's `CLOCK_REALTIME`, in nanoseconds (negative: backwards).
    pub clock_step_ns: i64,
    /// How many bytes of entropy it mixed in.
    pub entropy_bytes: u32,
}

/// `n` bytes from the host's `getrandom(2)`, which blocks only until the host's RNG is seeded.
pub fn host_entropy(n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: getrandom writes at most `n - got` bytes into the unfilled tail of `buf`.
        let rc = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += rc as usize;
        }
    }
    Ok(buf)
}

/// What [`restore_and_exec`] hands back: the connected client, what the clone step did, and the
/// first command.
pub struct RestoredExec {
    /// The connection, for later requests.
    pub client: Client,
    /// What the agent did in the clone step.
    pub restored: Restored,
    /// The first command, running, or why it did not start ([`Error::CouldNotStart`] for a bad
    /// program, directory or user).
    pub exec: Result<Exec, Error>,
}

/// The whole first contact with a VM just restored from a snapshot, in one round trip: connects
/// to its agent through the VMM's vsock socket `uds` and sends, in the same write as `CONNECT`
/// and the hello, the clone step ([`RESTORE_ENTROPY`] fresh bytes of host entropy, the host's
/// time, `env`) and `spec`'s exec. The agent answers the clone step before it reads the exec,
/// and refuses the exec if the step failed, so the command never runs in a clone that was not
/// reseeded. Connecting is retried until `deadline` while the agent is not there yet; a failure
/// after its hello is returned as is (the requests may have run). `Err` means the connection or
/// the clone step failed; how the command fared is in [`RestoredExec::exec`].
pub fn restore_and_exec(
    uds: impl AsRef<Path>,
    deadline: Instant,
    env: BTreeMap<String, String>,
    spec: ExecSpec,
) -> Result<RestoredExec, Error> {
    let wants_stdin = spec.stdin;
    let requests = vec![clone_step(env)?, Request::Exec(spec)];
    let (client, reqs) = connect_pipelined(uds.as_ref(), deadline, requests)?;
    let [step, exec]: [Req; 2] = reqs
        .try_into()
        .map_err(|_| Error::Protocol("two pipelined requests expected".into()))?;
    let answer_by = Some(deadline.max(Instant::now() + HANDSHAKE_TIMEOUT));
    let restored = await_restored(step, answer_by)?;
    let exec = Exec::started(exec, wants_stdin, answer_by);
    Ok(RestoredExec {
        client,
        restored,
        exec,
    })
}

/// [`restore_and_exec`] without a command: the connection, the hello and the clone step in one
/// round trip, for a clone that is handed out to run commands later.
pub fn restore_connect(
    uds: impl AsRef<Path>,
    deadline: Instant,
    env: BTreeMap<String, String>,
) -> Result<(Client, Restored), Error> {
    let (client, reqs) = connect_pipelined(uds.as_ref(), deadline, vec![clone_step(env)?])?;
    let step = reqs
        .into_iter()
        .next()
        .ok_or_else(|| Error::Protocol("one pipelined request expected".into()))?;
    let answer_by = Some(deadline.max(Instant::now() + HANDSHAKE_TIMEOUT));
    Ok((client, await_restored(step, answer_by)?))
}

/// The clone step's request: fresh host entropy, the host's time now, and `env`.
fn clone_step(env: BTreeMap<String, String>) -> Result<Request, Error> {
    let entropy = host_entropy(RESTORE_ENTROPY).map_err(|source| Error::Local {
        what: format!("reading {RESTORE_ENTROPY} bytes of host entropy"),
        source,
    })?;
    Ok(Request::Restored(RestoreSpec::new(
        &entropy,
        SystemTime::now(),
        env,
    )))
}

/// The agent's answer to a clone step.
fn await_restored(mut step: Req, deadline: Option<Instant>) -> Result<Restored, Error> {
    match step.recv(deadline)? {
        Inbound::Event(Event::Restored {
            clock_step_ns,
            entropy_bytes,
        }) => Ok(Restored {
            clock_step_ns,
            entropy_bytes,
        }),
        Inbound::Event(Event::Error(info)) => Err(info.into()),
        other => Err(unexpected("restored", &other)),
    }
}

impl Client {
    /// Tells an agent whose VM was just restored from a snapshot to mix `entropy` into the
    /// guest kernel's RNG and reseed it, step the guest clock to `time`, and start every later
    /// exec from `env` (under the exec's own `env`). Send it before anything else runs.
    pub fn restored(
        &self,
        entropy: &[u8],
        time: SystemTime,
        env: BTreeMap<String, String>,
    ) -> Result<Restored, Error> {
        match self.call(Request::Restored(RestoreSpec::new(entropy, time, env)))? {
            Event::Restored {
                clock_step_ns,
                entropy_bytes,
            } => Ok(Restored {
                clock_step_ns,
                entropy_bytes,
            }),
            other => Err(Error::Protocol(format!("restored answered with {other:?}"))),
        }
    }

    /// [`Client::restored`] with [`RESTORE_ENTROPY`] fresh bytes from the host and the host's
    /// current time.
    pub fn restored_now(&self, env: BTreeMap<String, String>) -> Result<Restored, Error> {
        let entropy = host_entropy(RESTORE_ENTROPY).map_err(|source| Error::Local {
            what: format!("reading {RESTORE_ENTROPY} bytes of host entropy"),
            source,
        })?;
        self.restored(&entropy, SystemTime::now(), env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_entropy_is_fresh() {
        let a = host_entropy(RESTORE_ENTROPY).unwrap();
        let b = host_entropy(RESTORE_ENTROPY).unwrap();
        assert_eq!(a.len(), RESTORE_ENTROPY);
        assert_ne!(a, b);
    }
}
