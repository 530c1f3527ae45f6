//! Envelope shape, forwarded-envelope byte fidelity, and parsing of untrusted bytes.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};
use telemetry::{Envelope, EnvelopeError, ErrorInfo, Event, Fields, Priority, RawEnvelope};

fn to_value(e: &Envelope) -> Value {
    serde_json::from_slice(&e.to_json()).expect("envelope JSON parses")
}

/// Keys of the object at `path` (top level when empty), in the order they appear in `bytes`.
fn ordered_keys(bytes: &[u8], path: &[&str]) -> Vec<String> {
    struct Ordered(Vec<(String, Box<serde_json::value::RawValue>)>);
    impl<'de> serde::Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Ordered, A::Error> {
                    let mut v = Vec::new();
                    while let Some(e) = m.next_entry()? {
                        v.push(e);
                    }
                    Ok(Ordered(v))
                }
            }
            d.deserialize_map(V)
        }
    }
    let mut cur: Ordered = serde_json::from_slice(bytes).unwrap();
    for p in path {
        let raw = &cur.0.iter().find(|(k, _)| k == p).unwrap().1;
        cur = serde_json::from_str(raw.get()).unwrap();
    }
    cur.0.into_iter().map(|(k, _)| k).collect()
}

fn keys(v: &Value) -> Vec<String> {
    let bytes = serde_json::to_vec(v).unwrap();
    let mut k = ordered_keys(&bytes, &[]);
    k.sort();
    k
}

#[test]
fn envelope_has_exactly_the_spec_shape_with_all_fields() {
    let fields = Fields::new()
        .session_id("sess-1")
        .connection_id("conn-1")
        .pipeline_ids(["longlive", "rife"])
        .user_id("user-1")
        .error(ErrorInfo::new(
            "pipeline_load_failed",
            "CUDA OOM",
            "RuntimeError",
            false,
        ))
        .connection_info(json!({"gpu_type": "H100", "region": "us-east"}))
        .meta("startup_ms", 1234)
        .meta("mode", "video");
    let env = Envelope::new("error", fields);
    let raw = env.to_json();
    let text = std::str::from_utf8(&raw).unwrap();
    let v = to_value(&env);

    // Top-level key order and set, and data key order, as the seed writes them.
    assert_eq!(ordered_keys(&raw, &[]), ["id", "type", "timestamp", "data"]);
    assert_eq!(
        ordered_keys(&raw, &["data"]),
        [
            "type",
            "client_source",
            "timestamp",
            "session_id",
            "connection_id",
            "pipeline_ids",
            "user_id",
            "error",
            "connection_info",
            "startup_ms",
            "mode"
        ]
    );
    assert_eq!(v["type"], "stream_trace");
    assert_eq!(v["data"]["type"], "error");
    assert_eq!(v["data"]["client_source"], "scope");
    assert_eq!(v["data"]["pipeline_ids"], json!(["longlive", "rife"]));
    assert_eq!(
        v["data"]["error"],
        json!({"error_type": "pipeline_load_failed", "message": "CUDA OOM",
               "exception_type": "RuntimeError", "recoverable": false})
    );
    assert_eq!(v["data"]["connection_info"]["gpu_type"], "H100");
    assert_eq!(v["data"]["startup_ms"], 1234);
    // Compact JSON, one line.
    assert!(!text.contains('\n'));
    assert!(text.starts_with(r#"{"id":""#), "{text}");
}

#[test]
fn timestamps_are_the_same_unix_ms_decimal_string_in_both_places() {
    let before = telemetry::now_ms();
    let env = Envelope::new("stream_started", Fields::new());
    let after = telemetry::now_ms();
    let v = to_value(&env);
    let ts = v["timestamp"].as_str().expect("timestamp is a string");
    assert_eq!(v["data"]["timestamp"].as_str(), Some(ts));
    assert!(ts.bytes().all(|b| b.is_ascii_digit()), "{ts}");
    let ms: u64 = ts.parse().unwrap();
    assert!(before <= ms && ms <= after, "{before} <= {ms} <= {after}");
    assert_eq!(ms, env.timestamp_ms());
}

#[test]
fn id_is_a_fresh_lowercase_uuid_v4() {
    let a = Envelope::new("stream_started", Fields::new());
    let b = Envelope::new("stream_started", Fields::new());
    assert_ne!(a.id(), b.id());
    let v = to_value(&a);
    let id = v["id"].as_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(parsed.get_version_num(), 4);
    assert_eq!(id, id.to_lowercase());
    assert_eq!(id.len(), 36);
    assert_eq!(Event::from(a.clone()).id(), id);
}

#[test]
fn empty_optionals_are_omitted() {
    let fields = Fields::new()
        .session_id("")
        .connection_id("")
        .user_id("")
        .pipeline_ids(Vec::<String>::new())
        .connection_info(json!({}));
    let json = Envelope::new("session_closed", fields).to_json();
    assert_eq!(
        ordered_keys(&json, &["data"]),
        ["type", "client_source", "timestamp"]
    );
    let json =
        Envelope::new("session_closed", Fields::new().connection_info(Value::Null)).to_json();
    assert_eq!(
        ordered_keys(&json, &["data"]),
        ["type", "client_source", "timestamp"]
    );
}

#[test]
fn metadata_cannot_override_reserved_keys() {
    let mut fields = Fields::new().session_id("real-session");
    for key in telemetry::RESERVED_DATA_KEYS {
        fields = fields.meta(key, "spoofed");
    }
    let fields = fields.meta("fps_in", 30.0);
    let env = Envelope::with_stamp(
        uuid::Uuid::new_v4(),
        1_700_000_000_123,
        "stream_heartbeat",
        fields,
    );
    let v = to_value(&env);
    assert_eq!(v["data"]["type"], "stream_heartbeat");
    assert_eq!(v["data"]["client_source"], "scope");
    assert_eq!(v["data"]["timestamp"], "1700000000123");
    assert_eq!(v["data"]["session_id"], "real-session");
    // Reserved keys not set by a typed field stay absent rather than taking the metadata value.
    for key in [
        "connection_id",
        "pipeline_ids",
        "user_id",
        "error",
        "connection_info",
    ] {
        assert!(v["data"].get(key).is_none(), "{key} leaked from metadata");
    }
    assert_eq!(v["data"]["fps_in"], 30.0);
    assert_eq!(keys(&v["data"]).len(), 5);
}

#[test]
fn reserved_key_check_matches_the_list() {
    for key in telemetry::RESERVED_DATA_KEYS {
        assert!(telemetry::envelope::is_reserved_data_key(key), "{key}");
    }
    for key in [
        "types",
        "Type",
        "",
        "session",
        "timestamp_ms",
        "errors",
        "id",
    ] {
        assert!(!telemetry::envelope::is_reserved_data_key(key), "{key}");
    }
}

#[test]
fn metadata_last_write_wins_in_place() {
    let fields = Fields::new()
        .meta("a", 1)
        .meta("b", 2)
        .meta("a", 3)
        .meta("c", 4)
        .meta("b", 5);
    assert_eq!(fields.get_meta("a"), Some(&Value::from(3)));
    let merged: Vec<(&str, &Value)> = fields.metadata().collect();
    assert_eq!(
        merged,
        [
            ("a", &Value::from(3)),
            ("b", &Value::from(5)),
            ("c", &Value::from(4))
        ]
    );
    assert_eq!(fields, Fields::new().meta("a", 3).meta("b", 5).meta("c", 4));
    let env = Envelope::new("stream_heartbeat", fields);
    let v = to_value(&env);
    assert_eq!(
        ordered_keys(&env.to_json(), &["data"])[3..],
        ["a", "b", "c"]
    );
    assert_eq!(v["data"]["a"], 3);
    assert_eq!(v["data"]["b"], 5);
    assert_eq!(serde_json::to_vec(&env).unwrap(), env.to_json().to_vec());
}

#[test]
fn priority_follows_the_event_type() {
    assert_eq!(
        Envelope::new("stream_heartbeat", Fields::new()).priority(),
        Priority::Low
    );
    assert_eq!(
        Envelope::new("session_closed", Fields::new()).priority(),
        Priority::High
    );
    assert_eq!(
        Envelope::new("custom_event", Fields::new()).priority(),
        Priority::High
    );
}

#[test]
fn a_built_envelope_reparses_as_raw_with_the_same_fields() {
    let env = Envelope::new(
        "stream_started",
        Fields::new()
            .session_id("s")
            .connection_id("c")
            .meta("x", 1),
    );
    let raw = RawEnvelope::parse(env.to_json()).unwrap();
    assert_eq!(raw.id(), env.id().to_string());
    assert_eq!(raw.event_type(), Some("stream_started"));
    assert_eq!(raw.session_id(), Some("s"));
    assert_eq!(raw.connection_id(), Some("c"));
    assert_eq!(
        raw.timestamp(),
        Some(env.timestamp_ms().to_string().as_str())
    );
    assert_eq!(raw.priority(), Priority::High);
    assert_eq!(raw.as_bytes(), &env.to_json());
}

const ODD: &str = "{ \"id\" : \"abc-1\",\n \"type\":\"stream_trace\", \"timestamp\": \"1700000000000\",\
 \"data\": {\"type\": \"stream_heartbeat\", \"session_id\": \"s\\u00e9\", \"fps\": 29.970000000000001,\
 \"nested\": {\"type\": \"inner\"}, \"big\": 123456789012345678901234567890}, \"extra\": [1, 2.50, null] }  \n";

#[test]
fn raw_envelope_keeps_every_original_byte() {
    let bytes = Bytes::from_static(ODD.as_bytes());
    let raw = RawEnvelope::parse(bytes.clone()).unwrap();
    assert_eq!(raw.as_bytes(), &bytes);
    assert_eq!(Event::Raw(raw.clone()).to_json(), bytes);
    let mut out = Vec::new();
    Event::Raw(raw.clone()).write_json(&mut out);
    assert_eq!(out, bytes.as_ref());
    assert_eq!(raw.id(), "abc-1");
    assert_eq!(raw.event_type(), Some("stream_heartbeat"));
    assert_eq!(raw.session_id(), Some("s\u{e9}"));
    assert_eq!(raw.connection_id(), None);
    assert_eq!(raw.priority(), Priority::Low);
}

#[test]
fn relay_annotations_are_spliced_inside_data_keeping_every_other_byte() {
    let bytes = Bytes::from_static(ODD.as_bytes());
    let mut raw = RawEnvelope::parse(bytes.clone()).unwrap();
    assert!(raw.annotate_relay("trickle", 1700000000123));
    let out = raw.as_bytes().clone();
    // `data` closes at the `}` before `, "extra"`: the annotations go right before it.
    let close = ODD.find("}, \"extra\"").unwrap();
    let added = br#","relayed_via":"trickle","relay_received_timestamp":"1700000000123""#;
    assert_eq!(&out[..close], &bytes[..close]);
    assert_eq!(&out[close..close + added.len()], added);
    assert_eq!(&out[close + added.len()..], &bytes[close..]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["data"]["relayed_via"], "trickle");
    assert_eq!(v["data"]["relay_received_timestamp"], "1700000000123");
    assert!(v.get("relayed_via").is_none(), "nothing at the top level");
    assert_eq!(raw.relayed_via(), Some("trickle"));
    assert_eq!(raw.relay_received_timestamp(), Some("1700000000123"));
    // Routed fields still read right after the splice moved the bytes.
    assert_eq!(raw.id(), "abc-1");
    assert_eq!(raw.session_id(), Some("s\u{e9}"));
    assert_eq!(raw.timestamp(), Some("1700000000000"));
    // A second hop keeps the first hop's annotations, never duplicates them.
    assert!(!raw.annotate_relay("other", 5));
    assert_eq!(raw.as_bytes(), &out);
    let mut again = RawEnvelope::parse(out.clone()).unwrap();
    assert_eq!(again.relayed_via(), Some("trickle"));
    assert_eq!(again.relay_received_timestamp(), Some("1700000000123"));
    assert!(!again.annotate_relayed_via("trickle"));
    assert_eq!(again.as_bytes(), &out);
}

#[test]
fn relay_annotations_move_the_fields_that_follow_data() {
    // The metrics API's event shape puts `id` and `timestamp` after `data`.
    let text = r#"{"type":"x","data":{"type":"y","session_id":"s"},"id":"abc","timestamp":"17"}"#;
    let mut raw = RawEnvelope::parse(Bytes::from_static(text.as_bytes())).unwrap();
    assert!(raw.annotate_relay("trickle", 9));
    assert_eq!(
        raw.as_bytes().as_ref(),
        br#"{"type":"x","data":{"type":"y","session_id":"s","relayed_via":"trickle","relay_received_timestamp":"9"},"id":"abc","timestamp":"17"}"#
    );
    assert_eq!(raw.id(), "abc");
    assert_eq!(raw.timestamp(), Some("17"));
    assert_eq!(raw.event_type(), Some("y"));
    assert_eq!(raw.session_id(), Some("s"));
}

#[test]
fn relay_annotations_in_empty_missing_and_odd_data() {
    let annotated = |text: &'static str| {
        let mut raw = RawEnvelope::parse(Bytes::from_static(text.as_bytes())).unwrap();
        let added = raw.annotate_relay("trickle", 7);
        (added, String::from_utf8(raw.as_bytes().to_vec()).unwrap())
    };
    assert_eq!(
        annotated(r#"{"id":"1","data":{ }}"#),
        (
            true,
            r#"{"id":"1","data":{ "relayed_via":"trickle","relay_received_timestamp":"7"}}"#.into()
        )
    );
    // No `data`: one is added, holding the two annotations.
    assert_eq!(
        annotated("{\"id\":\"1\"} \n"),
        (
            true,
            "{\"id\":\"1\",\"data\":{\"relayed_via\":\"trickle\",\"relay_received_timestamp\":\"7\"}} \n"
                .into()
        )
    );
    // A `data` that is not an object cannot carry them: left as it is.
    assert_eq!(
        annotated(r#"{"id":"1","data":"text"}"#),
        (false, r#"{"id":"1","data":"text"}"#.into())
    );
    // Only the missing one is added; a non-string `relayed_via` is kept, not duplicated.
    assert_eq!(
        annotated(r#"{"id":"1","data":{"relayed_via":5}}"#),
        (
            true,
            r#"{"id":"1","data":{"relayed_via":5,"relay_received_timestamp":"7"}}"#.into()
        )
    );
    // Strings, braces and escapes inside `data` (and an escaped key) do not fool the splice.
    assert_eq!(
        annotated(r#"{"d\u0061ta":{"s":"}\"{","a":[{"b":"]"}]},"id":"1"}"#),
        (
            true,
            r#"{"d\u0061ta":{"s":"}\"{","a":[{"b":"]"}],"relayed_via":"trickle","relay_received_timestamp":"7"},"id":"1"}"#
                .into()
        )
    );
    // A top-level `relayed_via` (from an older relay) is just another member.
    let (added, text) = annotated(r#"{"id":"1","data":{"type":"x"},"relayed_via":"trickle"}"#);
    assert!(added);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"]["relayed_via"], "trickle");
}

#[test]
fn generic_annotation_refuses_existing_keys() {
    let mut raw = RawEnvelope::parse(Bytes::from_static(
        br#"{"id":"1","data":{"type":"x"},"hop":1}"#,
    ))
    .unwrap();
    assert_eq!(
        raw.annotate("hop", &json!(2)),
        Err(EnvelopeError::AnnotationExists("hop".into()))
    );
    assert_eq!(
        raw.annotate("id", &json!("2")),
        Err(EnvelopeError::AnnotationExists("id".into()))
    );
    raw.annotate("received_ms", &json!(5)).unwrap();
    assert_eq!(
        raw.as_bytes().as_ref(),
        br#"{"id":"1","data":{"type":"x"},"hop":1,"received_ms":5}"#
    );
}

#[test]
fn from_raw_value_keeps_the_exact_text() {
    let text = r#"{"id":"q", "data": {"type":"pong"} }"#;
    let rv = serde_json::value::RawValue::from_string(text.to_owned()).unwrap();
    let raw = RawEnvelope::from_raw_value(rv).unwrap();
    assert_eq!(raw.as_bytes().as_ref(), text.as_bytes());
}

#[test]
fn parse_rejects_what_is_not_a_forwardable_envelope() {
    let cases: &[&[u8]] = &[
        b"",
        b"   ",
        b"[]",
        b"\"id\"",
        b"42",
        b"null",
        b"{",
        b"{\"id\":\"a\"} trailing",
        b"{\"id\":\"a\"}{\"id\":\"b\"}",
        b"\xff\xfe",
        b"{\"id\":\"\xff\"}",
    ];
    for c in cases {
        let r = RawEnvelope::parse(Bytes::copy_from_slice(c));
        assert!(
            matches!(r, Err(EnvelopeError::Invalid(_))),
            "{:?} -> {r:?}",
            String::from_utf8_lossy(c)
        );
    }
    for c in [
        &br#"{}"#[..],
        br#"{"data":{"type":"x"}}"#,
        br#"{"id":""}"#,
        br#"{"id":7}"#,
        br#"{"id":null}"#,
        br#"{"id":{"a":1}}"#,
    ] {
        assert_eq!(
            RawEnvelope::parse(Bytes::copy_from_slice(c)),
            Err(EnvelopeError::MissingId)
        );
    }
    assert_eq!(
        RawEnvelope::parse(Bytes::from_static(br#"{"id":"a","id":"b"}"#)),
        Err(EnvelopeError::DuplicateKey("id"))
    );
    assert_eq!(
        RawEnvelope::parse(Bytes::from_static(
            br#"{"id":"a","data":{"type":"x","type":"y"}}"#
        )),
        Err(EnvelopeError::DuplicateKey("data.type"))
    );
}

#[test]
fn parse_is_lenient_about_optional_fields() {
    let raw = RawEnvelope::parse(Bytes::from_static(
        br#"{"id":"a","timestamp":1700,"data":[1,{"type":"x"}]}"#,
    ))
    .unwrap();
    assert_eq!(raw.timestamp(), Some("1700"));
    assert_eq!(raw.event_type(), None);
    assert_eq!(raw.priority(), Priority::High);
    let raw = RawEnvelope::parse(Bytes::from_static(
        br#"{"id":"a","data":{"type":5,"session_id":["s"]}}"#,
    ))
    .unwrap();
    assert_eq!(raw.event_type(), None);
    assert_eq!(raw.session_id(), None);
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    let mut s = String::from(r#"{"id":"a","data":"#);
    s.push_str(&"[".repeat(100_000));
    let r = RawEnvelope::parse(Bytes::from(s));
    assert!(matches!(r, Err(EnvelopeError::Invalid(_))));
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".*".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(".*", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hand_written_json_matches_serde_byte_for_byte(
        event_type in "\\PC{0,20}",
        session in "[a-z\\x00-\\x1f\"\\\\\u{e9}\u{2028}]{0,12}",
        pipelines in prop::collection::vec("\\PC{0,8}", 0..3),
        with_error in any::<bool>(),
        info in prop::option::of(json_value()),
        meta in prop::collection::vec(("[ab_\"\\\\]{1,3}", json_value()), 0..8),
    ) {
        let mut fields = Fields::new().session_id(session.clone()).pipeline_ids(pipelines).user_id(session);
        if with_error {
            fields = fields.error(ErrorInfo::new("e\"t", "line\nbreak", "ValueError", true));
        }
        if let Some(info) = info {
            fields = fields.connection_info(info);
        }
        for (k, v) in meta {
            fields = fields.meta(k, v);
        }
        let env = Envelope::new(&event_type, fields);
        let via_serde = serde_json::to_vec(&env).unwrap();
        let by_hand = env.to_json();
        prop_assert_eq!(by_hand.as_ref(), via_serde.as_slice());
        prop_assert!(serde_json::from_slice::<Value>(&via_serde).is_ok());
    }

    #[test]
    fn parse_of_random_bytes_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = RawEnvelope::parse(Bytes::from(data));
    }

    #[test]
    fn parse_of_mutated_envelopes_never_panics(
        cut in 0usize..400, flip in 0usize..400, byte in any::<u8>()
    ) {
        let mut b = Envelope::new("stream_heartbeat", Fields::new().session_id("s").meta("fps", 30.5))
            .to_json()
            .to_vec();
        if !b.is_empty() {
            let i = flip % b.len();
            b[i] = byte;
            b.truncate(cut.max(1).min(b.len()));
        }
        if let Ok(mut raw) = RawEnvelope::parse(Bytes::from(b)) {
            // Whatever parsed must still be valid JSON after annotation, with the same id.
            let id = raw.id().to_owned();
            raw.annotate_relayed_via("trickle");
            prop_assert!(serde_json::from_slice::<Value>(raw.as_bytes()).is_ok());
            let again = RawEnvelope::parse(raw.as_bytes().clone()).unwrap();
            prop_assert_eq!(again.id(), id.as_str());
        }
    }

    #[test]
    fn any_object_with_an_id_round_trips_byte_for_byte(
        id in "[^\"\\\\]{1,40}", extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..6),
        pretty in any::<bool>()
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in extra { obj.insert(k, v); }
        obj.insert("id".into(), Value::from(id.clone()));
        let data_is_object = match obj.get("data") {
            Some(Value::Object(d)) => !d.contains_key("relayed_via") && !d.contains_key("relay_received_timestamp"),
            Some(_) => false,
            None => true,
        };
        let v = Value::Object(obj);
        let text = if pretty { serde_json::to_vec_pretty(&v).unwrap() } else { serde_json::to_vec(&v).unwrap() };
        let bytes = Bytes::from(text);
        let mut raw = RawEnvelope::parse(bytes.clone()).unwrap();
        prop_assert_eq!(raw.as_bytes(), &bytes);
        prop_assert_eq!(raw.id(), id.as_str());
        let mut original: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(raw.annotate_relay("trickle", 42), data_is_object);
        let back: Value = serde_json::from_slice(raw.as_bytes()).unwrap();
        if data_is_object {
            // Exactly the two annotations were added inside `data`; everything else is equal.
            let data = original.as_object_mut().unwrap().entry("data").or_insert_with(|| json!({}));
            data["relayed_via"] = Value::from("trickle");
            data["relay_received_timestamp"] = Value::from("42");
        }
        prop_assert_eq!(back, original);
    }
}
