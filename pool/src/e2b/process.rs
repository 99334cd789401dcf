//! envd's `process.Process` service over the agent. Every process starts with the agent's `keep`,
//! as envd's outlive their stream: a client that stops reading (or whose deadline passes) only
//! stops following; the process stays listed, can be connected to again by pid or tag, written
//! to and killed. kilnd's side of an abandoned stream ends within a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use kiln_agent::client::{Exec, ExecOutput};
use kiln_agent::protocol::{ExecSpec, ExitStatus, Selector, TtySize};
use tokio::sync::mpsc;

use super::connect::{
    Code, Codec, ConnectError, EnvelopeReader, Msg, StreamItem, check_encoding,
    read_stream_request, read_unary, stream_error, stream_response, timeout,
};
use super::envd::{Envd, agent_error};
use super::proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, process_event, process_input, process_selector,
    stream_input_request,
};
use super::state::E2b;

/// How often a follower with nothing to send checks whether its client is still there.
const POLL: Duration = Duration::from_secs(1);

/// `POST /process.Process/{method}`.
pub async fn call(
    State(e2b): State<Arc<E2b>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let streaming = matches!(method.as_str(), "Start" | "Connect" | "StreamInput");
    let codec = match Codec::of(&headers, streaming) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if let Err(e) = check_encoding(&headers, streaming) {
        return e.into_response();
    }
    let envd = match Envd::from_request(&e2b, &headers, None).await {
        Ok(envd) => envd,
        Err(refusal) => return refusal.into_response(),
    };
    let result = match method.as_str() {
        "Start" => return start(e2b, envd, &headers, body, codec).await,
        "Connect" => return connect(e2b, envd, &headers, body, codec).await,
        "StreamInput" => return stream_input(envd, body, codec).await,
        "List" => list(envd, body, codec).await,
        "SendInput" => send_input(envd, body, codec).await,
        "SendSignal" => send_signal(envd, body, codec).await,
        "CloseStdin" => close_stdin(envd, body, codec).await,
        "Update" => Err(ConnectError::new(
            Code::Unimplemented,
            "process.Process/Update (resizing a terminal from another call) is not served by kilnd",
        )),
        other => Err(ConnectError::new(
            Code::Unimplemented,
            format!("process.Process/{other} is not a method kilnd serves"),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Runs a blocking agent call on tokio's blocking threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConnectError::new(Code::Internal, format!("a worker task failed: {e}")))?
}

fn selector(sel: Option<ProcessSelector>) -> Result<Selector, ConnectError> {
    match sel.and_then(|s| s.selector) {
        Some(process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(pid)),
        Some(process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag)),
        None => Err(ConnectError::new(
            Code::InvalidArgument,
            "process: give a pid or a tag",
        )),
    }
}

fn event(e: process_event::Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGPIPE => "broken pipe".into(),
        s => format!("signal {s}"),
    }
}

/// envd's end event: the code, whether it exited, and Go's wording of how it ended.
fn end_event(status: ExitStatus) -> process_event::EndEvent {
    let (exit_code, exited, status) = match status {
        ExitStatus::Exited(c) => (c, true, format!("exit status {c}")),
        ExitStatus::Signaled(s) => (-1, false, format!("signal: {}", signal_name(s))),
        ExitStatus::TimedOut => (-1, false, "signal: killed".into()),
    };
    process_event::EndEvent {
        exit_code,
        exited,
        status,
        error: None,
    }
}

/// Follows `exec` into `tx` until it ends, the client goes away (the body, and so the
/// receiver, dropped) or `deadline` passes; sends a keepalive after `keepalive` of silence.
fn follow<M: Msg>(
    mut exec: Exec,
    tty: bool,
    tx: mpsc::Sender<StreamItem<M>>,
    wrap: fn(ProcessEvent) -> M,
    deadline: Option<Instant>,
    keepalive: Option<Duration>,
) {
    let pid = exec.pid();
    let send = |m: M| tx.blocking_send(Ok(m)).is_ok();
    if !send(wrap(event(process_event::Event::Start(
        process_event::StartEvent { pid },
    )))) {
        exec.detach();
        return;
    }
    let mut last_sent = Instant::now();
    loop {
        let mut until = Instant::now() + POLL;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let data = |d| {
            event(process_event::Event::Data(process_event::DataEvent {
                output: Some(d),
            }))
        };
        use process_event::data_event::Output;
        let msg = match exec.next_output_until(until) {
            Ok(Some(ExecOutput::Stdout(b))) if tty => data(Output::Pty(b)),
            Ok(Some(ExecOutput::Stdout(b))) => data(Output::Stdout(b)),
            Ok(Some(ExecOutput::Stderr(b))) => data(Output::Stderr(b)),
            Ok(Some(ExecOutput::Exit(status))) => {
                send(wrap(event(process_event::Event::End(end_event(status)))));
                return;
            }
            Ok(None) => return,
            Err(kiln_agent::client::Error::Timeout(_)) => {
                if tx.is_closed() {
                    exec.detach();
                    return;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    let _ = tx.blocking_send(Err(ConnectError::new(
                        Code::DeadlineExceeded,
                        format!("the call's deadline passed; process {pid} runs on"),
                    )));
                    exec.detach();
                    return;
                }
                if keepalive.is_some_and(|k| last_sent.elapsed() >= k) {
                    event(process_event::Event::Keepalive(process_event::KeepAlive {}))
                } else {
                    continue;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(agent_error(e)));
                return;
            }
        };
        if !send(wrap(msg)) {
            exec.detach();
            return;
        }
        last_sent = Instant::now();
    }
}

/// The keepalive interval the SDK asks for (`Keepalive-Ping-Interval`, seconds).
fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// Starts following in the background and answers with the stream.
fn stream_out<M: Msg>(
    e2b: &Arc<E2b>,
    codec: Codec,
    headers: &HeaderMap,
    tty: bool,
    open: impl FnOnce() -> Result<Exec, ConnectError> + Send + 'static,
    wrap: fn(ProcessEvent) -> M,
) -> Response {
    let deadline = match timeout(headers) {
        Ok(t) => t.map(|t| Instant::now() + t),
        Err(e) => return stream_error::<M>(codec, e),
    };
    let keepalive = keepalive(headers);
    let (tx, rx) = mpsc::channel(16);
    let guard = e2b.stream_guard();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        match open() {
            Ok(exec) => follow(exec, tty, tx, wrap, deadline, keepalive),
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    stream_response(codec, rx)
}

async fn start(
    e2b: Arc<E2b>,
    envd: Envd,
    headers: &HeaderMap,
    body: Body,
    codec: Codec,
) -> Response {
    let req: StartRequest = match read_stream_request(body, codec).await {
        Ok(r) => r,
        Err(e) => return stream_error::<StartResponse>(codec, e),
    };
    let spec = match exec_spec(&envd, req) {
        Ok(s) => s,
        Err(e) => return stream_error::<StartResponse>(codec, e),
    };
    let tty = spec.tty.is_some();
    {
        envd.sandbox.live().exec_count += 1;
    }
    let _ = e2b.daemon.save(&envd.sandbox);
    let client = envd.client;
    stream_out(
        &e2b,
        codec,
        headers,
        tty,
        move || client.exec(spec).map_err(agent_error),
        |event| StartResponse { event: Some(event) },
    )
}

/// The agent's exec for a `StartRequest`: the user's home (or the template's working directory)
/// unless the request names a directory, stdin unless the request says not.
fn exec_spec(envd: &Envd, req: StartRequest) -> Result<ExecSpec, ConnectError> {
    let cfg = req
        .process
        .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "process: give the command"))?;
    if cfg.cmd.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process.cmd is empty",
        ));
    }
    let mut spec = ExecSpec::new(std::iter::once(cfg.cmd).chain(cfg.args));
    spec.env = cfg.envs.into_iter().collect::<BTreeMap<_, _>>();
    for k in spec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("process.envs: {k:?} is not a variable name"),
            ));
        }
    }
    spec.cwd = Some(match cfg.cwd.filter(|c| !c.is_empty()) {
        Some(c) => envd.path(&c)?,
        None => envd
            .sandbox
            .spec
            .workdir
            .clone()
            .unwrap_or_else(|| envd.user.home.clone()),
    });
    spec.user = Some(envd.user_spec.clone());
    spec.tty = req.pty.map(|p| {
        let size = p.size.unwrap_or_default();
        TtySize {
            rows: if size.rows == 0 {
                24
            } else {
                size.rows.min(u16::MAX as u32) as u16
            },
            cols: if size.cols == 0 {
                80
            } else {
                size.cols.min(u16::MAX as u32) as u16
            },
        }
    });
    // envd gives a process stdin unless asked not to (older SDKs never asked).
    spec.stdin = req.stdin.unwrap_or(true) || spec.tty.is_some();
    spec.tag = req.tag;
    spec.keep = true;
    Ok(spec)
}

async fn connect(
    e2b: Arc<E2b>,
    envd: Envd,
    headers: &HeaderMap,
    body: Body,
    codec: Codec,
) -> Response {
    let req: ConnectRequest = match read_stream_request(body, codec).await {
        Ok(r) => r,
        Err(e) => return stream_error::<ConnectResponse>(codec, e),
    };
    let sel = match selector(req.process) {
        Ok(s) => s,
        Err(e) => return stream_error::<ConnectResponse>(codec, e),
    };
    // Whether it runs on a terminal decides how its output is labelled.
    let client = envd.client.clone();
    let sel2 = sel.clone();
    let tty = blocking(move || {
        let list = client.processes().map_err(agent_error)?;
        Ok(list
            .iter()
            .any(|p| p.tty && matches_sel(&sel2, p.pid, p.tag.as_deref())))
    })
    .await
    .unwrap_or(false);
    let client = envd.client;
    stream_out(
        &e2b,
        codec,
        headers,
        tty,
        move || client.attach(sel).map_err(agent_error),
        |event| ConnectResponse { event: Some(event) },
    )
}

fn matches_sel(sel: &Selector, pid: u32, tag: Option<&str>) -> bool {
    match sel {
        Selector::Pid(p) => *p == pid,
        Selector::Tag(t) => tag == Some(t.as_str()),
    }
}

async fn list(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let _: ListRequest = read_unary(body, codec).await?;
    let client = envd.client;
    let processes = blocking(move || client.processes().map_err(agent_error)).await?;
    let processes = processes
        .into_iter()
        .map(|p| {
            let mut argv = p.argv.into_iter();
            ProcessInfo {
                config: Some(ProcessConfig {
                    cmd: argv.next().unwrap_or_default(),
                    args: argv.collect(),
                    envs: p.env.into_iter().collect(),
                    cwd: p.cwd,
                }),
                pid: p.pid,
                tag: p.tag,
            }
        })
        .collect();
    Ok(codec.unary(&ListResponse { processes }))
}

fn input_bytes(
    input: Option<super::proto::process::ProcessInput>,
) -> Result<Vec<u8>, ConnectError> {
    match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(b)) | Some(process_input::Input::Pty(b)) => Ok(b),
        None => Err(ConnectError::new(
            Code::InvalidArgument,
            "input: give stdin or pty bytes",
        )),
    }
}

async fn send_input(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: SendInputRequest = read_unary(body, codec).await?;
    let sel = selector(req.process)?;
    let bytes = input_bytes(req.input)?;
    let client = envd.client;
    blocking(move || client.write_stdin(sel, &bytes[..]).map_err(agent_error)).await?;
    Ok(codec.unary(&SendInputResponse {}))
}

async fn send_signal(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: SendSignalRequest = read_unary(body, codec).await?;
    let sel = selector(req.process)?;
    let signal = match Signal::try_from(req.signal) {
        Ok(Signal::Sigkill) => libc::SIGKILL,
        Ok(Signal::Sigterm) => libc::SIGTERM,
        _ => {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("signal {} is not SIGKILL or SIGTERM", req.signal),
            ));
        }
    };
    let client = envd.client;
    blocking(move || client.signal_process(sel, signal).map_err(agent_error)).await?;
    Ok(codec.unary(&SendSignalResponse {}))
}

async fn close_stdin(envd: Envd, body: Body, codec: Codec) -> Result<Response, ConnectError> {
    let req: CloseStdinRequest = read_unary(body, codec).await?;
    let sel = selector(req.process)?;
    let client = envd.client;
    blocking(move || client.close_stdin(sel).map_err(agent_error)).await?;
    Ok(codec.unary(&CloseStdinResponse {}))
}

/// `StreamInput`: a start naming the process, then its input in order.
async fn stream_input(envd: Envd, body: Body, codec: Codec) -> Response {
    let (tx, rx) = mpsc::channel::<StreamItem<StreamInputResponse>>(1);
    let mut reader = EnvelopeReader::new(body, codec);
    let result = async {
        let mut sel = None;
        while let Some(req) = reader.next::<StreamInputRequest>().await? {
            match req.event {
                Some(stream_input_request::Event::Start(s)) => sel = Some(selector(s.process)?),
                Some(stream_input_request::Event::Data(d)) => {
                    let target = sel.clone().ok_or_else(|| {
                        ConnectError::new(
                            Code::InvalidArgument,
                            "the input stream's first message must be a start naming the process",
                        )
                    })?;
                    let bytes = input_bytes(d.input)?;
                    let client = envd.client.clone();
                    blocking(move || client.write_stdin(target, &bytes[..]).map_err(agent_error))
                        .await?;
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
        Ok::<_, ConnectError>(StreamInputResponse {})
    }
    .await;
    let _ = tx.try_send(result);
    drop(tx);
    stream_response(codec, rx)
}
