//! Port forwarding over vsock ([`FORWARD_PORT`]): how a published port reaches a server in a VM
//! that has no network interface. The host connects, writes `FORWARD <port>\n`; the agent
//! connects to `127.0.0.1:<port>` in the guest, answers `OK\n` and relays bytes both ways until
//! both sides are done, or answers `ERR <reason>\n` and closes. Each connection has two threads,
//! one a direction; a half-close on one side is passed on to the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use super::log;
use crate::link::Socket;
use crate::protocol::FORWARD_PORT;

/// The longest `FORWARD <port>\n` line read.
const LINE_MAX: usize = 32;
/// How long the host may take to send its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to the guest's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the request line byte by byte (nothing past the newline may be consumed: it belongs to
/// the relayed stream).
fn read_line(sock: &Socket) -> io::Result<String> {
    sock.set_read_timeout(Some(LINE_TIMEOUT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*sock).read(&mut byte)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => break,
            _ if line.len() == LINE_MAX => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            _ => line.push(byte[0]),
        }
    }
    sock.set_read_timeout(None)?;
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// The port in a `FORWARD <port>` line.
pub fn parse_request(line: &str) -> Result<u16, String> {
    let port = line
        .strip_prefix("FORWARD ")
        .ok_or_else(|| format!("expected FORWARD <port>, got {line:?}"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a TCP port"))
}

/// Serves one forwarding connection.
pub fn serve(sock: Socket) {
    let port = match read_line(&sock)
        .map_err(|e| e.to_string())
        .and_then(|l| parse_request(&l))
    {
        Ok(port) => port,
        Err(why) => {
            let _ = (&sock).write_all(format!("ERR {why}\n").as_bytes());
            return;
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            let _ = (&sock).write_all(format!("ERR connecting to {addr}: {e}\n").as_bytes());
            return;
        }
    };
    if (&sock).write_all(b"OK\n").is_err() {
        return;
    }
    let _ = tcp.set_nodelay(true);
    let (Ok(sock2), Ok(tcp2)) = (sock.try_clone(), tcp.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        relay(&sock2, &tcp2);
        let _ = tcp2.shutdown(Shutdown::Write);
    });
    relay(&tcp, &sock);
    half_close(&sock);
    let _ = up.join();
}

/// Copies `from` to `to` until `from` ends or either fails.
fn relay(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn half_close(sock: &Socket) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a descriptor we own.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
}

/// Accepts forwarding connections on vsock [`FORWARD_PORT`] forever, a thread each.
pub fn accept_loop(listener: super::listen::Listener) {
    loop {
        match listener.accept() {
            Ok(sock) => {
                if let Err(e) = thread::Builder::new()
                    .name("forward".into())
                    .spawn(move || serve(sock))
                {
                    log(format_args!("cannot start a forwarding thread: {e}"));
                }
            }
            Err(e) => {
                log(format_args!("accept on vsock port {FORWARD_PORT}: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn request_lines_are_checked() {
        assert_eq!(parse_request("FORWARD 8080"), Ok(8080));
        assert!(
            parse_request("FORWARD 0")
                .unwrap_err()
                .contains("not a TCP port")
        );
        assert!(parse_request("FORWARD 70000").is_err());
        assert!(
            parse_request("CONNECT 80")
                .unwrap_err()
                .starts_with("expected FORWARD")
        );
    }

    fn pair() -> (Socket, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Socket::from_fd(a.into()), b)
    }

    #[test]
    fn bytes_are_relayed_both_ways_to_a_local_port() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(&got).unwrap();
            c.write_all(b"!").unwrap();
        });
        let (sock, mut host) = pair();
        let agent = thread::spawn(move || serve(sock));
        host.write_all(format!("FORWARD {port}\nhello over vsock").as_bytes())
            .unwrap();
        let mut ok = [0u8; 3];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK\n");
        host.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello over vsock!");
        echo.join().unwrap();
        agent.join().unwrap();
    }

    #[test]
    fn a_closed_port_is_an_err_line() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (sock, mut host) = pair();
        let agent = thread::spawn(move || serve(sock));
        host.write_all(format!("FORWARD {port}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        host.read_to_string(&mut line).unwrap();
        assert!(
            line.starts_with(&format!("ERR connecting to 127.0.0.1:{port}: ")),
            "{line}"
        );
        agent.join().unwrap();
    }
}
