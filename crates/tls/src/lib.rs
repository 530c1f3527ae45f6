//! TLS for trickle-relay's servers and clients, on rustls with the ring crypto provider.
//!
//! **Servers** (the trickle server, the collector) hold a [`ServerTls`]: a certificate chain and
//! its key, read from PEM files ([`ServerTls::from_pem_files`]) or generated at start
//! ([`ServerTls::self_signed`], what `serve --tls-self-signed` does). Each new connection takes the
//! configuration current at that moment ([`ServerTls::acceptor`]), so [`ServerTls::reload`] (run on
//! SIGHUP) swaps in renewed files without dropping a connection; a bad file is refused and the old
//! certificate stays in service.
//!
//! ```
//! let tls = tls::ServerTls::self_signed(&["localhost".into()], &[b"http/1.1"]).unwrap();
//! println!("certificate SHA-256 fingerprint {}", tls.fingerprint());
//! let acceptor = tls.acceptor(); // wraps each accepted TcpStream: acceptor.accept(stream).await
//! # drop(acceptor);
//! ```
//!
//! **Clients** read trust anchors with [`load_ca`] (a private CA, or the server's own self-signed
//! certificate, which then verifies as its own root: certificate pinning), and name a refused
//! certificate with [`certificate_error`], which finds rustls's verdict inside a client's error
//! chain (reqwest → hyper → io → rustls) so that it can be reported as what it is instead of as
//! "connection closed".
//!
//! [`fingerprint`] is the SHA-256 of a certificate's DER bytes in the colon-separated uppercase
//! form `openssl x509 -noout -fingerprint -sha256` prints, so the two can be compared by eye.

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls::pki_types::CertificateDer;
pub use tokio_rustls::TlsAcceptor;

/// The crypto provider every configuration here uses: ring (reqwest's rustls builds it already).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why certificates or keys could not be loaded or used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// `certificate`, `key` or `CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) in {path}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM section of the file is damaged.
    #[error("bad PEM in {path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The file holds no PEM private key.
    #[error("no PEM private key (PKCS#8, PKCS#1 or SEC1) in {path}")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificate and key together.
    #[error("TLS certificate {cert} and key {key} refused: {reason} (does the key belong to the certificate?)")]
    Refused {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// rustls's reason.
        reason: String,
    },
    /// A self-signed certificate could not be generated.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// Where a server's certificate comes from.
#[derive(Debug)]
enum Source {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned,
}

/// The configuration in service, with what is shown of it.
struct Loaded {
    config: Arc<ServerConfig>,
    fingerprint: String,
    cert_pem: String,
}

struct Inner {
    source: Source,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<Loaded>,
}

/// A server's TLS certificate and key, reloadable in place. Cheap to clone (clones share).
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("source", &self.inner.source)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl ServerTls {
    /// A certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    /// `alpn`: the protocols offered, e.g. `[b"http/1.1"]` (empty: no ALPN).
    pub fn from_pem_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        alpn: &[&[u8]],
    ) -> Result<ServerTls, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let loaded = load_files(&cert, &key, &alpn)?;
        Ok(ServerTls::new(Source::Files { cert, key }, alpn, loaded))
    }

    /// A fresh key (ECDSA P-256) and a certificate signed by itself, valid for `names` (DNS names
    /// or IP addresses, e.g. `localhost`, `127.0.0.1`). Clients pin it with [`ServerTls::cert_pem`].
    pub fn self_signed(names: &[String], alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
        let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(generate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "trickle-relay self-signed");
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let cert = params.self_signed(&key).map_err(generate)?;
        let der = cert.der().clone();
        let private = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = build_config(vec![der.clone()], private, &alpn).map_err(|reason| {
            TlsError::Refused {
                cert: "(self-signed)".into(),
                key: "(generated)".into(),
                reason,
            }
        })?;
        let loaded = Loaded {
            config,
            fingerprint: fingerprint(&der),
            cert_pem: cert.pem(),
        };
        Ok(ServerTls::new(Source::SelfSigned, alpn, loaded))
    }

    fn new(source: Source, alpn: Vec<Vec<u8>>, loaded: Loaded) -> ServerTls {
        ServerTls {
            inner: Arc::new(Inner {
                source,
                alpn,
                current: ArcSwap::from_pointee(loaded),
            }),
        }
    }

    /// The rustls configuration in service now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.current.load().config.clone()
    }

    /// An acceptor with the configuration in service now (take one per accepted connection).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// SHA-256 fingerprint of the leaf certificate in service (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        self.inner.current.load().fingerprint.clone()
    }

    /// The certificate chain in service, PEM (for a self-signed one: what a client pins).
    pub fn cert_pem(&self) -> String {
        self.inner.current.load().cert_pem.clone()
    }

    /// Whether the certificate was generated at start (nothing to reload).
    pub fn is_self_signed(&self) -> bool {
        matches!(self.inner.source, Source::SelfSigned)
    }

    /// Re-reads the certificate and key files and puts them in service for new connections;
    /// connections already open keep theirs. On error the current certificate stays in service.
    /// Returns the new fingerprint, or `None` for a self-signed certificate (nothing to reload).
    pub fn reload(&self) -> Result<Option<String>, TlsError> {
        match &self.inner.source {
            Source::SelfSigned => Ok(None),
            Source::Files { cert, key } => {
                let loaded = load_files(cert, key, &self.inner.alpn)?;
                let fp = loaded.fingerprint.clone();
                self.inner.current.store(Arc::new(loaded));
                Ok(Some(fp))
            }
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM text (other sections are passed over).
fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_files(cert: &Path, key: &Path, alpn: &[Vec<u8>]) -> Result<Loaded, TlsError> {
    let cert_pem = read("certificate", cert)?;
    let chain = parse_certs(&cert_pem, cert)?;
    let key_pem = read("key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_path_buf(),
        },
        e => TlsError::BadPem {
            path: key.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    let fp = fingerprint(&chain[0]);
    let config = build_config(chain, private, alpn).map_err(|reason| TlsError::Refused {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason,
    })?;
    Ok(Loaded {
        config,
        fingerprint: fp,
        cert_pem: String::from_utf8_lossy(&cert_pem).into_owned(),
    })
}

/// The server's crypto: ring, with AES-128-GCM preferred over AES-256-GCM (both are strong; the
/// 128-bit key does fewer rounds, which matters on a server encrypting one stream per reader).
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        use rustls::CipherSuite as C;
        match s.suite() {
            C::TLS13_AES_128_GCM_SHA256 | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 0,
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            _ => 1,
        }
    };
    // Stable: within each rank the provider's own order (TLS 1.3 first) is kept.
    provider.cipher_suites.sort_by_key(rank);
    Arc::new(provider)
}

fn build_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(server_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn.to_vec();
    // The server's preference decides (clients list AES-256 first by habit).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// The certificates of a PEM file: a private CA, or a server's self-signed certificate, to trust
/// (and only it) when verifying a server.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read("CA", path)?, path)
}

/// SHA-256 of a certificate's DER bytes, as `AB:CD:...` (what `openssl x509 -fingerprint -sha256`
/// prints).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Why the peer's certificate was refused, if that is what `err` (or an error it wraps) is: the
/// rustls verdict found anywhere in the chain, in words. `None` for every other error.
pub fn certificate_error(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return describe(r);
        }
        // `io::Error::source` skips the error it wraps; look inside it explicitly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

fn describe(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => Some(
            "its issuer is not among the trusted certificates (it is self-signed, or signed by a \
             CA not trusted here)"
                .into(),
        ),
        rustls::Error::InvalidCertificate(C::BadSignature) => Some(
            "it is not signed by the trusted certificate of its issuer's name (another key: a \
             certificate regenerated since it was pinned?)"
                .into(),
        ),
        rustls::Error::InvalidCertificate(c) => Some(c.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_has_a_fingerprint_and_a_pem_a_client_can_load() {
        let tls = ServerTls::self_signed(&["localhost".into(), "127.0.0.1".into()], &[b"h1"])
            .expect("generate");
        assert!(tls.is_self_signed());
        let fp = tls.fingerprint();
        assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
        assert!(tls.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, tls.cert_pem()).unwrap();
        let certs = load_ca(&path).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(fingerprint(&certs[0]), fp);
        assert_eq!(tls.config().alpn_protocols, vec![b"h1".to_vec()]);
        // AES-128-GCM first, and the server's order wins.
        let config = tls.config();
        assert!(config.ignore_client_order);
        assert_eq!(
            config.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // Nothing to reload for a generated certificate.
        assert!(tls.reload().unwrap().is_none());
    }

    #[test]
    fn files_load_reload_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let write = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let ck = rcgen::generate_simple_self_signed(names).unwrap();
            std::fs::write(&cert, ck.cert.pem()).unwrap();
            std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
            fingerprint(ck.cert.der())
        };
        let first = write(&["a.example"]);
        let tls = ServerTls::from_pem_files(&cert, &key, &[]).unwrap();
        assert_eq!(tls.fingerprint(), first);
        let second = write(&["b.example"]);
        assert_eq!(tls.reload().unwrap(), Some(second.clone()));
        assert_eq!(tls.fingerprint(), second);

        // A damaged key is refused and the certificate in service stays.
        std::fs::write(&key, "not a key").unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(
            err.contains("no PEM private key") && err.contains("key.pem"),
            "{err}"
        );
        assert_eq!(tls.fingerprint(), second);

        // A key that does not belong to the certificate.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(err.contains("refused"), "{err}");

        let missing = dir.path().join("missing.pem");
        let err = ServerTls::from_pem_files(&missing, &key, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read the TLS certificate file") && err.contains("missing.pem"),
            "{err}"
        );
        std::fs::write(&missing, "hello").unwrap();
        let err = load_ca(&missing).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn certificate_errors_are_found_inside_io_errors() {
        let rustls_err = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_err);
        let reason = certificate_error(&io).expect("found");
        assert!(reason.contains("not among the trusted"), "{reason}");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(certificate_error(&plain).is_none());
        let other =
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(certificate_error(&other).is_none());
    }
}
