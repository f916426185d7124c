//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: a Kubernetes ServiceAccount in a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "'{0}' is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Malformed(String),
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || IdentityError::Malformed(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(SpiffeId {
                trust_domain: td.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(malformed()),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_uri_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/production/sa/payment".parse().unwrap();
        assert_eq!(id.namespace, "production");
        assert_eq!(id.service_account, "payment");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/production/sa/payment");
    }

    #[test]
    fn rejects_what_is_not_a_workload_identity() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }
}
