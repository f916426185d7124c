//! The mesh CA's cryptography: a root, workload keys with their CSRs, and signing a CSR for
//! exactly one SPIFFE identity. Who may ask for which identity is the CA service's business
//! (the controller); this module only never lets a CSR choose its own SANs.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::SpiffeId;

/// Default workload certificate lifetime (Istio's).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Tolerated clock skew: leaves are valid from a little before they are signed.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a key or certificate: {0}")]
    Generate(rcgen::Error),
    #[error("the certificate signing request is invalid or its signature does not verify: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CA root in PEM could not be read: {0}")]
    BadRoot(String),
}

/// A workload's key and certificate chain (leaf first; the root is not included).
#[derive(Clone, Debug)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8; shared, never copied out of the process.
    pub key: std::sync::Arc<PrivatePkcs8KeyDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this process received it. CAs backdate `not_before` for clock skew, so the
    /// remaining lifetime is counted from here.
    pub received_at: SystemTime,
}

impl WorkloadCertificate {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// When to renew: half-way through the lifetime left when it was received.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.received_at).unwrap_or_default();
        self.received_at + lifetime / 2
    }
}

/// A fresh key for `identity` (ECDSA P-256; it never leaves the process that made it) and a
/// CSR asking for that identity.
pub fn new_key_and_csr(
    identity: &SpiffeId,
) -> Result<(KeyPair, CertificateSigningRequestDer<'static>), CaError> {
    let key = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
    params.subject_alt_names =
        vec![SanType::URI(identity.to_string().try_into().map_err(CaError::Generate)?)];
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(CaError::Generate)?;
    Ok((key, csr.der().clone()))
}

/// Completes a [`WorkloadCertificate`] from the key kept locally and the chain the CA returned.
pub fn workload_certificate(
    identity: SpiffeId,
    key: &KeyPair,
    chain: Vec<CertificateDer<'static>>,
) -> Result<WorkloadCertificate, CaError> {
    let leaf = chain.first().ok_or_else(|| CaError::BadRoot("empty certificate chain".into()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CaError::BadRoot(e.to_string()))?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(WorkloadCertificate {
        identity,
        not_before: to_time(parsed.validity().not_before),
        not_after: to_time(parsed.validity().not_after),
        received_at: SystemTime::now(),
        chain,
        key: std::sync::Arc::new(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// The mesh root and its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Warren mesh root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let root_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca { root: cert.der().clone(), issuer: Issuer::new(params, key), root_pem, key_pem })
    }

    /// A root from its PEM certificate and PKCS#8 key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadRoot(format!("key: {e}")))?;
        let root = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::BadRoot(format!("certificate: {e:?}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CaError::BadRoot(format!("certificate: {e}")))?;
        Ok(Ca { issuer, root, root_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs `csr` for `identity` only: whatever SANs the CSR asks for are ignored. Valid from
    /// a little before `now` (clock skew) until `now + lifetime`.
    pub fn sign(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        identity: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let request = CertificateSigningRequestParams::from_der(csr).map_err(CaError::BadCsr)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().map_err(CaError::Generate)?)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::from(now);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + lifetime;
        let leaf = CertificateSigningRequestParams { params, public_key: request.public_key }
            .signed_by(&self.issuer)
            .map_err(CaError::Generate)?;
        Ok(vec![leaf.der().clone()])
    }

    /// A certificate and key in PEM for a non-mesh TLS peer (a benchmark's TLS relay, say),
    /// for `identity`, signed by this root.
    pub fn issue_pem(&self, identity: &SpiffeId, lifetime: Duration) -> Result<(String, String), CaError> {
        let (key, csr) = new_key_and_csr(identity)?;
        let chain = self.sign(&csr, identity, lifetime, SystemTime::now())?;
        let body = base64(&chain[0]);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        Ok((pem, key.serialize_pem()))
    }

    /// Key, CSR and signature in one go, for this CA's own use and for tests.
    pub fn issue(&self, identity: &SpiffeId, lifetime: Duration) -> Result<WorkloadCertificate, CaError> {
        let (key, csr) = new_key_and_csr(identity)?;
        let chain = self.sign(&csr, identity, lifetime, SystemTime::now())?;
        workload_certificate(identity.clone(), &key, chain)
    }
}

/// Standard base64 decoding (padding optional); `None` on any other character.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed = bytes.strip_suffix(b"==").or_else(|| bytes.strip_suffix(b"=")).unwrap_or(&bytes);
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let produced = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

/// Standard base64 (for PEM bodies and the CA protocol).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(input.as_bytes()), expected);
            assert_eq!(super::base64_decode(expected).unwrap(), input.as_bytes());
        }
    }

    #[test]
    fn issued_pem_parses_back() {
        let ca = super::Ca::generate("cluster.local").unwrap();
        let id = "spiffe://cluster.local/ns/bench/sa/relay".parse().unwrap();
        let (cert, key) = ca.issue_pem(&id, std::time::Duration::from_secs(60)).unwrap();
        let der: rustls_pki_types::CertificateDer =
            rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(crate::tls::spiffe_id_of(&der).unwrap(), id);
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}
