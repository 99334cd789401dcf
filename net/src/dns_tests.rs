//! The resolver against a fake upstream on loopback: allowed names answered, flattened and
//! pinned; other names NXDOMAIN and reported; private answers dropped; AAAA and other types
//! empty; malformed queries handled.

use std::collections::HashMap;
use std::net::UdpSocket as StdUdp;
use std::str::FromStr;

use hickory_proto::op::Query;
use hickory_proto::rr::Name;
use hickory_proto::rr::rdata::CNAME;

use super::*;
use crate::policy::DomainPattern;

/// An upstream name server answering from `zone` (name -> addresses; a name mapping to another
/// name's entry through `cnames`), NXDOMAIN for anything else.
fn fake_upstream(
    zone: HashMap<&'static str, Vec<Ipv4Addr>>,
    cnames: HashMap<&'static str, &'static str>,
) -> SocketAddr {
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_recursion_available(true);
            let question = q.queries()[0].clone();
            r.add_query(question.clone());
            let asked = question
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let (target, via) = match cnames.get(asked.as_str()) {
                Some(t) => (t.to_string(), true),
                None => (asked.clone(), false),
            };
            match zone.get(target.as_str()) {
                None => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
                Some(ips) => {
                    let tname = Name::from_str(&format!("{target}.")).unwrap();
                    if via {
                        r.add_answer(Record::from_rdata(
                            question.name().clone(),
                            600,
                            RData::CNAME(CNAME(tname.clone())),
                        ));
                    }
                    if question.query_type() == RecordType::A {
                        for ip in ips {
                            r.add_answer(Record::from_rdata(tname.clone(), 3600, RData::A(A(*ip))));
                        }
                    }
                }
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from);
        }
    });
    addr
}

fn query(name: &str, kind: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(4242).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_str(name).unwrap(), kind));
    m.to_vec().unwrap()
}

fn addresses(answer: &[u8]) -> (ResponseCode, Vec<(String, u32, Ipv4Addr)>) {
    let m = Message::from_vec(answer).unwrap();
    assert_eq!(m.id(), 4242);
    assert_eq!(m.message_type(), MessageType::Response);
    let list = m
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::A(a) => (r.name().to_ascii(), r.ttl(), a.0),
            other => panic!("only A records are handed out, got {other:?}"),
        })
        .collect();
    (m.response_code(), list)
}

fn resolver(patterns: &[&str], upstream: SocketAddr) -> (Resolver, Pins, Refusals) {
    let policy = Policy {
        domains: patterns
            .iter()
            .map(|p| p.parse::<DomainPattern>().unwrap())
            .collect(),
        allow_net: false,
    };
    let (pins, refusals) = (Pins::default(), Refusals::new("vm-t", None));
    let r = Resolver::new(
        Arc::new(policy),
        &Upstream::Servers(vec![upstream]),
        pins.clone(),
        refusals.clone(),
    )
    .unwrap();
    (r, pins, refusals)
}

fn zone() -> (
    HashMap<&'static str, Vec<Ipv4Addr>>,
    HashMap<&'static str, &'static str>,
) {
    let zone = HashMap::from([
        (
            "allowed.test",
            vec![
                Ipv4Addr::new(203, 0, 113, 10),
                Ipv4Addr::new(203, 0, 113, 11),
            ],
        ),
        ("cdn.example.net", vec![Ipv4Addr::new(198, 51, 100, 7)]),
        (
            "rebind.allowed.test",
            vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(203, 0, 113, 12)],
        ),
        ("meta.allowed.test", vec![Ipv4Addr::new(169, 254, 169, 254)]),
        ("blocked.test", vec![Ipv4Addr::new(203, 0, 113, 20)]),
    ]);
    let cnames = HashMap::from([("www.allowed.test", "cdn.example.net")]);
    (zone, cnames)
}

#[tokio::test]
async fn allowed_names_are_answered_pinned_and_flattened() {
    let (z, c) = zone();
    let (r, pins, refusals) = resolver(&["allowed.test", "*.allowed.test"], fake_upstream(z, c));
    let (code, got) = addresses(
        &r.answer(&query("Allowed.Test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(got.len(), 2);
    assert!(
        got.iter().all(|(_, ttl, _)| *ttl == MAX_TTL),
        "TTLs are capped: {got:?}"
    );
    assert!(pins.is_pinned("allowed.test", Ipv4Addr::new(203, 0, 113, 10)));
    assert!(pins.is_pinned("ALLOWED.test.", Ipv4Addr::new(203, 0, 113, 11)));
    assert!(!pins.is_pinned("allowed.test", Ipv4Addr::new(203, 0, 113, 20)));

    // A CNAME to a name that is not allowed: the guest sees A records for the name it asked.
    let (code, got) = addresses(
        &r.answer(&query("www.allowed.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(
        got,
        [(
            "www.allowed.test.".to_string(),
            MAX_TTL,
            Ipv4Addr::new(198, 51, 100, 7)
        )]
    );
    assert!(pins.is_pinned("www.allowed.test", Ipv4Addr::new(198, 51, 100, 7)));
    assert!(!pins.is_pinned("cdn.example.net", Ipv4Addr::new(198, 51, 100, 7)));
    assert_eq!(refusals.list().1, 0);
}

#[tokio::test]
async fn other_names_fail_to_resolve_and_are_reported() {
    let (z, c) = zone();
    let (r, pins, refusals) = resolver(&["allowed.test"], fake_upstream(z, c));
    let (code, got) = addresses(
        &r.answer(&query("blocked.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!((code, got.len()), (ResponseCode::NXDomain, 0));
    let (code, _) = addresses(
        &r.answer(&query("sub.allowed.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(
        code,
        ResponseCode::NXDomain,
        "an exact pattern does not allow subdomains"
    );
    assert!(!pins.is_pinned("blocked.test", Ipv4Addr::new(203, 0, 113, 20)));
    let (list, total) = refusals.list();
    assert_eq!(total, 2);
    assert_eq!(
        list[0].to_string(),
        "vm vm-t: refused dns blocked.test: not an allowed domain"
    );
}

#[tokio::test]
async fn private_and_metadata_answers_are_dropped() {
    let (z, c) = zone();
    let (r, pins, refusals) = resolver(&["*.allowed.test"], fake_upstream(z, c));
    let (_, got) = addresses(
        &r.answer(&query("rebind.allowed.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(
        got.iter().map(|g| g.2).collect::<Vec<_>>(),
        [Ipv4Addr::new(203, 0, 113, 12)]
    );
    assert!(!pins.is_pinned("rebind.allowed.test", Ipv4Addr::new(10, 0, 0, 5)));
    let (code, got) = addresses(
        &r.answer(&query("meta.allowed.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!((code, got.len()), (ResponseCode::NoError, 0));
    let reasons: Vec<String> = refusals.list().0.iter().map(|r| r.reason.clone()).collect();
    assert_eq!(
        reasons,
        [
            "the answer is in the private range 10.0.0.0/8",
            "the answer is in the cloud metadata address 169.254.169.254"
        ]
    );
}

#[tokio::test]
async fn aaaa_and_other_types_get_empty_answers_and_missing_names_nxdomain() {
    let (z, c) = zone();
    let (r, _, _) = resolver(&["allowed.test", "gone.test"], fake_upstream(z, c));
    for kind in [
        RecordType::AAAA,
        RecordType::TXT,
        RecordType::HTTPS,
        RecordType::MX,
    ] {
        let m = Message::from_vec(&r.answer(&query("allowed.test.", kind)).await.unwrap()).unwrap();
        assert_eq!(
            (m.response_code(), m.answers().len()),
            (ResponseCode::NoError, 0),
            "{kind:?}"
        );
    }
    let (code, _) = addresses(&r.answer(&query("gone.test.", RecordType::A)).await.unwrap());
    assert_eq!(
        code,
        ResponseCode::NXDomain,
        "the upstream's NXDOMAIN passes through"
    );
    assert_eq!(r.answer(b"\x00\x01garbage").await, None);
    let mut two = Message::new();
    two.set_id(4242);
    two.add_query(Query::query(
        Name::from_str("allowed.test.").unwrap(),
        RecordType::A,
    ));
    two.add_query(Query::query(
        Name::from_str("gone.test.").unwrap(),
        RecordType::A,
    ));
    let m = Message::from_vec(&r.answer(&two.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(m.response_code(), ResponseCode::FormErr);
}

#[tokio::test]
async fn allow_net_answers_every_name_but_never_private_addresses() {
    let (z, c) = zone();
    let policy = Policy {
        domains: vec![],
        allow_net: true,
    };
    let refusals = Refusals::new("vm-n", None);
    let r = Resolver::new(
        Arc::new(policy),
        &Upstream::Servers(vec![fake_upstream(z, c)]),
        Pins::default(),
        refusals.clone(),
    )
    .unwrap();
    let (_, got) = addresses(
        &r.answer(&query("blocked.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(got.len(), 1);
    let (_, got) = addresses(
        &r.answer(&query("rebind.allowed.test.", RecordType::A))
            .await
            .unwrap(),
    );
    assert_eq!(got.len(), 1, "still no private addresses");
    assert_eq!(refusals.list().1, 1);
}

#[tokio::test]
async fn udp_and_tcp_listeners_answer() {
    let (z, c) = zone();
    let (r, _, _) = resolver(&["allowed.test"], fake_upstream(z, c));
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ua, ta) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    tokio::spawn(r.clone().serve_udp(udp));
    tokio::spawn(r.serve_tcp(tcp));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&query("allowed.test.", RecordType::A), ua)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = client.recv(&mut buf).await.unwrap();
    assert_eq!(addresses(&buf[..n]).1.len(), 2);
    let mut conn = tokio::net::TcpStream::connect(ta).await.unwrap();
    for _ in 0..2 {
        let q = query("allowed.test.", RecordType::A);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        conn.write_all(&out).await.unwrap();
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).await.unwrap();
        let mut ans = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut ans).await.unwrap();
        assert_eq!(
            addresses(&ans).1.len(),
            2,
            "two questions on one connection"
        );
    }
}
