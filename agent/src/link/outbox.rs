//! The sending side of a connection: one writer thread drains a queue of encoded frames into the
//! socket. Everyone else only enqueues, which never blocks. The queue stays bounded because data
//! frames are only enqueued against flow-control credit, and every other frame answers something
//! the peer sent.

use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use super::Socket;
use crate::protocol::Message;

enum Item {
    Frame(Vec<u8>),
    Barrier(Sender<()>),
}

/// A handle for queueing frames on a connection. Cloning it is cheap; the writer thread ends
/// when every handle is gone (after writing what was queued) or when a write fails.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<Item>,
}

impl Outbox {
    /// Starts the writer thread on `socket`. When a write fails, the socket is shut down so the
    /// connection's reader notices too.
    pub fn start(socket: Socket, name: &str) -> std::io::Result<Outbox> {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || write_loop(&socket, rx))?;
        Ok(Outbox { tx })
    }

    /// Queues an encoded frame. False when the connection is gone.
    pub fn send_bytes(&self, frame: Vec<u8>) -> bool {
        self.tx.send(Item::Frame(frame)).is_ok()
    }

    /// Queues a message. False when the connection is gone.
    pub fn send(&self, message: &Message) -> bool {
        self.send_bytes(message.encode())
    }

    /// Waits (up to `timeout`) until everything queued before this call was written to the
    /// socket. False if that did not happen.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Item::Barrier(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

fn write_loop(socket: &Socket, rx: Receiver<Item>) {
    let mut w = BufWriter::with_capacity(128 * 1024, socket);
    let write = |w: &mut BufWriter<&Socket>, item: Item| -> std::io::Result<()> {
        match item {
            Item::Frame(bytes) => w.write_all(&bytes),
            Item::Barrier(done) => {
                w.flush()?;
                let _ = done.send(());
                Ok(())
            }
        }
    };
    while let Ok(item) = rx.recv() {
        let mut result = write(&mut w, item);
        // Batch whatever else is already queued into the same flush.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(item) => result = write(&mut w, item),
                Err(_) => break,
            }
        }
        if result.and_then(|()| w.flush()).is_err() {
            socket.shutdown();
            return;
        }
    }
}
