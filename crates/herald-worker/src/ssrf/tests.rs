//! The guard through the webhook client itself ([`http_client_with`]), with
//! DNS answers the tests choose: a regression in the wiring (resolver not
//! installed, literal IPs not checked, redirects followed) fails here.

#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use herald_testkit::{ReceiverBehaviour, TestReceiver};

use super::*;
use crate::webhooks::http_client_with;

/// Answers from a fixed table, counting lookups; unknown names fail.
#[derive(Default)]
struct StaticResolver {
    answers: Mutex<HashMap<String, Vec<IpAddr>>>,
    lookups: AtomicUsize,
}

impl StaticResolver {
    fn answer(&self, host: &str, addresses: &[IpAddr]) {
        self.answers
            .lock()
            .unwrap()
            .insert(host.to_string(), addresses.to_vec());
    }
}

#[async_trait::async_trait]
impl Resolver for StaticResolver {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.answers
            .lock()
            .unwrap()
            .get(host)
            .cloned()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no answer for {host}"),
                )
            })
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn cidr(text: &str) -> Cidr {
    text.parse().unwrap()
}

fn client(allow: &[&str]) -> (GuardedClient, Arc<StaticResolver>) {
    let resolver = Arc::new(StaticResolver::default());
    let config = SsrfConfig {
        allow: allow.iter().map(|c| cidr(c)).collect(),
        ..Default::default()
    };
    (http_client_with(&config, resolver.clone()), resolver)
}

/// A URL on the discard port: nothing there answers, so a request the
/// guard let through would fail differently from a refusal.
fn literal_url(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("http://{v4}:9/hooks"),
        IpAddr::V6(v6) => format!("http://[{v6}]:9/hooks"),
    }
}

async fn refusal(client: &GuardedClient, url: &str) -> Refused {
    match client.send(client.post(url).body("{}")).await {
        Err(SendError::Refused(refused)) => refused,
        other => panic!("{url} was not refused by the guard: {other:?}"),
    }
}

/// (address, the range that refuses it, a word of its name, and for an
/// address embedding IPv4, the IPv4 range that decides).
const REFUSED: &[(&str, &str, &str, Option<&str>)] = &[
    ("0.1.2.3", "0.0.0.0/8", "this network", None),
    ("10.1.2.3", "10.0.0.0/8", "private, RFC 1918", None),
    ("100.64.0.1", "100.64.0.0/10", "CGNAT", None),
    ("100.127.255.254", "100.64.0.0/10", "CGNAT", None),
    ("127.0.0.1", "127.0.0.0/8", "loopback", None),
    ("127.255.255.254", "127.0.0.0/8", "loopback", None),
    ("169.254.169.254", "169.254.0.0/16", "metadata", None),
    ("172.16.0.1", "172.16.0.0/12", "private, RFC 1918", None),
    ("172.31.255.254", "172.16.0.0/12", "private, RFC 1918", None),
    ("192.0.0.8", "192.0.0.0/24", "IETF", None),
    ("192.0.2.1", "192.0.2.0/24", "documentation", None),
    ("192.88.99.1", "192.88.99.0/24", "6to4 relay", None),
    ("192.168.1.1", "192.168.0.0/16", "private, RFC 1918", None),
    ("198.18.0.1", "198.18.0.0/15", "benchmarking", None),
    ("198.19.255.254", "198.18.0.0/15", "benchmarking", None),
    ("198.51.100.7", "198.51.100.0/24", "documentation", None),
    ("203.0.113.9", "203.0.113.0/24", "documentation", None),
    ("224.0.0.1", "224.0.0.0/4", "multicast", None),
    ("239.255.255.250", "224.0.0.0/4", "multicast", None),
    ("240.0.0.1", "240.0.0.0/4", "reserved", None),
    ("255.255.255.255", "255.255.255.255/32", "broadcast", None),
    ("::", "::/128", "unspecified", None),
    ("::1", "::1/128", "loopback", None),
    (
        "::ffff:127.0.0.1",
        "::ffff:0:0/96",
        "IPv4-mapped",
        Some("127.0.0.0/8"),
    ),
    (
        "::ffff:10.0.0.1",
        "::ffff:0:0/96",
        "IPv4-mapped",
        Some("10.0.0.0/8"),
    ),
    (
        "::ffff:169.254.169.254",
        "::ffff:0:0/96",
        "IPv4-mapped",
        Some("169.254.0.0/16"),
    ),
    ("::7f00:1", "::/96", "IPv4-compatible", None),
    ("::808:808", "::/96", "IPv4-compatible", None),
    (
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::/96",
        "NAT64",
        Some("169.254.0.0/16"),
    ),
    (
        "64:ff9b::7f00:1",
        "64:ff9b::/96",
        "NAT64",
        Some("127.0.0.0/8"),
    ),
    ("64:ff9b:1::1", "64:ff9b:1::/48", "local-use NAT64", None),
    ("100::1", "100::/64", "discard-only", None),
    ("2001::1", "2001::/32", "Teredo", None),
    ("2001:0:4136:e378::1", "2001::/32", "Teredo", None),
    ("2001:2::1", "2001::/23", "IETF", None),
    ("2001:db8::1", "2001:db8::/32", "documentation", None),
    ("2002:7f00:1::1", "2002::/16", "6to4", Some("127.0.0.0/8")),
    (
        "2002:a9fe:a9fe::",
        "2002::/16",
        "6to4",
        Some("169.254.0.0/16"),
    ),
    (
        "2002:c0a8:101::1",
        "2002::/16",
        "6to4",
        Some("192.168.0.0/16"),
    ),
    ("3fff::1", "3fff::/20", "documentation", None),
    ("fc00::1", "fc00::/7", "unique-local", None),
    ("fd12:3456::1", "fc00::/7", "unique-local", None),
    ("fe80::1", "fe80::/10", "link-local", None),
    ("febf::1", "fe80::/10", "link-local", None),
    ("fec0::1", "fec0::/10", "site-local", None),
    ("ff02::1", "ff00::/8", "multicast", None),
    ("ff0e::1", "ff00::/8", "multicast", None),
    ("1234::1", "::/3", "2000::/3", None),
    ("4000::1", "4000::/2", "2000::/3", None),
    ("8000::1", "8000::/1", "2000::/3", None),
];

fn assert_refusal(refused: &Refused, case: &(&str, &str, &str, Option<&str>), how: &str) {
    let (address, range, name, embedded) = *case;
    assert_eq!(refused.address(), ip(address), "{how} {address}");
    assert_eq!(refused.range(), cidr(range), "{how} {address}: {refused}");
    assert!(
        refused.range_name().contains(name),
        "{how} {address}: {refused}"
    );
    assert_eq!(
        refused.embedded().map(|(_, range)| range),
        embedded.map(cidr),
        "{how} {address}: {refused}"
    );
    let text = refused.to_string();
    assert!(
        text.starts_with(&format!(
            "refused by the SSRF guard: {} is in {} (",
            ip(address),
            cidr(range)
        )),
        "{text}"
    );
    assert_eq!(refused.describe(true), text);
    let hidden = refused.describe(false);
    assert!(
        hidden.starts_with(&format!(
            "refused by the SSRF guard: the address is in {} (",
            cidr(range)
        )),
        "{hidden}"
    );
    let mut revealing = vec![ip(address).to_string()];
    revealing.extend(refused.embedded().map(|(v4, _)| v4.to_string()));
    for shown in revealing {
        // A range's own address (0.0.0.0, ::1, 255.255.255.255) may equal
        // the refused one: look outside the ranges' text.
        let without_ranges = hidden.replace(&cidr(range).to_string(), "");
        let without_ranges = match refused.embedded() {
            Some((_, inner)) => without_ranges.replace(&inner.to_string(), ""),
            None => without_ranges,
        };
        assert!(
            !without_ranges.contains(&shown),
            "{how} {address}: {hidden} names the address"
        );
    }
}

#[tokio::test]
async fn every_non_global_range_is_refused_as_a_literal_and_by_name() {
    let (client, resolver) = client(&[]);
    for (n, case) in REFUSED.iter().enumerate() {
        let address = ip(case.0);
        let refused = refusal(&client, &literal_url(address)).await;
        assert_refusal(&refused, case, "literal");

        let host = format!("host{n}.example.com");
        resolver.answer(&host, &[address]);
        let refused = refusal(&client, &format!("http://{host}:9/hooks")).await;
        assert_refusal(&refused, case, "named");
    }
    // Literal hosts were never looked up; every name exactly once.
    assert_eq!(resolver.lookups.load(Ordering::SeqCst), REFUSED.len());
}

#[tokio::test]
async fn other_spellings_of_a_literal_address_are_refused() {
    let (client, _) = client(&[]);
    for url in [
        "http://2130706433:9/",
        "http://0x7f.0.0.1:9/",
        "http://0177.0.0.1:9/",
        "http://127.1:9/",
        "http://[::ffff:7f00:1]:9/",
        "https://[0:0:0:0:0:0:0:1]:9/",
    ] {
        let refused = refusal(&client, url).await;
        assert!(refused.to_string().contains("loopback"), "{url}: {refused}");
    }
}

#[tokio::test]
async fn one_non_global_answer_among_global_ones_refuses_the_name() {
    let (client, resolver) = client(&[]);
    for (answers, range) in [
        (vec![ip("8.8.8.8"), ip("10.0.0.1")], "10.0.0.0/8"),
        (vec![ip("169.254.169.254"), ip("1.1.1.1")], "169.254.0.0/16"),
        (vec![ip("2606:4700::1111"), ip("fe80::1")], "fe80::/10"),
        (
            vec![ip("8.8.8.8"), ip("::ffff:192.168.0.1")],
            "::ffff:0:0/96",
        ),
    ] {
        resolver.answer("mixed.example.com", &answers);
        let refused = refusal(&client, "http://mixed.example.com:9/").await;
        assert_eq!(refused.range(), cidr(range), "{answers:?}: {refused}");
    }
}

#[test]
fn global_addresses_pass() {
    let guard = SsrfGuard::default();
    for address in [
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.1",
        "192.169.0.1",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2a00:1450:4001::1",
        "2001:200::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ] {
        if let Err(refused) = guard.check(ip(address)) {
            panic!("{address}: {refused}");
        }
    }
}

#[tokio::test]
async fn the_allow_list_opens_exactly_what_it_names() {
    let open = TestReceiver::start_at("127.0.0.2:0", ReceiverBehaviour::Ok).await;
    let port = url::Url::parse(&open.url("/")).unwrap().port().unwrap();
    let (client, resolver) = client(&["127.0.0.2/32"]);

    let response = client
        .send(client.post(open.url("/literal")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The connection goes to the address the guard checked: the system
    // resolver knows nothing of this name.
    resolver.answer("receiver.test", &[ip("127.0.0.2")]);
    let response = client
        .send(client.post(format!("http://receiver.test:{port}/named")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let paths: Vec<String> = open.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/literal", "/named"]);

    let refused = refusal(&client, &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(refused.range(), cidr("127.0.0.0/8"));
    resolver.answer("both.test", &[ip("127.0.0.2"), ip("127.0.0.1")]);
    let refused = refusal(&client, &format!("http://both.test:{port}/")).await;
    assert_eq!(refused.address(), ip("127.0.0.1"));
    assert_eq!(open.received().len(), 2, "a refused request arrived");

    let guard = SsrfGuard::new(&SsrfConfig {
        allow: vec![cidr("127.0.0.2/32")],
        ..Default::default()
    });
    // The same destination written as IPv4-mapped IPv6 is just as open.
    assert!(guard.check(ip("::ffff:127.0.0.2")).is_ok());
    for closed in [
        "127.0.0.1",
        "127.0.0.3",
        "::1",
        "::ffff:127.0.0.1",
        "10.0.0.1",
    ] {
        assert!(guard.check(ip(closed)).is_err(), "{closed}");
    }
}

#[tokio::test]
async fn a_redirect_is_returned_never_followed() {
    let target = TestReceiver::start_at("127.0.0.2:0", ReceiverBehaviour::Ok).await;
    let redirecting = TestReceiver::start_at(
        "127.0.0.2:0",
        ReceiverBehaviour::RedirectTo(target.url("/landed")),
    )
    .await;
    let (client, _) = client(&["127.0.0.2/32"]);
    let response = client
        .send(client.post(redirecting.url("/hooks")))
        .await
        .unwrap();
    assert_eq!(response.status(), 307);
    assert_eq!(redirecting.received().len(), 1);
    assert!(target.received().is_empty(), "the redirect was followed");
}

#[test]
fn cidrs_are_parsed_strictly() {
    assert_eq!(cidr("127.0.0.0/8").to_string(), "127.0.0.0/8");
    assert_eq!(cidr("::1/128").to_string(), "::1/128");
    assert_eq!(cidr("0.0.0.0/0"), Cidr::v4([0, 0, 0, 0], 0));
    assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.1")));
    assert!(cidr("::/0").contains(ip("::1")));
    assert!(!cidr("::/0").contains(ip("127.0.0.1")));
    for bad in [
        "127.0.0.1",
        "10.0.0.0/33",
        "::/129",
        "10.1.2.3/8",
        "fd00::1/8",
        "localhost/8",
        "10.0.0.0/x",
        "",
    ] {
        let err = bad.parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }
}
