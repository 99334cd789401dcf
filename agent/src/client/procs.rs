//! Revision 2's process requests: follow a running process again ([`Client::attach`]), list them,
//! signal them, write and close their stdin from any connection, and resolve guest users. A host
//! checks [`Client::revision`] first: an older agent answers these with `unknown_request`.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::conn::Inbound;
use super::exec::Exec;
use super::{Client, Error, unexpected};
use crate::link::Credit;
use crate::protocol::{Event, MAX_CHUNK, ProcessInfo, Request, Selector, Stream, UserInfo};

impl Client {
    /// The agent's protocol revision, from its hello (0 for agents older than revision 2).
    pub fn revision(&self) -> u32 {
        self.conn.revision.load(Ordering::Relaxed)
    }

    /// Follows the running process `process` (one started with `keep`, typically, on any
    /// connection): its output from the first byte no follower was given yet, then its exit.
    /// Dropping the returned [`Exec`] only stops following.
    pub fn attach(&self, process: Selector) -> Result<Exec, Error> {
        let req = self.conn.start_request(Request::Attach { process })?;
        Exec::started(req, false, None)
    }

    /// The running processes.
    pub fn processes(&self) -> Result<Vec<ProcessInfo>, Error> {
        match self.call(Request::Processes)? {
            Event::Processes { processes } => Ok(processes),
            other => Err(Error::Protocol(format!(
                "processes answered with {other:?}"
            ))),
        }
    }

    /// Sends `signal` to the process group of `process`.
    pub fn signal_process(&self, process: Selector, signal: i32) -> Result<(), Error> {
        self.call(Request::SignalProcess { process, signal })
            .map(drop)
    }

    /// Closes the stdin of `process` (a ^D on a terminal).
    pub fn close_stdin(&self, process: Selector) -> Result<(), Error> {
        self.call(Request::CloseStdin { process }).map(drop)
    }

    /// Writes everything `data` yields to the stdin of `process`; returns the bytes written.
    pub fn write_stdin(&self, process: Selector, mut data: impl Read) -> Result<u64, Error> {
        let mut req = self.conn.start_request(Request::WriteStdin { process })?;
        let sender = req.sender();
        let mut buf = vec![0u8; MAX_CHUNK];
        // Stops early when the agent ends the request (it failed): its error follows. A process
        // that takes none of it within the reply timeout fails the write, as a silent agent does.
        loop {
            let idle = Instant::now() + self.reply_timeout;
            let credit = match sender.wait_credit_until(Stream::Stdin, idle) {
                Credit::Granted(credit) => credit,
                Credit::Closed => break,
                Credit::TimedOut => {
                    req.abandon();
                    return Err(Error::Timeout(self.reply_timeout));
                }
            };
            let n = match data.read(&mut buf[..credit]) {
                Ok(0) => {
                    sender.eof(Stream::Stdin);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    req.abandon();
                    return Err(Error::Local {
                        what: "reading the data for stdin".into(),
                        source,
                    });
                }
            };
            let mut sent = 0;
            while sent < n {
                match sender.send(Stream::Stdin, &buf[sent..n]) {
                    Some(k) => sent += k,
                    None => break,
                }
            }
        }
        match self.recv_idle(&mut req)? {
            Inbound::Event(Event::Done { bytes }) => Ok(bytes.unwrap_or(0)),
            Inbound::Event(Event::Error(info)) => Err(info.into()),
            other => Err(unexpected("write_stdin", &other)),
        }
    }

    /// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`) against the guest's files.
    pub fn resolve_user(&self, user: &str) -> Result<UserInfo, Error> {
        match self.call(Request::ResolveUser {
            user: user.to_string(),
        })? {
            Event::User { user } => Ok(user),
            other => Err(Error::Protocol(format!(
                "resolve_user answered with {other:?}"
            ))),
        }
    }
}
