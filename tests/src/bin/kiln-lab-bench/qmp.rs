//! A small QMP client, for driving the QEMU peer the way the Kiln side is driven over its API:
//! stop, migrate guest state to a file (QEMU's snapshot), quit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server,nowait` socket, retrying until `deadline`, and
    /// leaves capability negotiation.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP greeting expected, got {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QEMU closed its QMP socket".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}"))
    }

    /// Runs one command; its `return` value, or its error as a message. Events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }

    /// Migrates to `uri` and waits for it to complete.
    pub fn migrate(&mut self, uri: &str) -> Result<(), String> {
        self.execute("migrate", json!({ "uri": uri }))?;
        let start = Instant::now();
        loop {
            let status = self.execute("query-migrate", json!({}))?;
            match status["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    return Err(format!("QEMU's migration to {uri} failed: {status}"));
                }
                _ if start.elapsed() > Duration::from_secs(300) => {
                    return Err(format!(
                        "QEMU's migration to {uri} did not finish: {status}"
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
