//! File transfer and inspection. Transfers stream chunk by chunk against the agent's credit, so
//! memory stays flat whatever the file size. Every wait is bounded by the client's reply timeout
//! from the agent's last sign of life: a transfer may take as long as it needs while the agent
//! keeps answering, and fails with [`Error::Timeout`] once it goes silent.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::conn::{Inbound, Req};
use super::{Client, Error, unexpected};
use crate::link::Credit;
use crate::protocol::{DirEntry, Event, FileStat, MAX_CHUNK, MkdirSpec, Request, Stream};

/// The most entries [`Client::list_dir`] collects.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// How [`Client::write_file`] creates the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits (default: 0o644 for a new file, unchanged for an existing one).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub parents: bool,
    /// Append instead of truncating.
    pub append: bool,
    /// Who owns the file and the directories made for it (`name`, `uid`, `name:group`,
    /// `uid:gid`); the agent's user when `None`. Needs an agent of revision 2.
    pub owner: Option<String>,
}

impl Default for WriteOptions {
    fn default() -> WriteOptions {
        WriteOptions {
            mode: None,
            parents: true,
            append: false,
            owner: None,
        }
    }
}

impl Client {
    /// Writes everything `data` yields to `path` in the guest; returns the bytes written.
    pub fn write_file(
        &self,
        path: &str,
        mut data: impl Read,
        options: WriteOptions,
    ) -> Result<u64, Error> {
        let mut req = self.conn.start_request(Request::WriteFile {
            path: path.to_string(),
            mode: options.mode,
            parents: options.parents,
            append: options.append,
            owner: options.owner.clone(),
        })?;
        let sender = req.sender();
        let mut buf = vec![0u8; MAX_CHUNK];
        // Stops early when the agent ends the request (it failed): its error follows.
        loop {
            let idle = Instant::now() + self.reply_timeout;
            let credit = match sender.wait_credit_until(Stream::File, idle) {
                Credit::Granted(credit) => credit,
                Credit::Closed => break,
                Credit::TimedOut => {
                    req.abandon();
                    return Err(Error::Timeout(self.reply_timeout));
                }
            };
            let n = match data.read(&mut buf[..credit]) {
                Ok(0) => {
                    sender.eof(Stream::File);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    req.abandon();
                    return Err(Error::Local {
                        what: format!("reading the data for {path}"),
                        source,
                    });
                }
            };
            let mut sent = 0;
            while sent < n {
                match sender.send(Stream::File, &buf[sent..n]) {
                    Some(k) => sent += k,
                    None => break,
                }
            }
        }
        match self.recv_idle(&mut req)? {
            Inbound::Event(Event::Done { bytes }) => Ok(bytes.unwrap_or(0)),
            Inbound::Event(Event::Error(info)) => Err(info.into()),
            other => Err(unexpected("write_file", &other)),
        }
    }

    /// Streams the guest file `path` into `out`; returns the bytes read.
    pub fn read_file(&self, path: &str, mut out: impl Write) -> Result<u64, Error> {
        let mut req = self.conn.start_request(Request::ReadFile {
            path: path.to_string(),
        })?;
        let mut bytes = 0u64;
        loop {
            match self.recv_idle(&mut req)? {
                Inbound::Event(Event::Opened { .. }) | Inbound::Eof(Stream::File) => {}
                Inbound::Data(Stream::File, chunk) => {
                    if let Err(source) = out.write_all(&chunk) {
                        req.abandon();
                        return Err(Error::Local {
                            what: format!("writing the contents of {path}"),
                            source,
                        });
                    }
                    bytes += chunk.len() as u64;
                }
                Inbound::Event(Event::Done { .. }) => return Ok(bytes),
                Inbound::Event(Event::Error(info)) => return Err(info.into()),
                other => return Err(unexpected("read_file", &other)),
            }
        }
    }

    /// The next thing the agent sends for `req`, waiting at most the reply timeout.
    pub(super) fn recv_idle(&self, req: &mut Req) -> Result<Inbound, Error> {
        match req.recv(Some(Instant::now() + self.reply_timeout)) {
            Err(Error::Timeout(_)) => {
                req.abandon();
                Err(Error::Timeout(self.reply_timeout))
            }
            other => other,
        }
    }

    /// Lists directory `path` (entries are not followed through symlinks). A directory of more
    /// than [`MAX_LIST_ENTRIES`] entries is an [`Error::TooLarge`], never a silent cut.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, Error> {
        let mut req = self.conn.start_request(Request::ListDir {
            path: path.to_string(),
        })?;
        let mut all = Vec::new();
        loop {
            match self.recv_idle(&mut req)? {
                Inbound::Event(Event::Entries { entries }) => {
                    if all.len() + entries.len() > MAX_LIST_ENTRIES {
                        req.abandon();
                        return Err(Error::TooLarge {
                            what: format!("the listing of {path}"),
                            limit: format!("{MAX_LIST_ENTRIES} entries"),
                        });
                    }
                    all.extend(entries)
                }
                Inbound::Event(Event::Done { .. }) => return Ok(all),
                Inbound::Event(Event::Error(info)) => return Err(info.into()),
                other => return Err(unexpected("list_dir", &other)),
            }
        }
    }

    /// Describes `path`, following symlinks.
    pub fn stat(&self, path: &str) -> Result<FileStat, Error> {
        match self.call(Request::Stat {
            path: path.to_string(),
        })? {
            Event::Stat { stat } => Ok(stat),
            other => Err(Error::Protocol(format!("stat answered with {other:?}"))),
        }
    }

    /// Removes `path`; a non-empty directory only with `recursive`.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        self.call(Request::Remove {
            path: path.to_string(),
            recursive,
        })
        .map(drop)
    }
}

impl Client {
    /// Makes directory `path` (and, per `spec`, its parents). An existing path is
    /// [`ErrorKind::AlreadyExists`](crate::protocol::ErrorKind::AlreadyExists). Revision 2.
    pub fn mkdir(&self, spec: MkdirSpec) -> Result<(), Error> {
        self.call(Request::Mkdir(spec)).map(drop)
    }

    /// Renames `from` to `to`, making `to`'s missing parents. Revision 2.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), Error> {
        self.call(Request::Rename {
            from: from.to_string(),
            to: to.to_string(),
        })
        .map(drop)
    }
}
