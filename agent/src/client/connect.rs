//! Getting a connected, handshaken [`Client`]: directly on a Unix socket, or through the Unix
//! socket that Firecracker-style VMMs (Kiln's included) expose for a guest's vsock, where the
//! host writes `CONNECT <port>\n` and reads `OK <host port>\n` before the stream is the guest's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::conn::{Conn, Req};
use super::{Client, Error};
use crate::link::Socket;
use crate::protocol::{AGENT_PORT, Event, Hello, Message, PROTOCOL_VERSION, Request, read_frame};

/// How long connecting and the hello exchange may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a forward retries a vsock socket or forwarding service that is not there yet.
const FORWARD_RETRY: Duration = Duration::from_millis(50);

/// The longest `OK <port>` line accepted.
const MAX_CONNECT_REPLY: usize = 64;

/// Connects to an agent listening on the Unix socket `path` (e.g. `kiln-agent --listen
/// unix:PATH` on the host).
pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client, Error> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.into(),
        source,
    })?;
    from_socket(Socket::from_fd(stream.into()), HANDSHAKE_TIMEOUT)
}

/// Connects to guest vsock `port` through the VMM's vsock Unix socket `uds`.
pub fn connect_vsock(uds: impl AsRef<Path>, port: u32) -> Result<Client, Error> {
    connect_vsock_within(uds.as_ref(), port, HANDSHAKE_TIMEOUT)
}

fn connect_vsock_within(uds: &Path, port: u32, timeout: Duration) -> Result<Client, Error> {
    let socket = open_vsock(uds, port, timeout, &[])?;
    from_socket(socket, timeout)
}

/// Connects to the VMM's vsock socket `uds`, writes `CONNECT <port>\n` followed by `then` in one
/// write (the VMM holds what follows the line until the guest accepts), and reads the `OK` line.
fn open_vsock(uds: &Path, port: u32, timeout: Duration, then: &[u8]) -> Result<Socket, Error> {
    let stream = UnixStream::connect(uds).map_err(|source| Error::Connect {
        path: uds.into(),
        source,
    })?;
    let socket = Socket::from_fd(stream.into());
    let local = |what: &str| {
        let what = format!("{what} {}", uds.display());
        move |source| Error::Local { what, source }
    };
    socket
        .set_read_timeout(Some(timeout))
        .map_err(local("setting a timeout on"))?;
    let mut out = format!("CONNECT {port}\n").into_bytes();
    out.extend_from_slice(then);
    (&socket)
        .write_all(&out)
        .map_err(local("writing CONNECT to"))?;
    // Byte by byte: whatever follows the newline already belongs to the agent.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < MAX_CONNECT_REPLY {
        match (&socket).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => reply.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if reply.is_empty() => return Err(local("reading the CONNECT answer from")(e)),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|p| p.trim().parse::<u32>().is_ok());
    if !ok || byte[0] != b'\n' {
        return Err(Error::ConnectRefused {
            path: uds.into(),
            port,
            reply: text,
        });
    }
    Ok(socket)
}

/// Connects to the TCP port `guest_port` inside the guest through the agent's forwarding service
/// (vsock port [`crate::protocol::FORWARD_PORT`]) behind the VMM's vsock socket `uds`: the stream
/// returned carries the guest connection's bytes. For published ports of a VM without a network
/// interface. Within `timeout` it waits for a VM that has just started to have its vsock socket
/// and the agent's forwarding service; a guest port nobody listens on is refused at once.
pub fn forward(
    uds: impl AsRef<Path>,
    guest_port: u16,
    timeout: Duration,
) -> Result<UnixStream, Error> {
    let uds = uds.as_ref();
    let deadline = Instant::now() + timeout;
    // A VM that has just started may not have its vsock socket or the agent's forwarding service
    // yet: those are retried until the deadline (the guest port refusing is not).
    let socket = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let tried = open_vsock(
            uds,
            crate::protocol::FORWARD_PORT,
            left.max(Duration::from_millis(1)),
            format!("FORWARD {guest_port}\n").as_bytes(),
        );
        match tried {
            Ok(s) => break s,
            Err(Error::Connect { .. } | Error::ConnectRefused { .. })
                if Instant::now() + FORWARD_RETRY < deadline =>
            {
                thread::sleep(FORWARD_RETRY);
            }
            Err(e) => return Err(e),
        }
    };
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < 256 {
        match (&socket).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => reply.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Local {
                    what: format!("reading the FORWARD answer from {}", uds.display()),
                    source: e,
                });
            }
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    if text != "OK" {
        return Err(Error::ConnectRefused {
            path: uds.into(),
            port: u32::from(guest_port),
            reply: text,
        });
    }
    socket
        .set_read_timeout(None)
        .map_err(|source| Error::Local {
            what: format!("clearing the timeout on {}", uds.display()),
            source,
        })?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

fn our_hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        software: format!("kiln-agent client {}", env!("CARGO_PKG_VERSION")),
        revision: crate::protocol::PROTOCOL_REVISION,
    })
}

/// Says hello on an already connected socket and starts the client.
pub fn from_socket(socket: Socket, timeout: Duration) -> Result<Client, Error> {
    let closed = |e: std::io::Error| Error::Closed(format!("during the hello: {e}"));
    socket.set_read_timeout(Some(timeout)).map_err(closed)?;
    (&socket).write_all(&our_hello().encode()).map_err(closed)?;
    let revision = read_hello(&socket, timeout)?;
    let conn = Conn::start(socket)?;
    conn.revision.store(revision, Ordering::Relaxed);
    Ok(Client::new(conn))
}

/// Reads the agent's hello (within the socket's read timeout) and clears the timeout; returns the
/// agent's protocol revision.
fn read_hello(socket: &Socket, timeout: Duration) -> Result<u32, Error> {
    let closed = |e: std::io::Error| Error::Closed(format!("during the hello: {e}"));
    let raw = match read_frame(&mut &*socket) {
        Ok(Some(raw)) => raw,
        Ok(None) => {
            return Err(Error::Closed(
                "the agent closed the connection before its hello".into(),
            ));
        }
        Err(crate::protocol::FrameError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(Error::Timeout(timeout));
        }
        Err(e) => return Err(Error::Protocol(format!("reading the agent's hello: {e}"))),
    };
    let revision = match Message::decode(raw) {
        Ok(Message::Hello(h)) if h.version == PROTOCOL_VERSION => h.revision,
        Ok(Message::Hello(h)) => {
            return Err(Error::VersionMismatch {
                host: PROTOCOL_VERSION,
                agent: h.version,
            });
        }
        Ok(Message::Event(0, Event::Error(info))) => return Err(info.into()),
        Ok(other) => {
            return Err(Error::Protocol(format!(
                "expected the agent's hello, got {other:?}"
            )));
        }
        Err(e) => return Err(Error::Protocol(format!("the agent's hello: {e}"))),
    };
    socket.set_read_timeout(None).map_err(closed)?;
    Ok(revision)
}

/// Connects to the agent through vsock socket `uds` and sends `requests` (ids 1, 2, ...) in the
/// same write as `CONNECT` and the hello: they reach the agent without waiting for a round trip,
/// and the agent takes them in order after its hello. Retries while the agent is not there yet
/// (until `deadline`); once its hello arrived the requests may have run, so an error after that
/// is returned, never retried. Returns the client and each request's handle.
pub(crate) fn connect_pipelined(
    uds: &Path,
    deadline: Instant,
    requests: Vec<Request>,
) -> Result<(Client, Vec<Req>), Error> {
    let mut frames = our_hello().encode();
    for (id, request) in (1u64..).zip(requests.iter()) {
        frames.extend_from_slice(&Message::Request(id, request.clone()).encode());
    }
    let start = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_secs(1), HANDSHAKE_TIMEOUT);
        let attempt = open_vsock(uds, AGENT_PORT, timeout, &frames)
            .and_then(|socket| read_hello(&socket, timeout).map(|r| (socket, r)));
        let last = match attempt {
            Ok((socket, revision)) => {
                let (conn, reqs) = Conn::start_with_sent(socket, requests.len() as u64)?;
                conn.revision.store(revision, Ordering::Relaxed);
                return Ok((Client::new(conn), reqs));
            }
            Err(e @ Error::VersionMismatch { .. }) => return Err(e),
            Err(e) => e,
        };
        if Instant::now() + Duration::from_millis(10) >= deadline {
            return Err(Error::NotReady {
                path: uds.into(),
                waited: start.elapsed(),
                last: Box::new(last),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Connects to the agent on [`AGENT_PORT`] through vsock socket `uds`, retrying until it
/// answers or `deadline` passes: the VM may still be booting, the socket may not exist yet.
/// A version mismatch is final and returned at once.
pub fn wait_ready(uds: impl AsRef<Path>, deadline: Instant) -> Result<Client, Error> {
    let uds = uds.as_ref();
    let start = Instant::now();
    loop {
        // An attempt that got through gets at least a second for the answers, even past the
        // deadline: a slow first hello must not turn into an endless retry.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = connect_vsock_within(
            uds,
            AGENT_PORT,
            left.clamp(Duration::from_secs(1), HANDSHAKE_TIMEOUT),
        );
        let last = match attempt {
            Ok(client) => return Ok(client),
            Err(e @ Error::VersionMismatch { .. }) => return Err(e),
            Err(e) => e,
        };
        if Instant::now() + Duration::from_millis(10) >= deadline {
            return Err(Error::NotReady {
                path: uds.into(),
                waited: start.elapsed(),
                last: Box::new(last),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// Reads one `\n`-ended line from `s`.
    fn line(s: &mut UnixStream) -> String {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    }

    #[test]
    fn a_forward_waits_for_a_vm_that_is_still_starting() {
        let dir = std::env::temp_dir().join(format!("kiln-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let path = uds.clone();
        let vmm = thread::spawn(move || {
            // No socket at first, then a VMM whose guest has no agent listening yet (the
            // connection is closed), then the agent, which refuses port 1 and forwards port 2.
            thread::sleep(Duration::from_millis(200));
            let l = UnixListener::bind(&path).unwrap();
            let (mut c, _) = l.accept().unwrap();
            assert_eq!(
                line(&mut c),
                format!("CONNECT {}\n", crate::protocol::FORWARD_PORT)
            );
            drop(c);
            let mut seen = Vec::new();
            for answer in [
                "OK 7\nno one listens on port 1\n",
                "OK 8\nOK\nfrom the guest",
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let (mut a, mut b) = (String::new(), String::new());
                r.read_line(&mut a).unwrap();
                r.read_line(&mut b).unwrap();
                seen.push(b);
                c.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        // Port 1's refusal comes from the guest, not from a VM still starting: not retried.
        let e = forward(&uds, 1, Duration::from_secs(30)).unwrap_err();
        assert!(
            matches!(&e, Error::ConnectRefused { reply, .. } if reply == "no one listens on port 1"),
            "{e}"
        );
        let mut got = String::new();
        forward(&uds, 2, Duration::from_secs(30))
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "from the guest");
        assert_eq!(vmm.join().unwrap(), ["FORWARD 1\n", "FORWARD 2\n"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
