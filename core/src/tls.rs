//! Mutual TLS between workloads, the way HBONE needs it: TLS 1.3 only, AES-GCM suites, ALPN
//! `h2`, no SNI; both sides present a certificate with one SPIFFE URI SAN, chained to the mesh
//! root. The client checks the server is exactly the identity it expects for the destination;
//! the server accepts any client of its trust domain and hands policy its identity.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::{ca::WorkloadCertificate, identity::SpiffeId};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum IdentityCheckError {
    #[error("the certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; a workload certificate has exactly one")]
    SeveralUris(usize),
    #[error("the certificate's SPIFFE ID is malformed: {0}")]
    Malformed(String),
    #[error("the certificate could not be parsed: {0}")]
    Parse(String),
    #[error("the peer is {actual}, but {expected} was expected for this destination")]
    WrongIdentity { expected: Box<SpiffeId>, actual: Box<SpiffeId> },
    #[error("the peer {actual} is not in trust domain {expected}")]
    WrongTrustDomain { expected: String, actual: Box<SpiffeId> },
}

/// The SPIFFE identity in a certificate's single URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityCheckError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| IdentityCheckError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityCheckError::Parse(e.to_string()))?
        .ok_or(IdentityCheckError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityCheckError::NoSpiffeId),
        [one] => one
            .parse()
            .map_err(|e: crate::identity::IdentityError| IdentityCheckError::Malformed(e.to_string())),
        many => Err(IdentityCheckError::SeveralUris(many.len())),
    }
}

/// rustls with ring, TLS 1.3 AES-GCM suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// The mesh roots a peer's chain must lead to.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

impl TrustBundle {
    pub fn new(roots: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::General(format!("mesh root: {e}")))?;
        Ok(Self { anchors: Arc::new(anchors) })
    }

    fn verify(
        &self,
        algorithms: &WebPkiSupportedAlgorithms,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, TlsError> {
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(algorithms.all, &self.anchors, intermediates, now, usage, None, None)
            .map_err(webpki_error)?;
        spiffe_id_of(end_entity).map_err(other)
    }
}

fn webpki_error(e: webpki::Error) -> TlsError {
    use webpki::Error as E;
    TlsError::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other_error => CertificateError::Other(OtherError(Arc::new(WebpkiError(format!("{other_error}"))))),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WebpkiError(String);

fn other(e: IdentityCheckError) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Client side: the server must chain to the mesh root and be exactly `expected`.
#[derive(Debug)]
struct ServerIdentityVerifier {
    bundle: TrustBundle,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let actual =
            self.bundle.verify(&self.algorithms, end_entity, intermediates, now, KeyUsage::server_auth())?;
        if actual != self.expected {
            return Err(other(IdentityCheckError::WrongIdentity {
                expected: Box::new(self.expected.clone()),
                actual: Box::new(actual),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not used by HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: the client must chain to the mesh root, in our trust domain.
#[derive(Debug)]
struct ClientIdentityVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let actual =
            self.bundle.verify(&self.algorithms, end_entity, intermediates, now, KeyUsage::client_auth())?;
        if actual.trust_domain != self.trust_domain {
            return Err(other(IdentityCheckError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                actual: Box::new(actual),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not used by HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS client config for one HBONE connection: present `own`, expect `peer`.
pub fn client_config(
    own: &WorkloadCertificate,
    bundle: &TrustBundle,
    peer: &SpiffeId,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = ServerIdentityVerifier {
        bundle: bundle.clone(),
        expected: peer.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(own.chain.clone(), own.key_der())?;
    config.enable_sni = false;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// TLS client config for a peer that has no certificate of its own yet (a ztunnel asking the
/// CA for its first one): verify the server as `peer`, present nothing.
pub fn anonymous_client_config(bundle: &TrustBundle, peer: &SpiffeId) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = ServerIdentityVerifier {
        bundle: bundle.clone(),
        expected: peer.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.enable_sni = false;
    Ok(config)
}

/// TLS server config for a service that authenticates its clients otherwise (the CA: by
/// token), presenting `own`.
pub fn server_config_without_client_auth(own: &WorkloadCertificate) -> Result<ServerConfig, TlsError> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(own.chain.clone(), own.key_der())
}

/// TLS server config for a workload's HBONE listener: present `own`, require a client of
/// `own`'s trust domain.
pub fn server_config(own: &WorkloadCertificate, bundle: &TrustBundle) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = ClientIdentityVerifier {
        bundle: bundle.clone(),
        trust_domain: own.identity.trust_domain.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(own.chain.clone(), own.key_der())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    spiffe_id_of(peer_certificates?.first()?).ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::ca::{Ca, new_key_and_csr, workload_certificate};

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// A real TLS handshake over an in-memory pipe; returns what each side saw.
    async fn handshake(
        client: &WorkloadCertificate,
        client_expects: &SpiffeId,
        server: &WorkloadCertificate,
        client_roots: &TrustBundle,
        server_roots: &TrustBundle,
    ) -> Result<(SpiffeId, SpiffeId), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector =
            TlsConnector::from(Arc::new(client_config(client, client_roots, client_expects).unwrap()));
        let acceptor = TlsAcceptor::from(Arc::new(server_config(server, server_roots).unwrap()));
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        let c = c.map_err(|e| format!("client: {e}"))?;
        let s = s.map_err(|e| format!("server: {e}"))?;
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(s.get_ref().1.server_name(), None, "the client sent SNI");
        let seen_by_client = peer_identity(c.get_ref().1.peer_certificates()).unwrap();
        let seen_by_server = peer_identity(s.get_ref().1.peer_certificates()).unwrap();
        Ok((seen_by_client, seen_by_server))
    }

    fn setup() -> (Ca, TrustBundle, WorkloadCertificate, WorkloadCertificate) {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let client =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(3600)).unwrap();
        let server =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/payment"), Duration::from_secs(3600)).unwrap();
        (ca, bundle, client, server)
    }

    #[tokio::test]
    async fn both_sides_see_each_others_spiffe_identity() {
        let (_ca, bundle, client, server) = setup();
        let (c, s) = handshake(&client, &server.identity, &server, &bundle, &bundle).await.unwrap();
        assert_eq!(c, server.identity);
        assert_eq!(s, client.identity);
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_that_is_not_the_expected_identity() {
        let (_ca, bundle, client, server) = setup();
        let err =
            handshake(&client, &id("spiffe://cluster.local/ns/shop/sa/other"), &server, &bundle, &bundle)
                .await
                .unwrap_err();
        assert!(
            err.starts_with("client") && err.contains("WrongIdentity") && err.contains("\"other\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let (_ca, bundle, _client, server) = setup();
        let stranger_ca = Ca::generate("cluster.local").unwrap();
        let stranger = stranger_ca
            .issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(3600))
            .unwrap();
        // The stranger trusts the server's root, so only the server can object.
        let err = handshake(&stranger, &server.identity, &server, &bundle, &bundle).await.unwrap_err();
        // Same issuer name, other key: the chain's signature does not verify.
        assert!(
            err.starts_with("server") && (err.contains("UnknownIssuer") || err.contains("BadSignature")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_trust_domain_is_refused() {
        let (ca, bundle, _client, server) = setup();
        let foreign =
            ca.issue(&id("spiffe://other.domain/ns/shop/sa/checkout"), Duration::from_secs(3600)).unwrap();
        let err = handshake(&foreign, &server.identity, &server, &bundle, &bundle).await.unwrap_err();
        assert!(err.starts_with("server") && err.contains("WrongTrustDomain"), "{err}");
    }

    #[tokio::test]
    async fn an_expired_client_certificate_is_refused() {
        let (ca, bundle, _client, server) = setup();
        let identity = id("spiffe://cluster.local/ns/shop/sa/checkout");
        let (key, csr) = new_key_and_csr(&identity).unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        let chain = ca.sign(&csr, &identity, Duration::from_secs(3600), two_hours_ago).unwrap();
        let expired = workload_certificate(identity, &key, chain).unwrap();
        let err = handshake(&expired, &server.identity, &server, &bundle, &bundle).await.unwrap_err();
        assert!(err.to_lowercase().contains("expired"), "{err}");
    }

    #[test]
    fn the_ca_signs_only_the_identity_it_is_told_not_what_the_csr_asks() {
        let ca = Ca::generate("cluster.local").unwrap();
        let (_key, csr) = new_key_and_csr(&id("spiffe://cluster.local/ns/kube-system/sa/admin")).unwrap();
        let granted = id("spiffe://cluster.local/ns/shop/sa/checkout");
        let chain = ca.sign(&csr, &granted, Duration::from_secs(60), SystemTime::now()).unwrap();
        assert_eq!(spiffe_id_of(&chain[0]).unwrap(), granted);
    }

    #[test]
    fn a_root_round_trips_through_pem() {
        let ca = Ca::generate("cluster.local").unwrap();
        let again = Ca::from_pem(ca.root_pem(), ca.key_pem()).unwrap();
        let cert = again.issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::from_secs(60)).unwrap();
        assert!(cert.not_after > SystemTime::now());
        assert!(cert.refresh_at() < cert.not_after);
    }
}
