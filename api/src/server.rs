//! The API socket: [`ApiServer::bind`] creates it, [`ApiServer::serve`] answers requests on it,
//! one at a time, through the VMM's handler.
//!
//! Each connection gets a small thread that reads and parses its requests, so a slow or idle
//! keep-alive client never blocks another; only parsed requests reach the handler, which runs on
//! the thread that called `serve`, strictly one request after another as in Firecracker. The
//! socket file is the caller's: it is never removed here, neither before binding nor after.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use crate::http::{HttpError, RequestReader, write_response};
use crate::{ApiError, ApiRequest, ApiResponse, parse_request};

/// How long a client that stops reading may hold up the writing of an answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A bound, listening API socket.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    unwritten: Unwritten,
}

/// Counts answers the handler gave that are not yet written to their connections, so a VMM that
/// is about to exit can let the last ones (an action that ended the VM, say) reach their clients.
#[derive(Clone, Debug, Default)]
pub struct Unwritten(Arc<(Mutex<usize>, Condvar)>);

impl Unwritten {
    fn add(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn done(&self) {
        let mut n = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.1.notify_all();
        }
    }

    /// Waits until every answer was written or `timeout` passed; true if none is left.
    pub fn wait_written(&self, timeout: std::time::Duration) -> bool {
        let n = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        let (n, _) = self
            .0
            .1
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }
}

/// A parsed request on its way to the handler, with where its answer goes.
type Job = (ApiRequest, Sender<ApiResponse>);

impl ApiServer {
    /// Creates the socket at `path` and starts listening: clients can connect as soon as this
    /// returns. Refuses a path where anything already exists rather than removing it.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ApiError> {
        let path = path.as_ref().to_path_buf();
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::SocketExists(path));
        }
        match UnixListener::bind(&path) {
            Ok(listener) => Ok(Self {
                listener,
                path,
                unwritten: Unwritten::default(),
            }),
            // Something appeared between the check and the bind.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ApiError::SocketExists(path)),
            Err(source) => Err(ApiError::Bind { path, source }),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle on the answers not yet written (see [`Unwritten`]).
    pub fn unwritten(&self) -> Unwritten {
        self.unwritten.clone()
    }

    /// Answers requests until the process ends, calling `handler` for each request that
    /// parsed, one at a time on this thread; malformed requests and bad bodies are answered
    /// 400 without reaching it. Returns only if the accept thread cannot be started.
    pub fn serve(self, mut handler: impl FnMut(ApiRequest) -> ApiResponse) -> Result<(), ApiError> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (listener, unwritten) = (self.listener, self.unwritten);
        thread::Builder::new()
            .name("kiln-api-accept".into())
            .spawn(move || accept_loop(listener, jobs, unwritten))
            .map_err(ApiError::Thread)?;
        // The accept thread never ends, so neither does this loop.
        for (request, reply) in job_rx {
            let response = handler(request);
            // The connection may have gone meanwhile; its thread has then nothing to write.
            let _ = reply.send(response);
        }
        Ok(())
    }
}

fn accept_loop(listener: UnixListener, jobs: Sender<Job>, unwritten: Unwritten) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let (jobs, unwritten) = (jobs.clone(), unwritten.clone());
                let spawned = thread::Builder::new()
                    .name("kiln-api-conn".into())
                    .spawn(move || serve_connection(stream, jobs, unwritten));
                if let Err(e) = spawned {
                    log::warn!("API connection dropped: cannot start its thread: {e}");
                }
            }
            Err(e) => {
                log::warn!("API socket accept failed, retrying: {e}");
                thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

/// Reads, answers and repeats until the client closes, asks to close, or sends something that
/// is not HTTP (after which the next request's start cannot be found, so the connection ends).
fn serve_connection(mut stream: UnixStream, jobs: Sender<Job>, unwritten: Unwritten) {
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("API connection: cannot set a write timeout: {e}");
    }
    let mut reader = RequestReader::new();
    loop {
        let mut counted = false;
        let (response, keep_alive) = match reader.read_request(&mut stream) {
            Ok(None) => return,
            Ok(Some(request)) => {
                let response = match parse_request(&request.method, &request.target, &request.body)
                {
                    Ok(api_request) => {
                        unwritten.add();
                        counted = true;
                        dispatch(&jobs, api_request)
                    }
                    Err(e) => {
                        log::debug!(
                            "API request {} {} refused: {e}",
                            request.method,
                            request.target
                        );
                        e.into()
                    }
                };
                (response, request.keep_alive)
            }
            Err(HttpError::Io(e)) => {
                log::debug!("API connection read failed: {e}");
                return;
            }
            Err(e) => {
                log::debug!("API connection: {e}");
                (ApiResponse::fault(e), false)
            }
        };
        let written = write_response(&mut stream, &response, keep_alive);
        if counted {
            unwritten.done();
        }
        if let Err(e) = written {
            log::debug!("API connection write failed: {e}");
            return;
        }
        if !keep_alive {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// Hands a request to the handler's thread and waits for its answer.
fn dispatch(jobs: &Sender<Job>, request: ApiRequest) -> ApiResponse {
    let (reply, answer) = mpsc::channel();
    if jobs.send((request, reply)).is_err() {
        return ApiResponse::fault("the VMM no longer serves API requests");
    }
    answer
        .recv()
        .unwrap_or_else(|_| ApiResponse::fault("the VMM stopped before answering"))
}
