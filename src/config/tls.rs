//! TLS settings, validated: a listener that terminates TLS
//! (`tls = { cert, key }`) and a group whose backends speak TLS
//! (`tls = { ca, server_name }`). The files are read and checked when the
//! config is loaded, so `check`, a start and a reload refuse what would
//! fail, naming the file and the reason; a reload that finds the same
//! paths with new contents (a renewed certificate) sees a change.

use super::raw::{RawTlsClient, RawTlsServer, S};
use super::validate::Validator;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Time a client has by default to finish its TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's TLS termination: its certificate and key, loaded.
#[derive(Clone)]
pub struct TlsTerminate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub handshake_timeout: Duration,
    pub server: Arc<rustls::ServerConfig>,
    /// SHA-256 of what was read, so a renewed file is a change.
    digest: [u8; 32],
}

/// A group's TLS origination: whom its backends' certificates must chain
/// to and the name they must carry.
#[derive(Clone)]
pub struct TlsOriginate {
    /// `None`: the system's CA bundle.
    pub ca: Option<PathBuf>,
    /// `None`: each backend's IP address.
    pub server_name: Option<ServerName<'static>>,
    pub client: Arc<rustls::ClientConfig>,
    digest: [u8; 32],
}

impl TlsOriginate {
    /// The name backend `addr`'s certificate must carry.
    pub fn name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

impl PartialEq for TlsTerminate {
    fn eq(&self, o: &Self) -> bool {
        (&self.cert, &self.key, self.handshake_timeout, self.digest)
            == (&o.cert, &o.key, o.handshake_timeout, o.digest)
    }
}

impl PartialEq for TlsOriginate {
    fn eq(&self, o: &Self) -> bool {
        (&self.ca, &self.server_name, self.digest) == (&o.ca, &o.server_name, o.digest)
    }
}

impl Eq for TlsOriginate {}

impl std::fmt::Debug for TlsTerminate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTerminate")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TlsOriginate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOriginate")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// `ring`'s cryptography: it builds with a C compiler alone. rustls marks
/// it deprecated only for its lack of post-quantum key exchange, which the
/// peers portshift stands beside (OpenSSL 3.0) do not offer either.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file, in order; an error says what is wrong.
fn read_certs(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (no `BEGIN CERTIFICATE` block)",
            path.display()
        ));
    }
    Ok((certs, bytes))
}

fn read_key(path: &Path) -> Result<(PrivateKeyDer<'static>, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            path.display()
        )
    })?;
    Ok((key, bytes))
}

/// The server side: the chain and its key, checked to belong together.
fn server_config(cert: &Path, key: &Path) -> Result<(rustls::ServerConfig, [u8; 32]), String> {
    let (chain, cert_bytes) = read_certs(cert)?;
    let (key_der, key_bytes) = read_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                key.display(),
                cert.display()
            ),
            e => format!(
                "{} and {} cannot serve TLS: {e}",
                cert.display(),
                key.display()
            ),
        })?;
    Ok((config, digest(&[&cert_bytes, &key_bytes])))
}

/// The client side: the roots backends must chain to.
fn client_config(ca: Option<&Path>) -> Result<(rustls::ClientConfig, [u8; 32]), String> {
    let mut roots = rustls::RootCertStore::empty();
    let read = match ca {
        Some(path) => {
            let (certs, bytes) = read_certs(path)?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    format!(
                        "{}: a certificate cannot be a trust anchor: {e}",
                        path.display()
                    )
                })?;
            }
            bytes
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("the system has no CA certificates to check backends against".into());
            }
            Vec::new()
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, digest(&[&read])))
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

impl Validator<'_, '_> {
    /// A listener's `tls`; a file that cannot serve is reported at its key.
    pub(super) fn tls_terminate(
        &mut self,
        listener: &str,
        raw: Option<&S<RawTlsServer>>,
    ) -> Option<TlsTerminate> {
        let t = raw?.get_ref();
        let cert = self.relative(t.cert.get_ref());
        let key = self.relative(t.key.get_ref());
        let handshake_timeout = self.duration(
            t.handshake_timeout.as_ref(),
            "tls.handshake_timeout",
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        );
        match server_config(&cert, &key) {
            Ok((config, digest)) => Some(TlsTerminate {
                cert,
                key,
                handshake_timeout,
                server: Arc::new(config),
                digest,
            }),
            Err(why) => {
                self.rep.error(
                    t.cert.span(),
                    format!("listener `{listener}`: tls: {why}"),
                    Some("name a PEM certificate chain (leaf first) and its private key; relative paths are read from the config's folder".into()),
                );
                None
            }
        }
    }

    /// A group's `tls`.
    pub(super) fn tls_originate(
        &mut self,
        group: &str,
        raw: Option<&S<RawTlsClient>>,
    ) -> Option<TlsOriginate> {
        let raw = raw?;
        let t = raw.get_ref();
        let ca = t.ca.as_ref().map(|c| self.relative(c.get_ref()));
        let server_name = match &t.server_name {
            None => None,
            Some(n) => match ServerName::try_from(n.get_ref().clone()) {
                Ok(name) => Some(name),
                Err(_) => {
                    self.rep.error(
                        n.span(),
                        format!("group `{group}`: tls.server_name `{}` is not a DNS name or IP address", n.get_ref()),
                        Some("write the name the backends' certificates carry, e.g. \"redis.internal\"".into()),
                    );
                    return None;
                }
            },
        };
        match client_config(ca.as_deref()) {
            Ok((config, digest)) => Some(TlsOriginate {
                ca,
                server_name,
                client: Arc::new(config),
                digest,
            }),
            Err(why) => {
                let span = t.ca.as_ref().map_or(raw.span(), |c| c.span());
                self.rep.error(
                    span,
                    format!("group `{group}`: tls: {why}"),
                    Some("name a PEM file of the CA certificates the backends' certificates chain to (`ca`), or install the system's (Debian: ca-certificates)".into()),
                );
                None
            }
        }
    }

    /// `retry_on_early_reset` replays bytes the socket copy kept; a TLS
    /// stream on either side is copied by a loop that keeps none.
    pub(super) fn tls_without_replay(
        &mut self,
        raw: &super::raw::RawListener,
        l: &super::Listener,
        groups: &[super::Group],
    ) {
        let tls_group = l
            .all_groups()
            .into_iter()
            .find(|&g| groups[g].tls.is_some());
        if raw.retry_on_early_reset != Some(true) || (l.tls.is_none() && tls_group.is_none()) {
            return;
        }
        let which = match tls_group {
            Some(g) if l.tls.is_none() => {
                format!("group `{}` speaks TLS to its backends", groups[g].name)
            }
            _ => "it terminates TLS".to_owned(),
        };
        self.rep.error(
            raw.name.span(),
            format!(
                "listener `{}`: `retry_on_early_reset` cannot be on: {which}",
                l.name
            ),
            Some("remove retry_on_early_reset (or the TLS)".into()),
        );
    }

    /// A path as written, relative to the config file's folder.
    fn relative(&self, p: &str) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use rcgen::{CertificateParams, KeyPair};
    use std::path::Path;

    /// A self-signed certificate and its key in `dir` as `{name}.pem` and
    /// `{name}.key`.
    fn self_signed(dir: &Path, name: &str) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![format!("{name}.test")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn parse(dir: &Path, listener: &str, group: &str) -> Result<Config, String> {
        let text = format!(
            "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:9\"]\n{group}\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:8443\"]\nprimary = \"g\"\n{listener}\n"
        );
        Config::parse(&dir.join("t.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn certificates_are_read_and_checked_when_the_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "a");
        self_signed(dir.path(), "b");
        std::fs::write(
            dir.path().join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\n!!\n",
        )
        .unwrap();
        let ok = parse(
            dir.path(),
            "tls = { cert = \"a.pem\", key = \"a.key\" }",
            "tls = { ca = \"b.pem\" }",
        )
        .unwrap();
        let l = &ok.listeners[0];
        assert_eq!(l.tls.as_ref().unwrap().cert, dir.path().join("a.pem"));
        assert_eq!(
            l.tls.as_ref().unwrap().handshake_timeout,
            super::DEFAULT_TLS_HANDSHAKE_TIMEOUT
        );
        assert!(ok.groups[0].tls.as_ref().unwrap().server_name.is_none());
        for (listener, group, want) in [
            (
                "tls = { cert = \"nope.pem\", key = \"a.key\" }",
                "",
                "t.toml:10:16: error: listener `l`: tls: cannot read",
            ),
            (
                "tls = { cert = \"a.pem\", key = \"b.key\" }",
                "",
                "the key in",
            ),
            (
                "tls = { cert = \"junk.pem\", key = \"a.key\" }",
                "",
                "is not a PEM certificate file",
            ),
            (
                "tls = { cert = \"a.key\", key = \"a.key\" }",
                "",
                "holds no certificate",
            ),
            (
                "tls = { cert = \"a.pem\", key = \"a.pem\" }",
                "",
                "holds no usable private key",
            ),
            ("tls = { cert = \"a.pem\" }", "", "missing field `key`"),
            (
                "",
                "tls = { ca = \"nope.pem\" }",
                "group `g`: tls: cannot read",
            ),
            (
                "",
                "tls = { ca = \"b.pem\", server_name = \"bad name!\" }",
                "is not a DNS name or IP address",
            ),
            (
                "",
                "tls = { ca = \"b.pem\", sni = \"x\" }",
                "unknown field `sni`",
            ),
            (
                "retry_on_early_reset = true",
                "tls = { ca = \"b.pem\" }",
                "`retry_on_early_reset` cannot be on: group `g` speaks TLS",
            ),
            (
                "retry_on_early_reset = true\ntls = { cert = \"a.pem\", key = \"a.key\" }",
                "",
                "cannot be on: it terminates TLS",
            ),
        ] {
            let err = parse(dir.path(), listener, group).expect_err(want);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
        }
    }

    #[test]
    fn a_renewed_certificate_at_the_same_path_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "a");
        let tls = "tls = { cert = \"a.pem\", key = \"a.key\" }";
        let before = parse(dir.path(), tls, "").unwrap();
        assert_eq!(
            before.listeners[0],
            parse(dir.path(), tls, "").unwrap().listeners[0]
        );
        self_signed(dir.path(), "a");
        assert_ne!(
            before.listeners[0],
            parse(dir.path(), tls, "").unwrap().listeners[0]
        );
    }
}
