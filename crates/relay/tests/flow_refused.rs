//! A runner that numbers its lines but does not know our `telemetry_flow` report answers it as
//! Scope's runner answers any unknown type (`error {"error": "Unknown message type: ..."}`): the
//! client then stops sending it, for the rest of the session. Real trickle server on loopback,
//! real client; the runner side is played here with the trickle crate's writer and reader.

use serde_json::{json, Value};
use std::time::Duration;
use telemetry::{Envelope, Event, Fields};
use trickle::jsonl::{JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions};
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::server::{Server, ServerConfig};
use trickle::subscriber::{Subscriber, SubscriberOptions};

/// `{"type":"telemetry","seq":N,"event":<envelope>}`, as our runner writes it.
fn numbered(seq: u64) -> Value {
    let event = Event::from(Envelope::new(
        "stream_heartbeat",
        Fields::new().meta("i", seq),
    ));
    let envelope: Value = serde_json::from_slice(&event.to_json()).expect("envelope is JSON");
    json!({"type": "telemetry", "seq": seq, "event": envelope})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_answers_telemetry_flow_with_error_is_not_sent_it_again() {
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            autocreate: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (control_url, events_url) = (
        format!("{}/flow-control", server.url()),
        format!("{}/flow-events", server.url()),
    );
    for url in [&control_url, &events_url] {
        relay::client::create_channel(url).await.unwrap();
    }
    let events = JsonlWriter::new(
        Publisher::new(&events_url, PublisherOptions::default()),
        JsonlWriterOptions::default(),
    );
    let mut control = JsonlReader::new(
        Subscriber::new(
            &control_url,
            SubscriberOptions {
                start_seq: 0,
                ..SubscriberOptions::default()
            },
        ),
        JsonlReaderOptions::default(),
    );
    let mut config = relay::client::ClientConfig::new(&control_url, &events_url);
    config.events_start_seq = 0;
    config.ping_interval = Duration::from_secs(3600);
    let client = relay::client::Client::connect(config, None);

    // Scope's runner_ready (no `telemetry_flow: true`), then numbered lines.
    events
        .write(&json!({"type": "runner_ready", "runner_job_id": "scope"}))
        .await
        .unwrap();
    events.write(&numbered(1)).await.unwrap();

    // The first report arrives; the runner answers it as Scope's runner does.
    let first: Value = tokio::time::timeout(Duration::from_secs(10), control.next())
        .await
        .expect("a telemetry_flow report within 10 s")
        .unwrap()
        .expect("a control message");
    assert_eq!(first["type"], "telemetry_flow", "{first}");
    assert_eq!(first["read_seq"], 1, "{first}");
    events
        .write(&json!({"type": "error", "request_id": null,
                       "error": "Unknown message type: telemetry_flow"}))
        .await
        .unwrap();

    // More lines, over many report intervals (100 ms): no report follows.
    for seq in 2..=20 {
        events.write(&numbered(seq)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.report().read_seq < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            client.report()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let more = tokio::time::timeout(Duration::from_millis(500), control.next::<Value>()).await;
    assert!(more.is_err(), "nothing more on control: {more:?}");
    let report = client.report();
    assert_eq!(report.flow_reports, 1, "{report:?}");
    assert_eq!(report.lost_in_transit, 0, "{report:?}");
    assert_eq!(
        report.unknown_messages, 0,
        "the error is not an unknown message"
    );

    events.close().await.unwrap();
    let report = client.close(Duration::from_secs(5)).await;
    assert_eq!(report.flow_reports, 1, "{report:?}");
    assert_eq!(report.telemetry_received, 20, "{report:?}");
    server.shutdown().await;
}
