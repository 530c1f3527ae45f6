//! [`ReporterConfig`]: the spec's environment variables, plus knobs tests and operators need.

use spool::SpoolOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The metrics API endpoint used when `DAYDREAM_METRICS_URL` is unset (the seed's).
pub const DEFAULT_URL: &str = "https://api.daydream.monster/v1/metrics";
/// Most events in one request (the API's limit).
pub const MAX_BATCH_EVENTS: usize = 500;
/// Most bytes in one (uncompressed) request body (the API's limit).
pub const MAX_BODY_BYTES: usize = 1_000_000;

/// When request bodies are gzip-compressed. See the crate docs for the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GzipMode {
    /// Compress once the server has advertised `Accept-Encoding: gzip` on any response.
    Auto,
    /// Always compress.
    Always,
    /// Never compress.
    Never,
}

/// Why a configuration cannot be used. Each message names the variable or option to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An environment variable holds something unusable.
    #[error("{name}={value:?} is not valid: {why}")]
    BadVar {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// A setting is out of range.
    #[error("invalid metrics reporter setting: {0}")]
    Invalid(String),
}

/// Everything the reporter needs. Build it with [`ReporterConfig::from_env`] or
/// [`ReporterConfig::new`] and the `with_*` methods. Its `Debug` output hides the API key.
#[derive(Clone)]
pub struct ReporterConfig {
    /// `DAYDREAM_METRICS_URL`: where batches are POSTed.
    pub url: String,
    /// `SCOPE_CLOUD_API_KEY`: the Bearer token (never logged).
    pub api_key: String,
    /// `SCOPE_METRICS_ENABLED` (default true); the client installs no reporter when false.
    pub enabled: bool,
    /// `SCOPE_METRICS_FLUSH_INTERVAL_MS` (default 2000): longest wait before a partial batch goes.
    pub flush_interval: Duration,
    /// `SCOPE_METRICS_MAX_BATCH` (default and maximum 500): events per request.
    pub max_batch: usize,
    /// Largest uncompressed request body (default and maximum 1,000,000 bytes).
    pub max_body_bytes: usize,
    /// `SCOPE_METRICS_MAX_BUFFER` (default 50,000): events buffered (disk and memory alike)
    /// before the oldest are dropped.
    pub max_buffer: usize,
    /// The disk buffer's directory; `None` keeps a bounded in-memory buffer only. From
    /// `SCOPE_METRICS_BUFFER_PATH` (see [`ReporterConfig::from_env_with`]): beside the seed's
    /// buffer file, at `<file>.spool/`.
    pub buffer_path: Option<PathBuf>,
    /// The seed's buffer file (`SCOPE_METRICS_BUFFER_PATH`, default
    /// `~/.daydream-scope/metrics_buffer.jsonl`): JSON lines of API events the seed's reporter
    /// wrote at its last clean stop. [`crate::Reporter::start`] imports them into the disk buffer
    /// once, then truncates the file, as the seed does when it loads it. `None`: nothing to
    /// import.
    pub seed_buffer_file: Option<PathBuf>,
    /// Options of the disk buffer (size cap, sync policy). Default: the spool's defaults.
    pub spool: SpoolOptions,
    /// `app` of every request body (`"scope"`).
    pub app: String,
    /// `host` of every request body (default: this machine's hostname).
    pub host: String,
    /// `SCOPE_METRICS_GZIP` (`auto`, `always`, `never`; default auto).
    pub gzip: GzipMode,
    /// First backoff after a 5xx or network error (default 1 s); doubles per failure.
    pub backoff_base: Duration,
    /// `SCOPE_METRICS_BACKOFF_MAX_MS`: longest backoff (default 60 s).
    pub backoff_max: Duration,
    /// Wait after a 429 without a usable `Retry-After` (default 60 s).
    pub default_retry_after: Duration,
    /// `SCOPE_METRICS_REQUEST_TIMEOUT_MS`: timeout of one request, connect included (default 30 s).
    pub request_timeout: Duration,
    /// `SCOPE_METRICS_CA_FILE`: a PEM file of certificates trusted besides the system's roots (a
    /// private CA, or the collector's own self-signed certificate). `None`: the system's only.
    pub ca_file: Option<PathBuf>,
    /// Events that may wait between `emit` and the disk buffer (default 65,536); when full,
    /// `emit` drops and counts.
    pub handoff_capacity: usize,
    /// How long after a disk failure the disk is tried again (default 5 s).
    pub disk_retry: Duration,
    /// Least time between two `telemetry_dropped` reports (default 1 s).
    pub report_interval: Duration,
    /// How long `Sink::flush` (and the client's shutdown) tries to send what is buffered
    /// (default 5 s).
    pub flush_timeout: Duration,
}

impl std::fmt::Debug for ReporterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field but the key, which must never reach a log.
        f.debug_struct("ReporterConfig")
            .field("url", &self.url)
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("enabled", &self.enabled)
            .field("flush_interval", &self.flush_interval)
            .field("max_batch", &self.max_batch)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_buffer", &self.max_buffer)
            .field("buffer_path", &self.buffer_path)
            .field("seed_buffer_file", &self.seed_buffer_file)
            .field("spool", &self.spool)
            .field("app", &self.app)
            .field("host", &self.host)
            .field("gzip", &self.gzip)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("default_retry_after", &self.default_retry_after)
            .field("request_timeout", &self.request_timeout)
            .field("ca_file", &self.ca_file)
            .field("handoff_capacity", &self.handoff_capacity)
            .field("disk_retry", &self.disk_retry)
            .field("report_interval", &self.report_interval)
            .field("flush_timeout", &self.flush_timeout)
            .finish()
    }
}

impl ReporterConfig {
    /// A reporter for `url` with `api_key`, every other setting at its default, disk buffer off
    /// (set one with [`ReporterConfig::with_buffer_path`]).
    pub fn new(url: impl Into<String>, api_key: impl Into<String>) -> ReporterConfig {
        ReporterConfig {
            url: url.into(),
            api_key: api_key.into(),
            enabled: true,
            flush_interval: Duration::from_millis(2000),
            max_batch: MAX_BATCH_EVENTS,
            max_body_bytes: MAX_BODY_BYTES,
            max_buffer: 50_000,
            buffer_path: None,
            seed_buffer_file: None,
            spool: SpoolOptions::default(),
            app: "scope".into(),
            host: hostname(),
            gzip: GzipMode::Auto,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            default_retry_after: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            ca_file: None,
            handoff_capacity: 65_536,
            disk_retry: Duration::from_secs(5),
            report_interval: Duration::from_secs(1),
            flush_timeout: Duration::from_secs(5),
        }
    }

    /// From the process environment (see [`ReporterConfig::from_env_with`]).
    pub fn from_env() -> Result<ReporterConfig, ConfigError> {
        ReporterConfig::from_env_with(|k| std::env::var(k).ok())
    }

    /// From the variables `env` returns (see [`ReporterConfig::from_env_noted`]); each value it
    /// had to bring into range is logged once, as a warning naming the variable and the limit.
    pub fn from_env_with(
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ReporterConfig, ConfigError> {
        let (config, notes) = ReporterConfig::from_env_noted(env)?;
        for note in notes {
            tracing::warn!(target: "reporter", "{note}");
        }
        Ok(config)
    }

    /// From the variables `env` returns, as the seed reads them, and what was adjusted:
    /// `DAYDREAM_METRICS_URL` (default [`DEFAULT_URL`]), `SCOPE_CLOUD_API_KEY`,
    /// `SCOPE_METRICS_ENABLED`, `SCOPE_METRICS_FLUSH_INTERVAL_MS`, `SCOPE_METRICS_MAX_BATCH`,
    /// `SCOPE_METRICS_MAX_BUFFER`, `SCOPE_METRICS_BUFFER_PATH`, `SCOPE_METRICS_GZIP`,
    /// `SCOPE_METRICS_REQUEST_TIMEOUT_MS`, `SCOPE_METRICS_BACKOFF_MAX_MS` and `SCOPE_METRICS_CA_FILE`.
    ///
    /// A whole number out of range (e.g. `SCOPE_METRICS_MAX_BATCH=1000`, past the API's 500) is
    /// clamped to the limit and noted: the seed takes any number, so a setting it ran with must
    /// not stop this reporter from starting. Anything that is not a whole number is an error.
    ///
    /// `SCOPE_METRICS_BUFFER_PATH` is the seed's buffer *file*: the disk buffer lives beside it,
    /// in `<file>.spool/`, and the file itself is imported once ([`Self::seed_buffer_file`]).
    /// Unset: the seed's default file (`$DAYDREAM_SCOPE_MODELS_DIR/../metrics_buffer.jsonl`, else
    /// `~/.daydream-scope/metrics_buffer.jsonl`) is imported, the disk buffer is
    /// [`default_buffer_path`]. Empty: memory only, nothing imported. A path that is already a
    /// directory is taken as the disk buffer itself (how earlier versions of this reporter read
    /// the variable).
    pub fn from_env_noted(
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(ReporterConfig, Vec<String>), ConfigError> {
        let get = |k: &str| env(k).map(|v| v.trim().to_owned());
        let url = get("DAYDREAM_METRICS_URL")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let mut c = ReporterConfig::new(url, get("SCOPE_CLOUD_API_KEY").unwrap_or_default());
        if let Some(v) = get("SCOPE_METRICS_ENABLED").filter(|v| !v.is_empty()) {
            c.enabled = match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(ConfigError::BadVar {
                        name: "SCOPE_METRICS_ENABLED",
                        value: v,
                        why: "expected true or false",
                    })
                }
            };
        }
        let mut notes = Vec::new();
        let mut number = |name: &'static str, min: u64, max: u64, limit: &str| {
            clamped(&get, name, min, max, limit, &mut notes)
        };
        if let Some(ms) = number("SCOPE_METRICS_FLUSH_INTERVAL_MS", 1, u64::MAX, "1 ms")? {
            c.flush_interval = Duration::from_millis(ms);
        }
        let batch_limit = format!("the metrics API's {MAX_BATCH_EVENTS} events per request");
        if let Some(n) = number(
            "SCOPE_METRICS_MAX_BATCH",
            1,
            MAX_BATCH_EVENTS as u64,
            &batch_limit,
        )? {
            c.max_batch = n as usize;
        }
        if let Some(n) = number("SCOPE_METRICS_MAX_BUFFER", 1, u32::MAX as u64, "1 event")? {
            c.max_buffer = n as usize;
        }
        if let Some(ms) = number("SCOPE_METRICS_REQUEST_TIMEOUT_MS", 1, u64::MAX, "1 ms")? {
            c.request_timeout = Duration::from_millis(ms);
        }
        let base_ms = c.backoff_base.as_millis() as u64;
        if let Some(ms) = number(
            "SCOPE_METRICS_BACKOFF_MAX_MS",
            base_ms,
            u64::MAX,
            "the 1 s first backoff",
        )? {
            c.backoff_max = Duration::from_millis(ms);
        }
        c.ca_file = get("SCOPE_METRICS_CA_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        (c.buffer_path, c.seed_buffer_file) = match env("SCOPE_METRICS_BUFFER_PATH") {
            Some(p) if p.trim().is_empty() => (None, None),
            Some(p) if Path::new(&p).is_dir() => (Some(PathBuf::from(p)), None),
            Some(p) => (Some(spool_beside(Path::new(&p))), Some(PathBuf::from(p))),
            None => (
                Some(default_buffer_path()),
                Some(seed_default_buffer_file(&env)),
            ),
        };
        if let Some(v) = get("SCOPE_METRICS_GZIP").filter(|v| !v.is_empty()) {
            c.gzip = match v.to_ascii_lowercase().as_str() {
                "auto" => GzipMode::Auto,
                "always" | "true" | "1" => GzipMode::Always,
                "never" | "false" | "0" => GzipMode::Never,
                _ => {
                    return Err(ConfigError::BadVar {
                        name: "SCOPE_METRICS_GZIP",
                        value: v,
                        why: "expected auto, always or never",
                    })
                }
            };
        }
        c.validate()?;
        Ok((c, notes))
    }

    /// Checks ranges; [`crate::Reporter::start`] calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return bad(format!(
                "DAYDREAM_METRICS_URL must be an http:// or https:// URL, got {:?}",
                self.url
            ));
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH_EVENTS {
            return bad(format!(
                "SCOPE_METRICS_MAX_BATCH must be 1..={MAX_BATCH_EVENTS} (the API's limit), got {}",
                self.max_batch
            ));
        }
        if self.max_body_bytes < 1024 {
            return bad(format!(
                "max_body_bytes must be at least 1024, got {}",
                self.max_body_bytes
            ));
        }
        if self.max_buffer == 0 {
            return bad("SCOPE_METRICS_MAX_BUFFER must be at least 1".into());
        }
        if self.flush_interval.is_zero() {
            return bad("SCOPE_METRICS_FLUSH_INTERVAL_MS must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return bad("SCOPE_METRICS_REQUEST_TIMEOUT_MS must be at least 1".into());
        }
        if self.handoff_capacity == 0 {
            return bad("handoff_capacity must be at least 1".into());
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return bad("backoff_base must be above 0 and at most backoff_max".into());
        }
        Ok(())
    }

    /// Sets the disk buffer directory (`None`: memory only).
    pub fn with_buffer_path(mut self, path: Option<PathBuf>) -> Self {
        self.buffer_path = path;
        self
    }

    /// Sets the seed's buffer file to import at start (`None`: nothing to import).
    pub fn with_seed_buffer_file(mut self, file: Option<PathBuf>) -> Self {
        self.seed_buffer_file = file;
        self
    }

    /// Sets the flush interval.
    pub fn with_flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }

    /// Sets the events per request.
    pub fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Sets the largest request body.
    pub fn with_max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// Sets the buffer's event cap.
    pub fn with_max_buffer(mut self, n: usize) -> Self {
        self.max_buffer = n;
        self
    }

    /// Sets the disk buffer's options.
    pub fn with_spool_options(mut self, opts: SpoolOptions) -> Self {
        self.spool = opts;
        self
    }

    /// Sets the `host` of request bodies.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets the gzip rule.
    pub fn with_gzip(mut self, mode: GzipMode) -> Self {
        self.gzip = mode;
        self
    }

    /// Sets the 5xx / network-error backoff: first wait and longest wait.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Sets the wait after a 429 without `Retry-After`.
    pub fn with_default_retry_after(mut self, d: Duration) -> Self {
        self.default_retry_after = d;
        self
    }

    /// Sets the timeout of one request.
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Sets the handoff queue's capacity.
    pub fn with_handoff_capacity(mut self, n: usize) -> Self {
        self.handoff_capacity = n;
        self
    }

    /// Sets how soon a failed disk is tried again.
    pub fn with_disk_retry(mut self, d: Duration) -> Self {
        self.disk_retry = d;
        self
    }

    /// Sets the least time between two `telemetry_dropped` reports.
    pub fn with_report_interval(mut self, d: Duration) -> Self {
        self.report_interval = d;
        self
    }

    /// Sets how long `flush` tries.
    pub fn with_flush_timeout(mut self, d: Duration) -> Self {
        self.flush_timeout = d;
        self
    }
}

/// The whole number `name` holds, clamped to `min..=max` (`limit` says the bound in words for the
/// note); `None` when unset or empty; an error when it is not a whole number.
fn clamped(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    min: u64,
    max: u64,
    limit: &str,
    notes: &mut Vec<String>,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = get(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let n: i128 = v.parse().map_err(|_| ConfigError::BadVar {
        name,
        value: v.clone(),
        why: "expected a whole number",
    })?;
    let used = n.clamp(min as i128, max as i128) as u64;
    if used as i128 != n {
        let side = if n < min as i128 { "below" } else { "above" };
        notes.push(format!(
            "{name}={v} is {side} {limit}; using {used} (the seed takes any number, so this one is clamped rather than refused)"
        ));
    }
    Ok(Some(used))
}

/// The disk buffer's directory for the seed's buffer file `file`: `<file>.spool/` beside it.
pub fn spool_beside(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".spool");
    PathBuf::from(name)
}

/// Where the seed keeps its buffer file when `SCOPE_METRICS_BUFFER_PATH` is unset:
/// `$DAYDREAM_SCOPE_MODELS_DIR/../metrics_buffer.jsonl`, else
/// `~/.daydream-scope/metrics_buffer.jsonl`.
pub fn seed_default_buffer_file(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    let file = "metrics_buffer.jsonl";
    if let Some(models) = env("DAYDREAM_SCOPE_MODELS_DIR").filter(|v| !v.is_empty()) {
        let models = PathBuf::from(models);
        return models.parent().unwrap_or(&models).join(file);
    }
    let home = env("HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    home.unwrap_or_else(std::env::temp_dir)
        .join(".daydream-scope")
        .join(file)
}

/// The disk buffer used when `SCOPE_METRICS_BUFFER_PATH` is unset: `metrics-buffer` in
/// [`egress::state_dir`] (`$XDG_STATE_HOME/trickle-relay/metrics-buffer`, else
/// `~/.local/state/...`, else under the temporary directory).
pub fn default_buffer_path() -> PathBuf {
    egress::state_dir().join("metrics-buffer")
}

/// This machine's hostname (`unknown` if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname NUL-terminates or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if !s.is_empty() => s.to_owned(),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::egress::env_from_pairs as env;

    #[test]
    fn defaults_follow_the_spec() {
        let c = ReporterConfig::from_env_with(env(&[("SCOPE_CLOUD_API_KEY", "k")])).unwrap();
        assert_eq!(c.url, DEFAULT_URL);
        assert_eq!(c.api_key, "k");
        assert!(c.enabled);
        assert_eq!(c.flush_interval, Duration::from_millis(2000));
        assert_eq!(c.max_batch, 500);
        assert_eq!(c.max_buffer, 50_000);
        assert_eq!(c.buffer_path, Some(default_buffer_path()));
        assert_eq!(c.gzip, GzipMode::Auto);
        assert_eq!(c.ca_file, None);
        assert_eq!(DEFAULT_URL, "https://api.daydream.monster/v1/metrics");
        // The seed's own default file is imported; its default location follows the seed.
        let c = ReporterConfig::from_env_with(env(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(
            c.seed_buffer_file,
            Some(PathBuf::from(
                "/home/u/.daydream-scope/metrics_buffer.jsonl"
            ))
        );
        let c = ReporterConfig::from_env_with(env(&[
            ("HOME", "/home/u"),
            ("DAYDREAM_SCOPE_MODELS_DIR", "/data/scope/models"),
        ]))
        .unwrap();
        assert_eq!(
            c.seed_buffer_file,
            Some(PathBuf::from("/data/scope/metrics_buffer.jsonl"))
        );
    }

    #[test]
    fn the_buffer_path_is_the_seeds_file_with_the_spool_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics_buffer.jsonl");
        let f = file.to_str().unwrap();
        let c = ReporterConfig::from_env_with(env(&[("SCOPE_METRICS_BUFFER_PATH", f)])).unwrap();
        assert_eq!(c.seed_buffer_file, Some(file.clone()));
        assert_eq!(
            c.buffer_path,
            Some(dir.path().join("metrics_buffer.jsonl.spool"))
        );
        // An existing directory is the disk buffer itself, as earlier versions read it.
        let d = dir.path().to_str().unwrap();
        let c = ReporterConfig::from_env_with(env(&[("SCOPE_METRICS_BUFFER_PATH", d)])).unwrap();
        assert_eq!(
            (c.buffer_path, c.seed_buffer_file),
            (Some(dir.path().to_path_buf()), None)
        );
        let c = ReporterConfig::from_env_with(env(&[("SCOPE_METRICS_BUFFER_PATH", "")])).unwrap();
        assert_eq!((c.buffer_path, c.seed_buffer_file), (None, None));
    }

    #[test]
    fn out_of_range_numbers_are_clamped_with_one_note_naming_the_variable_and_the_limit() {
        let cases = [
            ("SCOPE_METRICS_MAX_BATCH", "1000", "500 events per request"),
            ("SCOPE_METRICS_MAX_BATCH", "0", "500 events per request"),
            ("SCOPE_METRICS_MAX_BATCH", "-3", "500 events per request"),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "-1", "1 ms"),
            ("SCOPE_METRICS_REQUEST_TIMEOUT_MS", "0", "1 ms"),
            ("SCOPE_METRICS_MAX_BUFFER", "0", "1 event"),
            ("SCOPE_METRICS_BACKOFF_MAX_MS", "10", "1 s first backoff"),
        ];
        for (name, value, limit) in cases {
            let (c, notes) =
                ReporterConfig::from_env_noted(env(&[(name, value)])).unwrap_or_else(|e| {
                    panic!("{name}={value} must not refuse to start: {e}");
                });
            assert_eq!(notes.len(), 1, "{name}={value}: {notes:?}");
            assert!(
                notes[0].contains(&format!("{name}={value}")) && notes[0].contains(limit),
                "{name}={value}: {}",
                notes[0]
            );
            c.validate().unwrap();
        }
        let (c, notes) =
            ReporterConfig::from_env_noted(env(&[("SCOPE_METRICS_MAX_BATCH", "1000")])).unwrap();
        assert_eq!(c.max_batch, MAX_BATCH_EVENTS);
        assert!(notes[0].contains("above"));
        let (c, _) =
            ReporterConfig::from_env_noted(env(&[("SCOPE_METRICS_MAX_BATCH", "0")])).unwrap();
        assert_eq!(c.max_batch, 1);
        // In range: nothing noted.
        let (_, notes) =
            ReporterConfig::from_env_noted(env(&[("SCOPE_METRICS_MAX_BATCH", "500")])).unwrap();
        assert!(notes.is_empty());
    }

    #[test]
    fn variables_are_read_and_checked() {
        let c = ReporterConfig::from_env_with(env(&[
            ("DAYDREAM_METRICS_URL", "http://127.0.0.1:9/v1/metrics"),
            ("SCOPE_METRICS_ENABLED", "FALSE"),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "250"),
            ("SCOPE_METRICS_MAX_BATCH", "100"),
            ("SCOPE_METRICS_MAX_BUFFER", "7"),
            ("SCOPE_METRICS_BUFFER_PATH", ""),
            ("SCOPE_METRICS_GZIP", "never"),
            ("SCOPE_METRICS_REQUEST_TIMEOUT_MS", "1500"),
            ("SCOPE_METRICS_BACKOFF_MAX_MS", "4000"),
            ("SCOPE_METRICS_CA_FILE", "/etc/metrics-ca.pem"),
        ]))
        .unwrap();
        assert!(!c.enabled);
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/metrics-ca.pem")));
        assert_eq!(c.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.backoff_max, Duration::from_millis(4000));
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!((c.max_batch, c.max_buffer), (100, 7));
        assert_eq!(c.buffer_path, None);
        assert_eq!(c.gzip, GzipMode::Never);

        // Not numbers at all (the seed's int() refuses them too), and a wrong URL or switch.
        for (k, v) in [
            ("SCOPE_METRICS_MAX_BATCH", "x"),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "2.5"),
            ("SCOPE_METRICS_ENABLED", "maybe"),
            ("DAYDREAM_METRICS_URL", "ftp://x"),
        ] {
            let err = ReporterConfig::from_env_with(env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(k), "{k}={v}: {err}");
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let c = ReporterConfig::new("http://x/v1/metrics", "s3cret-key");
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret") && d.contains("<redacted>"), "{d}");
    }

    #[test]
    fn hostname_is_not_empty() {
        assert!(!hostname().is_empty());
    }
}
