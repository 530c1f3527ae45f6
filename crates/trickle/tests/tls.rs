//! Trickle over real TLS on loopback: our publisher and subscriber (and the JSONL channels on
//! them) against our server with a self-signed certificate, in each of the three trust modes;
//! a refused certificate is a clear error, at once, never a retry loop; plain HTTP sent to the
//! TLS port is told to use https://; a reloaded certificate serves new connections.

use bytes::Bytes;
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trickle::client_tls::ClientTls;
use trickle::jsonl::{JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions};
use trickle::publisher::{PublishError, Publisher, PublisherOptions};
use trickle::server::{random_channel_name, Server, ServerConfig};
use trickle::subscriber::{SubscribeError, Subscriber, SubscriberOptions};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// An HTTPS trickle server (autocreate) on a free loopback port with `tls`.
async fn bind_tls(tls: tls::ServerTls) -> Server {
    let config = ServerConfig {
        autocreate: true,
        tls: Some(tls),
        ..Default::default()
    };
    Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// An HTTPS trickle server (autocreate) with a certificate made at start for 127.0.0.1 and
/// localhost; its certificate is written to `dir/cert.pem`, as `serve --tls-cert-out` does.
async fn https_server(dir: &Path) -> (Server, PathBuf) {
    let tls =
        tls::ServerTls::self_signed(&["127.0.0.1".into(), "localhost".into()], &[b"http/1.1"])
            .expect("self-signed certificate");
    let cert = dir.join("cert.pem");
    std::fs::write(&cert, tls.cert_pem()).unwrap();
    let server = bind_tls(tls).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    (server, cert)
}

/// On a new channel of `server`, at `host` (the certificate's 127.0.0.1 or localhost): writes
/// `lines` JSON lines over a JSONL writer in mode `tls` and reads them back with a JSONL reader
/// in the same mode.
async fn round_trip(server: &Server, host: &str, tls: ClientTls, lines: usize) -> Vec<Value> {
    let name = random_channel_name();
    server
        .channels()
        .create(&name, Some("application/jsonl"))
        .unwrap();
    let url = format!("{}/{name}", server.url()).replace("127.0.0.1", host);
    let url = url.as_str();
    let mut reader = JsonlReader::new(
        Subscriber::new(
            url,
            SubscriberOptions {
                start_seq: 0,
                tls: tls.clone(),
                ..Default::default()
            },
        ),
        JsonlReaderOptions::default(),
    );
    let writer = JsonlWriter::new(
        Publisher::new(
            url,
            PublisherOptions {
                content_type: "application/jsonl".into(),
                tls,
                ..Default::default()
            },
        ),
        JsonlWriterOptions::default(),
    );
    for i in 0..lines {
        writer
            .write(&json!({"type": "telemetry", "i": i}))
            .await
            .unwrap();
    }
    writer.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < lines {
        let line = within("JSONL lines over TLS", reader.next::<Value>())
            .await
            .expect("read")
            .expect("channel open");
        got.push(line);
    }
    writer.close().await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_mode_accepts_the_self_signed_certificate_like_the_reference_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = https_server(dir.path()).await;
    let got = round_trip(&server, "127.0.0.1", ClientTls::AnyCertificate, 200).await;
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v["i"], i, "line {i} in order and intact");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_certificate_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert) = https_server(dir.path()).await;
    let pinned = ClientTls::from_ca_file(&cert).unwrap();
    assert!(pinned.verifies());
    let got = round_trip(&server, "127.0.0.1", pinned, 50).await;
    assert_eq!(got.len(), 50);
    // Also under the name `localhost`, which the certificate names too.
    let got = round_trip(
        &server,
        "localhost",
        ClientTls::from_ca_file(&cert).unwrap(),
        5,
    )
    .await;
    assert_eq!(got.len(), 5);
    server.shutdown().await;
}

/// Options that would retry for a long time if the error were retried at all.
fn patient_publisher(tls: ClientTls) -> PublisherOptions {
    PublisherOptions {
        retry_delay: Duration::from_secs(5),
        reconnect_window: Duration::from_secs(60),
        tls,
        ..Default::default()
    }
}

fn patient_subscriber(tls: ClientTls) -> SubscriberOptions {
    SubscriberOptions {
        start_seq: 0,
        retries: 5,
        retry_delay: Duration::from_secs(5),
        reconnect_window: Duration::from_secs(60),
        tls,
        ..Default::default()
    }
}

/// A refused certificate: both clients fail at once (no retry delay spent) with
/// [`PublishError::Tls`] / [`SubscribeError::Tls`], whose message names the URL, the reason
/// and `flag`.
async fn assert_refused(url: &str, tls: ClientTls, flag: &str, reason: &str) {
    let started = Instant::now();
    let mut p = Publisher::new(url, patient_publisher(tls.clone()));
    let mut seg = p.next_segment().await.expect("a segment opens lazily");
    let write = within("refused publisher", async {
        match seg.write(Bytes::from_static(b"x\n")).await {
            Err(e) => Err(e),
            Ok(()) => seg.close().await,
        }
    })
    .await;
    let err = write.expect_err("a refused certificate cannot publish");
    let msg = err.to_string();
    assert!(matches!(err, PublishError::Tls { .. }), "{err:?}");
    assert!(msg.contains(url), "names the URL: {msg}");
    assert!(msg.contains(flag), "names {flag}: {msg}");
    assert!(msg.contains(reason), "says why ({reason}): {msg}");
    assert_eq!(p.stats().retries, 0, "never retried: {:?}", p.stats());
    assert!(
        matches!(
            p.state(),
            trickle::publisher::PublisherState::Terminal { .. }
        ),
        "terminal at once: {:?}",
        p.state()
    );
    assert!(matches!(
        p.next_segment().await,
        Err(PublishError::Terminal { .. })
    ));

    let mut sub = Subscriber::new(url, patient_subscriber(tls));
    let err = within("refused subscriber", sub.next_segment())
        .await
        .err()
        .expect("a refused certificate cannot subscribe");
    let msg = err.to_string();
    assert!(matches!(err, SubscribeError::Tls { .. }), "{err:?}");
    assert!(msg.contains(flag) && msg.contains(reason), "{msg}");
    assert_eq!(sub.stats().retries, 0, "never retried: {:?}", sub.stats());
    // Both retry delays are 5 s: failing well within one proves no retry happened.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "failed at once, not after retries: {:?}",
        started.elapsed()
    );
}

/// Our self-signed server, and a client in the mode `tls` makes (given a scratch folder):
/// refused at once, naming `flag` and `reason` (see [`assert_refused`]).
async fn self_signed_server_refuses(
    tls: impl FnOnce(&Path) -> ClientTls,
    flag: &str,
    reason: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = https_server(dir.path()).await;
    let name = random_channel_name();
    server.channels().create(&name, None).unwrap();
    let url = format!("{}/{name}", server.url());
    assert_refused(&url, tls(dir.path()), flag, reason).await;
    server.shutdown().await;
}

/// Trust only `pem` (written to `dir`), as `--trickle-ca` does.
fn pinned(dir: &Path, pem: &str) -> ClientTls {
    let path = dir.join("pinned.pem");
    std::fs::write(&path, pem).unwrap();
    ClientTls::from_ca_file(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_another_ca_is_refused_with_a_clear_error_at_once() {
    // Another CA's certificate (another issuer name).
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let tls = |dir: &Path| pinned(dir, &other.cert.pem());
    self_signed_server_refuses(tls, "--trickle-ca", "not among the trusted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_regenerated_since_it_was_pinned_is_refused_saying_so() {
    // What a restarted `serve --tls-self-signed` would present: same names, another key.
    let earlier = tls::ServerTls::self_signed(&["127.0.0.1".into()], &[]).unwrap();
    let tls = |dir: &Path| pinned(dir, &earlier.cert_pem());
    self_signed_server_refuses(tls, "--trickle-ca", "regenerated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_system_roots_refuses_a_self_signed_server() {
    let tls = |_: &Path| ClientTls::SystemRoots;
    self_signed_server_refuses(tls, "--trickle-verify-tls", "not among the trusted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_certificate_for_another_name_is_refused_naming_the_names() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate for another host only, pinned: the issuer is trusted, the name is not.
    let tls = tls::ServerTls::self_signed(&["trickle.example".into()], &[]).unwrap();
    let client = pinned(dir.path(), &tls.cert_pem());
    let server = bind_tls(tls).await;
    let url = format!("{}/{}", server.url(), random_channel_name());
    assert_refused(&url, client, "--trickle-ca", "trickle.example").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = https_server(dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET /x/0 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    within("plain answer", s.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains("https://"), "{out}");
    // And the server still serves TLS clients.
    assert_eq!(
        round_trip(&server, "127.0.0.1", ClientTls::AnyCertificate, 3)
            .await
            .len(),
        3
    );
    server.shutdown().await;
}

/// A TLS connection to `addr` (as 127.0.0.1) trusting only the certificates in `ca`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls::load_ca(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_certificate_serves_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let write = |name: &str| {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let pinned = dir.path().join(name);
        std::fs::write(&pinned, ck.cert.pem()).unwrap();
        pinned
    };
    let old = write("old.pem");
    let tls = tls::ServerTls::from_pem_files(&cert, &key, &[b"http/1.1"]).unwrap();
    let server = bind_tls(tls.clone()).await;
    round_trip(
        &server,
        "127.0.0.1",
        ClientTls::from_ca_file(&old).unwrap(),
        2,
    )
    .await;
    let ch = random_channel_name();
    server.channels().create(&ch, None).unwrap();
    // A connection made before the reload, on the old certificate.
    let mut open = tls_connect(server.local_addr(), &old)
        .await
        .expect("TLS handshake");
    let new = write("new.pem");
    let before = tls.fingerprint();
    let after = tls.reload().unwrap().expect("files reload");
    assert_ne!(before, after);
    assert_eq!(
        round_trip(
            &server,
            "127.0.0.1",
            ClientTls::from_ca_file(&new).unwrap(),
            2
        )
        .await
        .len(),
        2
    );
    // A new connection trusting only the old certificate is refused. (Checked on a raw
    // connection: this process's trickle clients keep their keep-alive connection to the
    // server, opened before the reload and so rightly still on the old certificate.)
    let refused = tls_connect(server.local_addr(), &old).await;
    assert!(
        refused.is_err(),
        "the old certificate is no longer served on new connections"
    );
    tls_connect(server.local_addr(), &new)
        .await
        .expect("the new certificate is served on new connections");
    // The connection made before the reload is still served.
    let request = format!("GET /{ch}/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    open.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("old connection", open.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    server.shutdown().await;
}
