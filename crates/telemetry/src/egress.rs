//! Which egress the client uses, and the opt-outs, from environment variables.
//!
//! Both are pure functions over an env lookup (`Fn(&str) -> Option<String>`), testable without
//! touching the process environment; the `*_from_env` variants read the real one.
//!
//! Opt-out, first match wins ("in that precedence"):
//! 1. `SCOPE_TELEMETRY_DISABLED` set to a non-empty value: it alone decides. Truthy
//!    (`1`, `true`, `yes`, `on`, any case) turns telemetry off; anything else (`0`, `false`) keeps it
//!    on, even when `DO_NOT_TRACK=1`.
//! 2. `DO_NOT_TRACK` truthy: off.
//! 3. Otherwise on.
//!
//! Egress, first match wins (`docs/telemetry.md`), after the opt-out:
//! 1. `SCOPE_TELEMETRY_LOG_SINK` set (non-empty): [`Egress::Log`].
//! 2. `SCOPE_CLOUD_API_KEY` set (non-empty) and `SCOPE_METRICS_ENABLED` not `false` (any case):
//!    [`Egress::HttpReporter`].
//! 3. `KAFKA_BOOTSTRAP_SERVERS` set (non-empty): [`Egress::Kafka`].
//! 4. Otherwise [`Egress::None`].
//!
//! "Set" means present with a non-empty value (after trimming), as the seed's `if os.getenv(..):`.

use serde::Serialize;

/// The client's egress for relayed telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// One log line per event (`SCOPE_TELEMETRY_LOG_SINK`).
    Log,
    /// Batches to `POST /v1/metrics` (`SCOPE_CLOUD_API_KEY`).
    HttpReporter,
    /// A Kafka producer (`KAFKA_BOOTSTRAP_SERVERS`).
    Kafka,
    /// Nothing configured: publishing is a no-op.
    None,
    /// Opted out: the named variable turned all telemetry off.
    Disabled {
        /// `SCOPE_TELEMETRY_DISABLED` or `DO_NOT_TRACK`.
        by: &'static str,
    },
}

impl Egress {
    /// A short name for logs: `log`, `http_reporter`, `kafka`, `none`, `disabled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Egress::Log => "log",
            Egress::HttpReporter => "http_reporter",
            Egress::Kafka => "kafka",
            Egress::None => "none",
            Egress::Disabled { .. } => "disabled",
        }
    }
}

fn set(env: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// Which variable opts telemetry out, if any (see the module docs for the precedence).
pub fn opted_out_by(env: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    if let Some(v) = set(&env, "SCOPE_TELEMETRY_DISABLED") {
        return truthy(&v).then_some("SCOPE_TELEMETRY_DISABLED");
    }
    match set(&env, "DO_NOT_TRACK") {
        Some(v) if truthy(&v) => Some("DO_NOT_TRACK"),
        _ => None,
    }
}

/// Whether telemetry is on under `env`.
pub fn telemetry_enabled(env: impl Fn(&str) -> Option<String>) -> bool {
    opted_out_by(env).is_none()
}

/// Whether telemetry is on under the process environment.
pub fn telemetry_enabled_from_env() -> bool {
    telemetry_enabled(process_env)
}

/// The egress selected by `env` (see the module docs for the order).
pub fn select(env: impl Fn(&str) -> Option<String>) -> Egress {
    if let Some(by) = opted_out_by(&env) {
        return Egress::Disabled { by };
    }
    if set(&env, "SCOPE_TELEMETRY_LOG_SINK").is_some() {
        return Egress::Log;
    }
    if set(&env, "SCOPE_CLOUD_API_KEY").is_some() {
        let metrics_off =
            set(&env, "SCOPE_METRICS_ENABLED").is_some_and(|v| v.eq_ignore_ascii_case("false"));
        if !metrics_off {
            return Egress::HttpReporter;
        }
    }
    if set(&env, "KAFKA_BOOTSTRAP_SERVERS").is_some() {
        return Egress::Kafka;
    }
    Egress::None
}

/// The egress selected by the process environment.
pub fn select_from_env() -> Egress {
    select(process_env)
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// An environment given as `(name, value)` pairs, for the `*_from_env_with` functions of this
/// project (here, the reporter's and the Kafka sink's configs) when the process environment is
/// not the one wanted: tests, embedders.
pub fn env_from_pairs<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        env_from_pairs(pairs)
    }

    #[test]
    fn egress_selection_table() {
        let cases: &[(&[(&str, &str)], Egress)] = &[
            (&[], Egress::None),
            (&[("SCOPE_TELEMETRY_LOG_SINK", "1")], Egress::Log),
            (&[("SCOPE_TELEMETRY_LOG_SINK", "")], Egress::None),
            (
                &[
                    ("SCOPE_TELEMETRY_LOG_SINK", "1"),
                    ("SCOPE_CLOUD_API_KEY", "k"),
                    ("KAFKA_BOOTSTRAP_SERVERS", "b:9092"),
                ],
                Egress::Log,
            ),
            (&[("SCOPE_CLOUD_API_KEY", "k")], Egress::HttpReporter),
            (
                &[
                    ("SCOPE_CLOUD_API_KEY", "k"),
                    ("SCOPE_METRICS_ENABLED", "true"),
                ],
                Egress::HttpReporter,
            ),
            (
                &[
                    ("SCOPE_CLOUD_API_KEY", "k"),
                    ("SCOPE_METRICS_ENABLED", "FALSE"),
                ],
                Egress::None,
            ),
            (
                &[
                    ("SCOPE_CLOUD_API_KEY", "k"),
                    ("SCOPE_METRICS_ENABLED", "false"),
                    ("KAFKA_BOOTSTRAP_SERVERS", "b:9092"),
                ],
                Egress::Kafka,
            ),
            (
                &[
                    ("SCOPE_CLOUD_API_KEY", "k"),
                    ("KAFKA_BOOTSTRAP_SERVERS", "b:9092"),
                ],
                Egress::HttpReporter,
            ),
            (&[("KAFKA_BOOTSTRAP_SERVERS", "b:9092")], Egress::Kafka),
            (&[("KAFKA_BOOTSTRAP_SERVERS", "  ")], Egress::None),
            (
                &[
                    ("SCOPE_TELEMETRY_DISABLED", "1"),
                    ("SCOPE_TELEMETRY_LOG_SINK", "1"),
                ],
                Egress::Disabled {
                    by: "SCOPE_TELEMETRY_DISABLED",
                },
            ),
            (
                &[("DO_NOT_TRACK", "1"), ("KAFKA_BOOTSTRAP_SERVERS", "b:9092")],
                Egress::Disabled { by: "DO_NOT_TRACK" },
            ),
            (
                &[("DO_NOT_TRACK", "true"), ("SCOPE_TELEMETRY_DISABLED", "1")],
                Egress::Disabled {
                    by: "SCOPE_TELEMETRY_DISABLED",
                },
            ),
            // SCOPE_TELEMETRY_DISABLED takes precedence: an explicit 0 keeps telemetry on.
            (
                &[
                    ("SCOPE_TELEMETRY_DISABLED", "0"),
                    ("DO_NOT_TRACK", "1"),
                    ("SCOPE_TELEMETRY_LOG_SINK", "1"),
                ],
                Egress::Log,
            ),
            (
                &[("DO_NOT_TRACK", "0"), ("SCOPE_TELEMETRY_LOG_SINK", "1")],
                Egress::Log,
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(select(env(pairs)), *want, "env {pairs:?}");
        }
    }

    #[test]
    fn opt_out_precedence() {
        assert!(telemetry_enabled(env(&[])));
        assert!(!telemetry_enabled(env(&[(
            "SCOPE_TELEMETRY_DISABLED",
            "1"
        )])));
        assert!(!telemetry_enabled(env(&[(
            "SCOPE_TELEMETRY_DISABLED",
            "TRUE"
        )])));
        assert!(!telemetry_enabled(env(&[("DO_NOT_TRACK", "1")])));
        assert!(telemetry_enabled(env(&[("DO_NOT_TRACK", "")])));
        assert!(telemetry_enabled(env(&[
            ("SCOPE_TELEMETRY_DISABLED", "false"),
            ("DO_NOT_TRACK", "1")
        ])));
        assert_eq!(
            opted_out_by(env(&[
                ("SCOPE_TELEMETRY_DISABLED", "yes"),
                ("DO_NOT_TRACK", "1")
            ])),
            Some("SCOPE_TELEMETRY_DISABLED")
        );
    }
}
