//! The request parser and reader on hostile and odd inputs, fed in pieces of every size.

use super::*;

/// A stream that hands out its input `step` bytes per read and records what is written.
struct Mock {
    input: Vec<u8>,
    pos: usize,
    step: usize,
    output: Vec<u8>,
}

impl Mock {
    fn new(input: &[u8], step: usize) -> Self {
        Mock {
            input: input.to_vec(),
            pos: 0,
            step,
            output: Vec::new(),
        }
    }
}

impl Read for Mock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Mock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn head(bytes: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    parse_head(bytes)
}

fn err(bytes: &[u8]) -> String {
    head(bytes).unwrap_err().to_string()
}

#[test]
fn parses_a_put_head() {
    let head_bytes = b"PUT /drives/a HTTP/1.1\r\nHost: localhost\r\ncontent-length: 12\r\n\r\n";
    let h = head(&[&head_bytes[..], b"{"].concat()).unwrap().unwrap();
    assert_eq!(h.method, "PUT");
    assert_eq!(h.target, "/drives/a");
    assert_eq!(h.content_length, 12);
    assert!(h.keep_alive && !h.expect_continue);
    assert_eq!(h.head_len, head_bytes.len());
}

#[test]
fn connection_header_and_version() {
    let h = head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(!h.keep_alive);
    let h = head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
    assert!(!h.keep_alive);
    let h = head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(h.keep_alive);
    assert_eq!(
        err(b"GET / HTTP/2.0\r\n\r\n"),
        r#"unsupported HTTP version "HTTP/2.0""#
    );
}

#[test]
fn incomplete_heads_wait() {
    assert_eq!(head(b"").unwrap(), None);
    assert_eq!(head(b"GET / HTTP/1.1\r\n").unwrap(), None);
    assert_eq!(head(b"GET / HTTP/1.1\r\nHost: x\r\n\r").unwrap(), None);
}

#[test]
fn malformed_heads() {
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET /\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET x HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n",
    ] {
        assert!(
            matches!(head(bad), Err(HttpError::Malformed(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(bad),
            head(bad)
        );
    }
}

#[test]
fn bad_content_lengths() {
    for cl in ["-1", "+5", "1 2", "0x10", "", "1.0"] {
        let req = format!("PUT / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
        assert!(
            matches!(head(req.as_bytes()), Err(HttpError::BadContentLength(_))),
            "{cl}"
        );
    }
    let rep = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    assert!(matches!(head(rep), Err(HttpError::BadContentLength(_))));
    let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
    assert!(matches!(head(huge), Err(HttpError::TooLarge)));
}

#[test]
fn chunked_is_refused() {
    let req = b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(
        err(req),
        r#"Transfer-Encoding "chunked" is not supported; send the body with a Content-Length"#
    );
}

#[test]
fn oversized_requests_are_refused_early() {
    // A body announced too large is refused from the head alone.
    let req = format!("PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 60 * 1024);
    assert_eq!(
        err(req.as_bytes()),
        "Request payload with size 61440 is larger than the limit of 51200 allowed by server."
    );
    // Exactly at the limit is fine.
    let req = format!("PUT /vm HTTP/1.1\r\nContent-Length: {DEFAULT_MAX_PAYLOAD}\r\n\r\n");
    assert!(head(req.as_bytes()).unwrap().is_some());
    // A head that never ends is refused once it reaches the limit.
    let mut endless = b"GET / HTTP/1.1\r\n".to_vec();
    while endless.len() < MAX_REQUEST_SIZE {
        endless.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(err(&endless), "request larger than 51200 bytes");
    endless.truncate(MAX_REQUEST_SIZE - 1);
    assert_eq!(head(&endless).unwrap(), None);
}

#[test]
fn reader_pipelined_requests() {
    let input = b"PUT /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}\
                  GET / HTTP/1.1\r\n\r\n\
                  GET /vm/config HTTP/1.1\r\nConnection: close\r\n\r\n";
    for step in [1, 7, 4096] {
        let mut stream = Mock::new(input, step);
        let mut reader = RequestReader::new();
        let a = reader.read_request(&mut stream).unwrap().unwrap();
        assert_eq!((a.method.as_str(), a.target.as_str()), ("PUT", "/vm"));
        assert_eq!(a.body, b"{\"state\": \"Paused\"}");
        let b = reader.read_request(&mut stream).unwrap().unwrap();
        assert_eq!(
            (b.target.as_str(), b.body.len(), b.keep_alive),
            ("/", 0, true)
        );
        let c = reader.read_request(&mut stream).unwrap().unwrap();
        assert_eq!((c.target.as_str(), c.keep_alive), ("/vm/config", false));
        assert_eq!(reader.read_request(&mut stream).unwrap(), None);
        assert!(stream.output.is_empty());
    }
}

#[test]
fn reader_truncated_requests() {
    for input in [
        &b"GET / HTTP/1.1\r\nHost: x"[..],
        b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"sta",
    ] {
        let mut stream = Mock::new(input, 3);
        let e = RequestReader::new().read_request(&mut stream).unwrap_err();
        assert!(matches!(e, HttpError::Truncated), "{e}");
    }
}

#[test]
fn reader_refuses_oversize_without_reading_it_all() {
    let mut input =
        format!("PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 60 * 1024).into_bytes();
    input.resize(input.len() + 60 * 1024, b'x');
    let mut stream = Mock::new(&input, 1024);
    let e = RequestReader::new().read_request(&mut stream).unwrap_err();
    assert!(matches!(e, HttpError::PayloadTooLarge { .. }), "{e}");
    assert!(stream.pos <= 1024, "read {} bytes", stream.pos);

    // A smaller limit (kiln-vmm's --http-api-max-payload-size) is honoured.
    let mut stream = Mock::new(
        b"PUT /vm HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"a\": 100}",
        64,
    );
    let e = RequestReader::with_max_payload(10)
        .read_request(&mut stream)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Request payload with size 11 is larger than the limit of 10 allowed by server."
    );

    // Byte by byte, an endless head stops at the limit.
    let endless = vec![b'a'; 2 * MAX_REQUEST_SIZE];
    let mut stream = Mock::new(&endless, 1);
    let e = RequestReader::new().read_request(&mut stream).unwrap_err();
    assert!(matches!(e, HttpError::TooLarge));
    assert_eq!(stream.pos, MAX_REQUEST_SIZE);
}

#[test]
fn reader_sends_100_continue_when_asked() {
    let head = b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    // The first read brings exactly the head, as when a client waits before the body.
    let mut stream = Mock::new(&[&head[..], b"{}"].concat(), head.len());
    let req = RequestReader::new()
        .read_request(&mut stream)
        .unwrap()
        .unwrap();
    assert_eq!(req.body, b"{}");
    assert_eq!(stream.output, b"HTTP/1.1 100 Continue\r\n\r\n");
}

#[test]
fn parse_resumes_across_reads_and_asks_for_continue_once() {
    let input = b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}GET / HTTP/1.1\r\n\r\n";
    let mut stream = Mock::new(input, 5);
    let mut reader = RequestReader::new();
    let mut continues = 0;
    let first = loop {
        match reader.parse().unwrap() {
            Parsed::Request(r) => break r,
            Parsed::Incomplete { send_continue } => continues += usize::from(send_continue),
        }
        assert!(reader.fill(&mut stream).unwrap() > 0, "input ran out");
    };
    assert_eq!((first.target.as_str(), first.body.len()), ("/vm", 19));
    assert_eq!(continues, 1);
    // The pipelined request's start stayed buffered; its head is parsed afresh.
    assert!(!reader.is_empty());
    let second = loop {
        match reader.parse().unwrap() {
            Parsed::Request(r) => break r,
            Parsed::Incomplete { send_continue } => assert!(!send_continue),
        }
        assert!(reader.fill(&mut stream).unwrap() > 0, "input ran out");
    };
    assert_eq!(second.target, "/");
    assert!(reader.is_empty() && reader.buffered() == 0);
}

#[test]
fn a_would_block_read_changes_nothing() {
    struct Empty;
    impl Read for Empty {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    let mut reader = RequestReader::new();
    let mut stream = Mock::new(b"GET / HT", 64);
    reader.fill(&mut stream).unwrap();
    let e = reader.fill(&mut Empty).unwrap_err();
    assert!(
        matches!(&e, HttpError::Io(io) if io.kind() == io::ErrorKind::WouldBlock),
        "{e}"
    );
    assert_eq!(reader.buffered(), 8);
    assert_eq!(
        reader.parse().unwrap(),
        Parsed::Incomplete {
            send_continue: false
        }
    );
}

#[test]
fn an_endless_head_fed_in_reads_stops_at_the_limit() {
    let endless = vec![b'a'; 2 * MAX_REQUEST_SIZE];
    let mut stream = Mock::new(&endless, 1000);
    let mut reader = RequestReader::new();
    let e = loop {
        match reader.parse() {
            Ok(_) => {
                reader.fill(&mut stream).unwrap();
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(e, HttpError::TooLarge));
    assert!(
        stream.pos < MAX_REQUEST_SIZE + 1000,
        "read {} bytes",
        stream.pos
    );
}
