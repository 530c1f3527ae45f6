//! How the trickle clients ([`crate::publisher`], [`crate::subscriber`], and so every JSONL
//! channel, role and command built on them) treat the certificate of an `https://` server.
//!
//! Orchestrators hand out `https://` trickle URLs served with self-signed certificates, and the
//! reference clients do not verify them (`livepeer-gateway` opens its sessions with
//! `aiohttp.TCPConnector(ssl=False)`, go-livepeer's clients skip verification too): the channel
//! name, 128 random bits, is the capability. So there are three modes:
//!
//! | mode | flag (env) | accepts | trade-off |
//! | --- | --- | --- | --- |
//! | [`ClientTls::AnyCertificate`] (default) | none | any certificate, as the reference clients | encrypted, but an active man-in-the-middle could read the channel |
//! | [`ClientTls::Ca`] | `--trickle-ca FILE` (`TRICKLE_CA_FILE`) | only a certificate that is, or is signed by, one in FILE | needs the server's certificate (`serve --tls-cert-out`) or its CA handed over once |
//! | [`ClientTls::SystemRoots`] | `--trickle-verify-tls` | a certificate from a CA the system trusts, for the URL's host | refuses every self-signed orchestrator |
//!
//! In the default mode the first `https://` URL logs one warning per process saying that
//! certificates are not verified and how to turn verification on. In the two verifying modes a
//! refused certificate is an error of its own ([`crate::publisher::PublishError::Tls`],
//! [`crate::subscriber::SubscribeError::Tls`]) naming the URL, the reason and the flag; it is never
//! retried (a certificate does not fix itself), so a misconfigured client stops at once.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How long to wait for a TCP connection (and TLS handshake) before calling the server unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle keep-alive connection waits in the pool for the next request.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// How a trickle client treats an `https://` server's certificate (see the module docs).
#[derive(Clone, Default)]
pub enum ClientTls {
    /// Accept any certificate, as the reference clients do (`ssl=False`). The default.
    #[default]
    AnyCertificate,
    /// Accept only a certificate that is, or is signed by, one of these (`--trickle-ca FILE`).
    Ca {
        /// The PEM file they came from, for messages.
        path: PathBuf,
        /// The trusted certificates.
        certs: Vec<reqwest::Certificate>,
        /// Their SHA-256 fingerprints: what the process's shared HTTP clients are keyed by.
        fingerprints: Vec<String>,
    },
    /// Verify against the system's trusted roots (`--trickle-verify-tls`).
    SystemRoots,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientTls::AnyCertificate => f.write_str("AnyCertificate"),
            ClientTls::Ca { path, certs, .. } => {
                write!(f, "Ca({}, {} certificate(s))", path.display(), certs.len())
            }
            ClientTls::SystemRoots => f.write_str("SystemRoots"),
        }
    }
}

/// Set once the "certificates are not verified" warning was logged in this process.
static WARNED: AtomicBool = AtomicBool::new(false);

impl ClientTls {
    /// Trust only the certificates of a PEM file: a private CA, or the server's own
    /// self-signed certificate.
    pub fn from_ca_file(path: &Path) -> Result<ClientTls, tls::TlsError> {
        let (mut certs, mut fingerprints) = (Vec::new(), Vec::new());
        for der in tls::load_ca(path)? {
            if let Ok(cert) = reqwest::Certificate::from_der(&der) {
                certs.push(cert);
                fingerprints.push(tls::fingerprint(&der));
            }
        }
        if certs.is_empty() {
            return Err(tls::TlsError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        Ok(ClientTls::Ca {
            path: path.to_path_buf(),
            certs,
            fingerprints,
        })
    }

    /// The mode the command-line flags select: `--trickle-ca FILE` (which implies verification),
    /// else `--trickle-verify-tls`, else any certificate.
    pub fn from_flags(ca: Option<&Path>, verify: bool) -> Result<ClientTls, tls::TlsError> {
        match ca {
            Some(path) => ClientTls::from_ca_file(path),
            None if verify => Ok(ClientTls::SystemRoots),
            None => Ok(ClientTls::AnyCertificate),
        }
    }

    /// Whether certificates are verified at all.
    pub fn verifies(&self) -> bool {
        !matches!(self, ClientTls::AnyCertificate)
    }

    /// A `reqwest` client builder set up for this mode (for requests outside the publisher and
    /// subscriber, e.g. creating channels). Logs the one-time warning for `https://` URLs.
    pub fn builder(&self, url: &str) -> reqwest::ClientBuilder {
        self.warn_unverified(url);
        self.base_builder()
    }

    /// In the default mode, the one-time warning that an `https://` server's certificate is not
    /// verified.
    fn warn_unverified(&self, url: &str) {
        if matches!(self, ClientTls::AnyCertificate)
            && url.starts_with("https://")
            && !WARNED.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                %url,
                "TLS certificates of trickle servers are NOT verified (as the reference \
                 clients do: the channel name is the secret); to verify, pin the server's \
                 certificate with --trickle-ca FILE (TRICKLE_CA_FILE) or check it against \
                 the system's roots with --trickle-verify-tls"
            );
        }
    }

    /// A `reqwest` client builder that treats certificates as this mode says.
    fn base_builder(&self) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder();
        match self {
            ClientTls::AnyCertificate => builder
                .tls_built_in_root_certs(false)
                .danger_accept_invalid_certs(true),
            ClientTls::Ca { certs, .. } => certs
                .iter()
                .fold(builder.tls_built_in_root_certs(false), |b, c| {
                    b.add_root_certificate(c.clone())
                }),
            ClientTls::SystemRoots => builder,
        }
    }

    /// What to do about a refused certificate in this mode (the end of the error message).
    pub(crate) fn hint(&self) -> String {
        match self {
            ClientTls::Ca { path, .. } => format!(
                "it is checked against --trickle-ca {} (TRICKLE_CA_FILE) only: put the server's \
                 own certificate (serve --tls-cert-out) or its CA there, or leave --trickle-ca out \
                 to accept any certificate as the reference clients do",
                path.display()
            ),
            ClientTls::SystemRoots => "--trickle-verify-tls checks it against the system's \
                 trusted roots: pin a self-signed server's certificate with --trickle-ca FILE \
                 instead, or leave --trickle-verify-tls out to accept any certificate as the \
                 reference clients do"
                .to_string(),
            ClientTls::AnyCertificate => {
                "certificates are not verified in this mode; check the server's TLS setup"
                    .to_string()
            }
        }
    }

    /// The certificate refusal inside a request error, as (reason, what to do about it, naming
    /// the flag); `None` for any other error.
    pub fn refusal(&self, e: &reqwest::Error) -> Option<(String, String)> {
        tls::certificate_error(e).map(|reason| (reason, self.hint()))
    }
}

/// What the process's shared HTTP clients are keyed by besides the local address: the trust
/// mode, a pinned CA by its certificates' fingerprints (not its path, which may be rewritten).
#[derive(PartialEq, Eq, Hash)]
enum TrustKey {
    AnyCertificate,
    Ca(Vec<String>),
    SystemRoots,
}

impl ClientTls {
    /// What a shared client for this mode is keyed by.
    fn key(&self) -> TrustKey {
        match self {
            ClientTls::AnyCertificate => TrustKey::AnyCertificate,
            ClientTls::Ca { fingerprints, .. } => TrustKey::Ca(fingerprints.clone()),
            ClientTls::SystemRoots => TrustKey::SystemRoots,
        }
    }
}

/// The HTTP client of a publisher or subscriber of `url` connecting from `local`, TLS as `tls`
/// says.
///
/// HTTP/1.1 only, and keep-alive: a connection whose segment ended goes back to the pool and
/// carries a later segment's request (each request in flight still has a connection of its
/// own: a preconnected POST or GET waits on it). Without reuse every segment costs a TCP (and
/// TLS) handshake on both sides and leaves a TIME_WAIT socket behind, which at ten thousand
/// sessions rotating their segments every 10 s is thousands of connections a second. An idle
/// pooled connection the server closed (a restart) is dropped by the pool when it sees the
/// close; one that is reused just as it closes fails its request, which the publisher and
/// subscriber retry like any failure.
///
/// One client per local address and trust mode, shared by the whole process: a
/// `reqwest::Client` carries a TLS configuration with its root certificates (about 19 KiB,
/// measured), which ten thousand sessions with four channel ends each must not hold forty
/// thousand times. The default mode's one-time warning is checked on every call, since the
/// shared client may have been built for an `http://` URL.
pub(crate) fn http_client(tls: &ClientTls, url: &str, local: Option<IpAddr>) -> reqwest::Client {
    type Clients = HashMap<(Option<IpAddr>, TrustKey), reqwest::Client>;
    static CLIENTS: OnceLock<Mutex<Clients>> = OnceLock::new();
    tls.warn_unverified(url);
    let clients = CLIENTS.get_or_init(|| Mutex::new(HashMap::new()));
    clients
        .lock()
        .entry((local, tls.key()))
        .or_insert_with(|| build_http_client(tls, local))
        .clone()
}

fn build_http_client(tls: &ClientTls, local: Option<IpAddr>) -> reqwest::Client {
    tls.base_builder()
        .http1_only()
        // Shorter than any server's keep-alive timeout (ours: 300 s; Go's default: none).
        .pool_idle_timeout(POOL_IDLE)
        .connect_timeout(CONNECT_TIMEOUT)
        // Preconnected requests wait indefinitely: keepalive detects a peer that vanished.
        .tcp_keepalive(Duration::from_secs(15))
        .tcp_nodelay(true)
        .no_gzip()
        .local_address(local)
        .build()
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "custom HTTP client unavailable; using defaults");
            reqwest::Client::new()
        })
}
