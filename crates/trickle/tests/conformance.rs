//! Replays the reference server's recorded conformance scenarios (`data/trickle-server.json`,
//! 79 responses from go-livepeer) against our server, exactly as `shared/conformance/check.py`
//! does, and requires every response to match.

use bytes::Bytes;
use futures::channel::mpsc;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use trickle::server::{random_channel_name, Channels, Server, ServerConfig};

mod common;
use common::until;

const NORMATIVE: [&str; 3] = ["lp-trickle-seq", "lp-trickle-latest", "lp-trickle-closed"];

type Gate = mpsc::UnboundedSender<Result<Bytes, std::io::Error>>;

#[derive(Default)]
struct Shared {
    results: Mutex<HashMap<String, Value>>,
    gates: Mutex<HashMap<String, Option<Gate>>>,
}

/// One request of a scenario; records what check.py records.
async fn do_req(
    client: reqwest::Client,
    base: String,
    chan: String,
    name: String,
    req: Value,
    shared: Arc<Shared>,
) {
    let method = reqwest::Method::from_bytes(req["method"].as_str().unwrap().as_bytes()).unwrap();
    let path = req["path"].as_str().unwrap().to_string();
    let url = format!("{base}{}", path.replace("{ch}", &chan));
    let mut rb = client.request(method.clone(), url);
    if let Some(headers) = req.get("headers").and_then(Value::as_object) {
        for (k, v) in headers {
            rb = rb.header(k.as_str(), v.as_str().unwrap());
        }
    }
    if req.get("chunks").is_some() {
        let (tx, rx) = mpsc::unbounded();
        shared.gates.lock().insert(name.clone(), Some(tx));
        rb = rb.body(reqwest::Body::wrap_stream(rx));
    } else if let Some(body) = req.get("body").and_then(Value::as_str) {
        rb = rb.body(body.to_string());
    }
    let timeout =
        Duration::from_secs_f64(req.get("timeout_s").and_then(Value::as_f64).unwrap_or(15.0));
    let is_get = method == reqwest::Method::GET;
    let fut = async move {
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        let mut headers = Map::new();
        for k in NORMATIVE {
            if let Some(v) = resp.headers().get(k) {
                headers.insert(k.to_string(), json!(v.to_str().unwrap_or_default()));
            }
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let body = resp.bytes().await?;
        let mut rec = json!({
            "status": status,
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        if status == 200 && is_get && !path.ends_with("/next") {
            if let Some(ct) = content_type {
                rec["content_type"] = json!(ct);
            }
        }
        Ok::<Value, reqwest::Error>(rec)
    };
    let rec = match tokio::time::timeout(timeout, fut).await {
        Err(_) => json!({"timeout": true}),
        Ok(Err(_)) => json!({"disconnected": true}),
        Ok(Ok(rec)) => rec,
    };
    shared.results.lock().insert(name, rec);
}

async fn wait_gate(shared: &Shared, name: &str) {
    while !shared.gates.lock().contains_key(name) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Requests holding one of `chan`'s segments (readers and writers), and the bytes it holds.
fn activity(channels: &Channels, chan: &str) -> (usize, u64) {
    channels.segments(chan).map_or((0, 0), |segs| {
        segs.iter()
            .fold((0, 0), |(n, b), s| (n + s.readers + s.writers, b + s.bytes))
    })
}

/// How long a step may wait for the server to reach the state the next step needs.
const STEP: Duration = Duration::from_secs(10);

/// Runs one scenario's steps; returns each request's record.
///
/// The recording was made with fixed pauses (a background request, then 150 ms; a chunk or the
/// end of a body, then 100 ms). Here each step waits for what the pause stood for instead, seen
/// at the server: a background request holds one of the channel's segments (or already has its
/// answer), a chunk is stored, a finished body's POST is answered.
async fn run_scenario(
    client: reqwest::Client,
    base: String,
    channels: Channels,
    sc: Value,
) -> HashMap<String, Value> {
    let chan = format!("t{}", &random_channel_name()[..10]);
    let answered = |shared: &Shared, name: &str| shared.results.lock().contains_key(name);
    let shared = Arc::new(Shared::default());
    let mut tasks = HashMap::new();
    for (i, st) in sc["steps"].as_array().unwrap().iter().enumerate() {
        if let Some(req) = st.get("req") {
            let name = st
                .get("as")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("r{i}"));
            let fut = do_req(
                client.clone(),
                base.clone(),
                chan.clone(),
                name.clone(),
                req.clone(),
                shared.clone(),
            );
            if st
                .get("background")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                let (held, _) = activity(&channels, &chan);
                tasks.insert(name.clone(), tokio::spawn(fut));
                until(&format!("{name} at the server"), STEP, || {
                    activity(&channels, &chan).0 > held || answered(&shared, &name)
                })
                .await;
            } else {
                fut.await;
            }
        } else if let Some(chunk) = st.get("chunk") {
            let name = chunk[0].as_str().unwrap();
            let text = chunk[1].as_str().unwrap().to_string();
            wait_gate(&shared, name).await;
            let (_, stored) = activity(&channels, &chan);
            let len = text.len() as u64;
            if let Some(Some(tx)) = shared.gates.lock().get(name) {
                let _ = tx.unbounded_send(Ok(Bytes::from(text)));
            }
            until(&format!("{name}'s chunk stored"), STEP, || {
                activity(&channels, &chan).1 >= stored + len || answered(&shared, name)
            })
            .await;
        } else if let Some(name) = st.get("finish").and_then(Value::as_str) {
            wait_gate(&shared, name).await;
            // Dropping the sender ends the streamed body.
            if let Some(slot) = shared.gates.lock().get_mut(name) {
                slot.take();
            }
            until(&format!("{name} answered"), STEP, || {
                answered(&shared, name)
            })
            .await;
        } else if let Some(ms) = st.get("sleep_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else if let Some(name) = st.get("await").and_then(Value::as_str) {
            if let Some(task) = tasks.remove(name) {
                task.await.unwrap();
            }
        }
    }
    for (_, task) in tasks {
        task.await.unwrap();
    }
    let results = shared.results.lock().clone();
    results
}

/// check.py's comparison, field for field.
fn matches(got: Option<&Value>, exp: &Value) -> bool {
    let Some(g) = got else { return false };
    g.get("timeout") == exp.get("timeout")
        && g.get("disconnected") == exp.get("disconnected")
        && g.get("status") == exp.get("status")
        && g.get("headers") == exp.get("headers")
        && (exp.get("status") != Some(&json!(200)) || g.get("body") == exp.get("body"))
        && g.get("content_type") == exp.get("content_type")
}

/// Replays every scenario against `server` with `client`; fails on any mismatch.
async fn replay(server: Server, client: reqwest::Client) {
    let doc: Value = serde_json::from_str(include_str!("data/trickle-server.json")).unwrap();
    let scenarios = doc["scenarios"].as_array().unwrap().clone();
    let mut set = tokio::task::JoinSet::new();
    for sc in scenarios.iter().cloned() {
        let (client, base, channels) = (client.clone(), server.url(), server.channels());
        set.spawn(async move {
            let name = sc["name"].as_str().unwrap().to_string();
            let got = run_scenario(client, base, channels, sc.clone()).await;
            (name, sc, got)
        });
    }
    let (mut total, mut passed) = (0, 0);
    let mut failures = Vec::new();
    while let Some(r) = set.join_next().await {
        let (name, sc, got) = r.unwrap();
        for (req, exp) in sc["expect"].as_object().unwrap() {
            total += 1;
            if matches(got.get(req), exp) {
                passed += 1;
            } else {
                failures.push(format!(
                    "FAIL {name}.{req}:\n  expected {exp}\n  got      {}",
                    got.get(req).map_or("nothing".to_string(), Value::to_string)
                ));
            }
        }
    }
    server.shutdown().await;
    for f in &failures {
        eprintln!("{f}");
    }
    eprintln!("{passed} of {total} recorded responses match");
    assert_eq!(total, 79, "the recording holds 79 responses");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_recorded_reference_responses_match() {
    let config = ServerConfig {
        autocreate: true,
        ..Default::default()
    };
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    replay(server, reqwest::Client::new()).await;
}

/// The same 79 responses from our server over HTTPS (a self-signed certificate, pinned by the
/// client): TLS changes nothing a client can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_recorded_reference_responses_match_over_https() {
    let tls = tls::ServerTls::self_signed(&["127.0.0.1".into()], &[b"http/1.1"]).unwrap();
    let cert = reqwest::Certificate::from_pem(tls.cert_pem().as_bytes()).unwrap();
    let config = ServerConfig {
        autocreate: true,
        tls: Some(tls),
        ..Default::default()
    };
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .build()
        .unwrap();
    replay(server, client).await;
}
