//! The server name a TLS client asks for (SNI), read from its ClientHello before any byte is
//! passed on: the proxy lets a port-443 connection through only when this names an allowed domain
//! that resolved to the address being connected to. The ClientHello may span TLS records; it is
//! reassembled up to [`MAX_HELLO`] bytes. Nothing here trusts the bytes: every length is checked.

/// The largest ClientHello accepted (with post-quantum key shares one is a few KiB).
pub const MAX_HELLO: usize = 64 * 1024;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello; its server name, if it sent one.
    Parsed(Option<String>),
    /// A ClientHello may follow, but not all of it has arrived.
    Incomplete,
    /// Not a TLS ClientHello, with what was wrong.
    NotTls(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Reads the ClientHello at the start of `buf` (the first bytes a client sent).
pub fn parse(buf: &[u8]) -> Hello {
    // The handshake message, gathered from as many records as it takes.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != CONTENT_HANDSHAKE {
            return Hello::NotTls("the first record is not a handshake");
        }
        if rest[1] != 3 {
            return Hello::NotTls("the record version is not TLS");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > (1 << 14) + 2048 {
            return Hello::NotTls("the record length is out of range");
        }
        if rest.len() < 5 + len {
            return Hello::Incomplete;
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::NotTls("the first handshake message is not a ClientHello");
            }
            let body = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if body > MAX_HELLO {
                return Hello::NotTls("the ClientHello is too long");
            }
            if handshake.len() >= 4 + body {
                return match server_name(&handshake[4..4 + body]) {
                    Some(name) => Hello::Parsed(name),
                    None => Hello::NotTls("the ClientHello is malformed"),
                };
            }
        }
    }
}

/// The host name in a ClientHello body; `Some(None)` when it has none, `None` when malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { b: body };
    r.take(2 + 32)?; // client_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.b.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Reader { b: r.vec16()? };
    let mut found = None;
    while !exts.b.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if found.is_some() {
            return None; // a second server_name extension is forbidden
        }
        let mut list = Reader { b: data };
        let mut names = Reader { b: list.vec16()? };
        while !names.b.is_empty() {
            let t = names.u8()?;
            let name = names.vec16()?;
            if t == NAME_TYPE_HOST {
                let name = std::str::from_utf8(name).ok()?;
                found = Some(name.to_string());
                break;
            }
        }
        found.as_ref()?;
    }
    Some(found)
}

/// A minimal TLS 1.2-style ClientHello naming `sni` (none with `None`), in one record. Probes and
/// tests use it to play a TLS client without a TLS library.
pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let entry_len = 3 + n.len();
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&((2 + entry_len) as u16).to_be_bytes());
        exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
        exts.push(NAME_TYPE_HOST);
        exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
        exts.extend_from_slice(n);
    }
    // supported_versions: TLS 1.3, so the message looks current.
    exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_read_whole_or_in_pieces() {
        let hello = client_hello(Some("files.pythonhosted.org"));
        assert_eq!(
            parse(&hello),
            Hello::Parsed(Some("files.pythonhosted.org".into()))
        );
        for cut in [0, 3, 5, 20, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(parse(&client_hello(None)), Hello::Parsed(None));
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let one = client_hello(Some("allowed.test"));
        let hs = &one[5..];
        let mut two = Vec::new();
        for part in [&hs[..10], &hs[10..]] {
            two.extend_from_slice(&[22, 3, 3]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two), Hello::Parsed(Some("allowed.test".into())));
        assert_eq!(parse(&two[..20]), Hello::Incomplete);
    }

    #[test]
    fn other_protocols_and_broken_hellos_are_not_tls() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls(_)));
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Hello::NotTls(_)
        ));
        let mut bad = client_hello(Some("allowed.test"));
        let n = bad.len();
        bad[n - 8] = 0xff; // a length that runs past the end
        assert!(matches!(parse(&bad), Hello::NotTls(_)));
        let mut huge = client_hello(Some("x.test"));
        huge[3] = 0xff; // a record longer than TLS allows
        huge[4] = 0xff;
        assert!(matches!(parse(&huge), Hello::NotTls(_)));
        // Two server_name extensions: refused rather than guessed.
        let mut twice = client_hello(Some("a.test"));
        let ext = [
            0u8, 0, 0, 11, 0, 9, 0, 0, 6, b'b', b'.', b't', b'e', b's', b't',
        ];
        let ext = &ext[..];
        twice.extend_from_slice(ext);
        let grow = ext.len();
        let fix = |b: &mut Vec<u8>, at: usize, width: usize| {
            let mut v = 0usize;
            for i in 0..width {
                v = (v << 8) | usize::from(b[at + i]);
            }
            v += grow;
            for i in 0..width {
                b[at + i] = (v >> (8 * (width - 1 - i))) as u8;
            }
        };
        fix(&mut twice, 3, 2); // record length
        fix(&mut twice, 6, 3); // handshake length
        // The extensions length: after the record and handshake headers, version, random, session
        // id, cipher suites and compression methods.
        let at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        fix(&mut twice, at, 2);
        assert!(
            matches!(parse(&twice), Hello::NotTls(_)),
            "{:?}",
            parse(&twice)
        );
    }
}
