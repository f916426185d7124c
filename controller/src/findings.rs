//! What the controller reports about the objects it reads, `istioctl analyze`-style: a stable
//! code, a severity, the object (kind and namespace/name, or the file) and the field.

use std::fmt;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable code: `WRN`/`ERR` numbers never change meaning.
    pub code: &'static str,
    pub severity: Severity,
    /// `Kind namespace/name`, or `file:document` when the object could not be read.
    pub object: String,
    /// The field concerned (`spec.rules[0].to[0].operation.methods`), if any.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        };
        write!(f, "{severity} [{}] ({})", self.code, self.object)?;
        if let Some(field) = &self.field {
            write!(f, " {field}:")?;
        }
        write!(f, " {}", self.message)
    }
}

/// The codes, in one place so they stay stable.
pub mod codes {
    /// A document could not be parsed or has a field of the wrong type.
    pub const SCHEMA: &str = "WA0001";
    /// A document of a kind Warren does not read (ignored).
    pub const UNKNOWN_KIND: &str = "WA0002";
    /// An AuthorizationPolicy rule with L7 fields on workloads without a waypoint: ztunnel
    /// enforces only its L4 part (ALLOW: the rule never matches; DENY: it matches on L4).
    pub const L7_WITHOUT_WAYPOINT: &str = "WA0101";
    /// STRICT PeerAuthentication in a namespace whose pods are not all in the mesh.
    pub const STRICT_WITH_UNENROLLED: &str = "WA0102";
    /// A value Warren does not understand (an mTLS mode, an action, a port).
    pub const INVALID_VALUE: &str = "WA0103";
    /// A Service whose selector matches no pod.
    pub const NO_ENDPOINTS: &str = "WA0104";
    /// A waypoint AuthorizationPolicy rule with a field the waypoint cannot evaluate (a `when`
    /// key, `requestPrincipals`, `remoteIpBlocks`, an unusable port): ALLOW rules drop (never
    /// match), DENY rules keep the rest (deny more).
    pub const L7_POLICY_UNSUPPORTED: &str = "WA0105";
    /// A route to a subset that no DestinationRule for its host defines: every request to it
    /// would fail with 503.
    pub const UNDEFINED_SUBSET: &str = "WA0201";
    /// A host that names no Service: a route destination (analysis), or a VirtualService or
    /// DestinationRule host, an HTTPRoute parent or backend (translation, which drops it).
    pub const UNKNOWN_HOST: &str = "WA0202";
    /// The weights of a route's destinations do not add up to 100.
    pub const WEIGHTS: &str = "WA0203";
    /// Two VirtualServices claim the same host: which one applies is undefined.
    pub const CONFLICTING_VIRTUAL_SERVICES: &str = "WA0204";
    /// A regular expression that does not compile (RE2 syntax).
    pub const INVALID_REGEX: &str = "WA0205";
    /// A routing feature the waypoint does not implement (ignored, or what needs it dropped).
    pub const UNSUPPORTED: &str = "WA0206";
    /// Configuration that is not for the mesh (ingress Gateways, `gateways` without `mesh`):
    /// out of Warren's scope, ignored.
    pub const NOT_FOR_MESH: &str = "WA0207";
    /// Routes or policies for a Service that has no waypoint: nothing applies them.
    pub const NO_WAYPOINT: &str = "WA0208";
    /// An HTTPRoute backend or mirror in another namespace that no ReferenceGrant there allows:
    /// refused.
    pub const REFERENCE_NOT_PERMITTED: &str = "WA0209";
    /// A Service (or its namespace) names a waypoint that has no Gateway: kept, so ztunnel
    /// refuses its connections rather than let them past the waypoint's policy.
    pub const WAYPOINT_NOT_FOUND: &str = "WA0210";
    /// A Service names a waypoint whose Gateway does not admit it (`istio.io/waypoint-for`,
    /// or `allowedRoutes` for another namespace): not used, as in Istio.
    pub const WAYPOINT_REFUSED: &str = "WA0211";
}

pub fn error(
    code: &'static str,
    object: String,
    field: Option<String>,
    message: impl Into<String>,
) -> Finding {
    Finding { code, severity: Severity::Error, object, field, message: message.into() }
}

pub fn warning(
    code: &'static str,
    object: String,
    field: Option<String>,
    message: impl Into<String>,
) -> Finding {
    Finding { code, severity: Severity::Warning, object, field, message: message.into() }
}
