//! The CA's Kubernetes side (`controller serve --kubernetes`):
//!
//! - the mesh root lives in Secret `warren-system/warren-ca-root` (`root-cert.pem`,
//!   `root-key.pem`), created on first start; when two controllers start at once, the one whose
//!   create loses the race reads the winner's;
//! - a proxy authenticates with its pod-bound ServiceAccount token: a TokenReview says whose it
//!   is, and the pod the token is bound to (`authentication.kubernetes.io/pod-name` and
//!   `pod-uid` in the review's `user.extra`) must still exist with that uid, run as that
//!   ServiceAccount and be scheduled. A token of the ztunnel's ServiceAccount speaks for the
//!   pod's node ([`Principal::Node`]); any other ServiceAccount's for that pod alone
//!   ([`Principal::Pod`]: a waypoint, which the CA gives only its own identity).
//!
//! A review's answer (the token's ServiceAccount and pod) is reused for the same token for up to
//! [`REVIEW_TTL`] (never past the token's `exp`): a ztunnel asks for the certificate of every pod
//! on its node when it starts, each a request with the same token. The pod check is not cached:
//! it reads the controller's own pod watch (a GET only when the watch does not hold the pod yet),
//! so a deleted pod's token is refused as soon as the watch sees the deletion.
//!
//! The decisions are pure functions ([`root_from_secret`], [`pod_claim`], [`principal_of`],
//! [`ReviewCache`], [`token_expiry`]), unit-tested; the async functions only fetch what they
//! decide on.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use base64::Engine;

use hyper::StatusCode;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
        core::v1::{Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::reflector::{ObjectRef, Store},
};
use warren_core::ca::{Ca, CaError};

use crate::{ca_service::Principal, kube_source::KubeSourceError};

/// Where the mesh root lives in Kubernetes mode.
pub const ROOT_SECRET_NAMESPACE: &str = "warren-system";
pub const ROOT_SECRET_NAME: &str = "warren-ca-root";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
pub const ROOT_KEY_KEY: &str = "root-key.pem";

/// The `user.extra` keys of a token bound to a pod (Kubernetes 1.20 and later).
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// What stops the CA from getting its root out of the Secret. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(
        "reading Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME} (the mesh root): {0}. Grant the \
         controller `get` on it (Role warren-controller-ca in deploy/rbac/controller.yaml)"
    )]
    Read(#[source] kube::Error),
    #[error(
        "creating Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME} (the mesh root, first start): {0}. \
         Grant the controller `create` on secrets in {ROOT_SECRET_NAMESPACE} (Role warren-controller-ca \
         in deploy/rbac/controller.yaml) and check that the namespace exists"
    )]
    Create(#[source] kube::Error),
    #[error(
        "Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME} has no `{0}`. Restore it, or delete the \
         Secret to have a new root created (every ztunnel then needs the new root)"
    )]
    MissingKey(&'static str),
    #[error(
        "Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME} does not hold a usable root: {0}. It needs \
         a PEM CA certificate in `{ROOT_CERT_KEY}` and its PKCS#8 PEM key in `{ROOT_KEY_KEY}`"
    )]
    BadRoot(#[source] CaError),
    #[error("generating a new mesh root: {0}")]
    Generate(#[source] CaError),
}

/// Why a ServiceAccount token does not identify a proxy's pod, or could not be checked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("the API server does not accept the token ({0})")]
    NotAuthenticated(String),
    #[error(
        "the token belongs to {username}, which is not a ServiceAccount: a proxy authenticates \
         with its pod's projected ServiceAccount token (a serviceAccountToken volume)"
    )]
    NotAServiceAccount { username: String },
    #[error(
        "the token of ServiceAccount {service_account} is not bound to a pod (no {EXTRA_POD_NAME} \
         and {EXTRA_POD_UID} in the review): a proxy must send its projected ServiceAccount token \
         (a serviceAccountToken volume), not a legacy Secret token or one from `kubectl create token`"
    )]
    NotBoundToPod { service_account: String },
    #[error("the token's pod {namespace}/{name} no longer exists")]
    PodGone { namespace: String, name: String },
    #[error(
        "the token's pod {namespace}/{name} is not the one it was issued to (uid {found}, token \
         bound to {expected})"
    )]
    PodReplaced { namespace: String, name: String, found: String, expected: String },
    #[error("the token's pod {namespace}/{name} runs as ServiceAccount {found:?}, not {expected}")]
    PodServiceAccount { namespace: String, name: String, found: String, expected: String },
    #[error("the token's pod {namespace}/{name} is not scheduled on a node")]
    NotScheduled { namespace: String, name: String },
    /// The API server could not be asked: not the client's fault.
    #[error(
        "the CA could not check the token: {0}. The controller needs `create` on tokenreviews \
         (ClusterRoleBinding warren-controller-auth-delegator) and `get` on pods (ClusterRole \
         warren-controller), both in deploy/rbac/controller.yaml"
    )]
    Api(String),
}

impl AuthError {
    /// The CA's answer: 401 for a token that does not identify a pod, 403 for a pod that has
    /// no node yet, 503 when the API server could not be asked.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Api(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::NotScheduled { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A ServiceAccount, `namespace/name` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountRef {
    /// The user name the API server authenticates its tokens as.
    pub fn username(&self) -> String {
        format!("{SERVICE_ACCOUNT_USER_PREFIX}{}:{}", self.namespace, self.name)
    }

    /// The ServiceAccount a user name of the API server stands for, if it is one.
    pub fn from_username(username: &str) -> Option<Self> {
        let (namespace, name) = username.strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)?.split_once(':')?;
        let valid = |s: &str| !s.is_empty() && !s.contains(':') && !s.contains('/');
        (valid(namespace) && valid(name))
            .then(|| ServiceAccountRef { namespace: namespace.into(), name: name.into() })
    }
}

/// How the API server names a ServiceAccount as a user: `system:serviceaccount:NS:NAME`.
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccountRef { namespace: namespace.into(), name: name.into() })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The pod a reviewed token was bound to, and the ServiceAccount it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaim {
    pub service_account: ServiceAccountRef,
    /// The pod's name; it is in the ServiceAccount's namespace (a pod can only run as a
    /// ServiceAccount of its own namespace).
    pub name: String,
    pub uid: String,
}

/// From a TokenReview's answer: the token is a ServiceAccount's, bound to a pod.
pub fn pod_claim(status: &TokenReviewStatus) -> Result<PodClaim, AuthError> {
    if status.authenticated != Some(true) {
        let reason =
            status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::NotAuthenticated(reason));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(service_account) = ServiceAccountRef::from_username(&username) else {
        return Err(AuthError::NotAServiceAccount { username });
    };
    let extra = user.extra.unwrap_or_default();
    let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    match (single(EXTRA_POD_NAME), single(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Ok(PodClaim { service_account, name, uid }),
        _ => Err(AuthError::NotBoundToPod { service_account: service_account.to_string() }),
    }
}

/// Who the claimed pod's token speaks for, if the pod is still the one the token was issued
/// to, runs as the token's ServiceAccount and is scheduled: its node when that ServiceAccount
/// is the ztunnel's, otherwise the pod itself.
pub fn principal_of(
    pod: Option<&Pod>,
    claim: &PodClaim,
    ztunnel: &ServiceAccountRef,
) -> Result<Principal, AuthError> {
    let (namespace, name) = (claim.service_account.namespace.clone(), claim.name.clone());
    let Some(pod) = pod else { return Err(AuthError::PodGone { namespace, name }) };
    let found = pod.metadata.uid.clone().unwrap_or_default();
    if found != claim.uid {
        return Err(AuthError::PodReplaced { namespace, name, found, expected: claim.uid.clone() });
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let account = spec.service_account_name.clone().unwrap_or_default();
    if account != claim.service_account.name {
        return Err(AuthError::PodServiceAccount {
            namespace,
            name,
            found: account,
            expected: claim.service_account.to_string(),
        });
    }
    let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
        return Err(AuthError::NotScheduled { namespace, name });
    };
    if claim.service_account == *ztunnel {
        return Ok(Principal::Node(node));
    }
    Ok(Principal::Pod { namespace, service_account: account, name, node })
}

/// How long a TokenReview's answer is reused for the same token (the Kubernetes API server's
/// own webhook token cache keeps answers for two minutes).
pub const REVIEW_TTL: Duration = Duration::from_secs(60);

/// Reviews kept at most: a node's ztunnel and its waypoints hold one token each, so this covers
/// a few thousand nodes; past it, expired answers go first, then all (they are only a cache).
const REVIEW_CACHE_MAX: usize = 4096;

/// TokenReview answers by token (the whole token is the key: a shorter hash could be collided
/// into by a forged one), each with the instant it stops being used.
#[derive(Default)]
pub struct ReviewCache {
    entries: Mutex<HashMap<String, (PodClaim, Instant)>>,
}

impl ReviewCache {
    /// The claim reviewed for `token`, if its answer is still to be used at `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<PodClaim> {
        let entries = self.entries.lock().expect("poisoned");
        entries.get(token).filter(|(_, until)| now < *until).map(|(claim, _)| claim.clone())
    }

    /// Keeps `claim` for `token` until `until`.
    pub fn insert(&self, token: &str, claim: PodClaim, now: Instant, until: Instant) {
        let mut entries = self.entries.lock().expect("poisoned");
        if entries.len() >= REVIEW_CACHE_MAX && !entries.contains_key(token) {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= REVIEW_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(token.to_string(), (claim, until));
    }
}

/// The `exp` claim of a JWT, read without verifying it: it only shortens how long a review of
/// the token is reused (the API server verified the token itself).
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

/// Until when a review made at `now` (`wall` on the wall clock) is reused for a token expiring at
/// `expiry`: [`REVIEW_TTL`], cut short by the expiry; an expired token's review not at all.
pub fn review_reused_until(now: Instant, wall: SystemTime, expiry: Option<SystemTime>) -> Instant {
    let left = match expiry {
        Some(expiry) => expiry.duration_since(wall).unwrap_or(Duration::ZERO),
        None => REVIEW_TTL,
    };
    now + left.min(REVIEW_TTL)
}

/// Checks ServiceAccount tokens with the TokenReview API.
pub struct TokenReviewer {
    pub client: Client,
    /// The ztunnel's ServiceAccount: its pods' tokens speak for their node.
    pub ztunnel: ServiceAccountRef,
    pub reviews: ReviewCache,
    /// The controller's pod watch, once Kubernetes mode has started it.
    pub pods: Arc<OnceLock<Store<Pod>>>,
}

impl TokenReviewer {
    pub fn new(client: Client, ztunnel: ServiceAccountRef, pods: Arc<OnceLock<Store<Pod>>>) -> Self {
        Self { client, ztunnel, reviews: ReviewCache::default(), pods }
    }

    /// Who `token` speaks for: the node of the ztunnel pod it was issued to, or the pod.
    pub async fn principal(&self, token: &str) -> Result<Principal, AuthError> {
        let claim = match self.reviews.get(token, Instant::now()) {
            Some(claim) => claim,
            None => {
                let claim = self.review(token).await?;
                let now = Instant::now();
                let until = review_reused_until(now, SystemTime::now(), token_expiry(token));
                self.reviews.insert(token, claim.clone(), now, until);
                claim
            }
        };
        let pod = self.pod(&claim).await?;
        principal_of(pod.as_deref(), &claim, &self.ztunnel)
    }

    async fn review(&self, token: &str) -> Result<PodClaim, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: None },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Api(format!("TokenReview: {e}")))?;
        pod_claim(&answer.status.unwrap_or_default())
    }

    /// The claimed pod: from the pod watch when it holds the pod with the claimed uid, else
    /// (not listed yet, just created, or replaced) from the API server.
    async fn pod(&self, claim: &PodClaim) -> Result<Option<Arc<Pod>>, AuthError> {
        let namespace = &claim.service_account.namespace;
        if let Some(store) = self.pods.get() {
            let watched = store.get(&ObjectRef::new(&claim.name).within(namespace));
            if let Some(pod) = watched.filter(|p| p.metadata.uid.as_deref() == Some(claim.uid.as_str())) {
                return Ok(Some(pod));
            }
        }
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&claim.name)
            .await
            .map_err(|e| AuthError::Api(format!("getting pod {namespace}/{}: {e}", claim.name)))?;
        Ok(pod.map(Arc::new))
    }
}

/// The root held by `secret`.
pub fn root_from_secret(secret: &Secret) -> Result<Ca, RootError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &'static str| {
        let bytes = data.get(key).ok_or(RootError::MissingKey(key))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| RootError::MissingKey(key))
    };
    Ca::from_pem(&text(ROOT_CERT_KEY)?, &text(ROOT_KEY_KEY)?).map_err(RootError::BadRoot)
}

/// The Secret that holds `ca`.
pub fn secret_for(ca: &Ca) -> Secret {
    let data = BTreeMap::from([
        (ROOT_CERT_KEY.to_string(), ByteString(ca.root_pem().as_bytes().to_vec())),
        (ROOT_KEY_KEY.to_string(), ByteString(ca.key_pem().as_bytes().to_vec())),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(ROOT_SECRET_NAME.into()),
            namespace: Some(ROOT_SECRET_NAMESPACE.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_string(), "warren".to_string())])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Reads the root from its Secret, creating both on first start. If another controller creates
/// the Secret between our read and our create, its root is the one used.
pub async fn load_or_create_root(client: &Client, trust_domain: &str) -> Result<Ca, RootError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ROOT_SECRET_NAMESPACE);
    if let Some(secret) = api.get_opt(ROOT_SECRET_NAME).await.map_err(RootError::Read)? {
        eprintln!("controller: mesh root from Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME}");
        return root_from_secret(&secret);
    }
    let ca = Ca::generate(trust_domain).map_err(RootError::Generate)?;
    match api.create(&PostParams::default(), &secret_for(&ca)).await {
        Ok(_) => {
            eprintln!(
                "controller: created a new mesh root in Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME}"
            );
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => {
            eprintln!(
                "controller: another controller created Secret {ROOT_SECRET_NAMESPACE}/{ROOT_SECRET_NAME} \
                 first: using its root"
            );
            root_from_secret(&api.get(ROOT_SECRET_NAME).await.map_err(RootError::Read)?)
        }
        Err(e) => Err(RootError::Create(e)),
    }
}

/// A client for `kubeconfig` (or `$KUBECONFIG`, `~/.kube/config`, the in-cluster account), as
/// the watch connects.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error =
                |message: String| KubeSourceError::Kubeconfig { path: path.to_path_buf(), message };
            let file = Kubeconfig::read_from(path).map_err(|e| kubeconfig_error(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| kubeconfig_error(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{authentication::v1::UserInfo, core::v1::PodSpec};

    use super::*;

    fn ztunnel() -> ServiceAccountRef {
        "warren-system/ztunnel".parse().unwrap()
    }

    fn review(authenticated: bool, username: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(extra.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const BOUND: [(&str, &str); 2] = [(EXTRA_POD_NAME, "ztunnel-abc"), (EXTRA_POD_UID, "uid-1")];

    #[test]
    fn only_a_bound_service_account_token_names_a_pod() {
        let me = "system:serviceaccount:warren-system:ztunnel";
        assert_eq!(
            pod_claim(&review(true, me, &BOUND)),
            Ok(PodClaim { service_account: ztunnel(), name: "ztunnel-abc".into(), uid: "uid-1".into() })
        );
        // Any ServiceAccount's bound token names its pod (what it may do is decided later).
        assert_eq!(
            pod_claim(&review(true, "system:serviceaccount:shop:waypoint", &BOUND))
                .map(|c| c.service_account),
            Ok("shop/waypoint".parse().unwrap())
        );
        let refused = |status: TokenReviewStatus| pod_claim(&status).unwrap_err();
        assert!(matches!(refused(review(false, "", &[])), AuthError::NotAuthenticated(_)));
        for user in ["admin", "system:node:node-1", "system:serviceaccount:shop", "system:serviceaccount::x"]
        {
            assert!(
                matches!(refused(review(true, user, &BOUND)), AuthError::NotAServiceAccount { .. }),
                "{user}"
            );
        }
        let legacy = refused(review(true, me, &[]));
        assert_eq!(legacy, AuthError::NotBoundToPod { service_account: "warren-system/ztunnel".into() });
        assert!(legacy.to_string().contains("projected ServiceAccount token"), "{legacy}");
        assert!(matches!(refused(review(true, me, &BOUND[..1])), AuthError::NotBoundToPod { .. }));
        assert_eq!(refused(TokenReviewStatus::default()).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_ztunnels_pod_speaks_for_its_node_any_other_pod_for_itself() {
        let claim = PodClaim { service_account: ztunnel(), name: "ztunnel-abc".into(), uid: "uid-1".into() };
        let pod = |uid: &str, account: &str, node: Option<&str>| Pod {
            metadata: ObjectMeta { uid: Some(uid.into()), ..Default::default() },
            spec: Some(PodSpec {
                service_account_name: Some(account.into()),
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            principal_of(Some(&pod("uid-1", "ztunnel", Some("node-1"))), &claim, &ztunnel()),
            Ok(Principal::Node("node-1".into()))
        );
        let waypoint = PodClaim {
            service_account: "shop/waypoint".parse().unwrap(),
            name: "waypoint-7d9f".into(),
            uid: "uid-9".into(),
        };
        assert_eq!(
            principal_of(Some(&pod("uid-9", "waypoint", Some("node-1"))), &waypoint, &ztunnel()),
            Ok(Principal::Pod {
                namespace: "shop".into(),
                service_account: "waypoint".into(),
                name: "waypoint-7d9f".into(),
                node: "node-1".into()
            })
        );
        // A ServiceAccount named like the ztunnel's, in another namespace, is just a pod.
        let impostor = PodClaim {
            service_account: "shop/ztunnel".parse().unwrap(),
            name: "ztunnel".into(),
            uid: "uid-3".into(),
        };
        assert!(matches!(
            principal_of(Some(&pod("uid-3", "ztunnel", Some("node-1"))), &impostor, &ztunnel()),
            Ok(Principal::Pod { .. })
        ));
        let refused = |p: Option<Pod>| principal_of(p.as_ref(), &claim, &ztunnel()).unwrap_err();
        assert!(matches!(refused(None), AuthError::PodGone { .. }));
        assert!(matches!(
            refused(Some(pod("uid-2", "ztunnel", Some("node-1")))),
            AuthError::PodReplaced { .. }
        ));
        assert!(matches!(
            refused(Some(pod("uid-1", "checkout", Some("node-1")))),
            AuthError::PodServiceAccount { .. }
        ));
        let refused_waypoint = |p: Option<Pod>| principal_of(p.as_ref(), &waypoint, &ztunnel()).unwrap_err();
        assert!(matches!(refused_waypoint(None), AuthError::PodGone { .. }));
        assert!(matches!(
            refused_waypoint(Some(pod("uid-1", "waypoint", Some("node-1")))),
            AuthError::PodReplaced { .. }
        ));
        assert!(matches!(
            refused_waypoint(Some(pod("uid-9", "checkout", Some("node-1")))),
            AuthError::PodServiceAccount { .. }
        ));
        assert!(matches!(
            refused_waypoint(Some(pod("uid-9", "waypoint", Some("")))),
            AuthError::NotScheduled { .. }
        ));
        let unscheduled = refused(Some(pod("uid-1", "ztunnel", None)));
        assert!(matches!(unscheduled, AuthError::NotScheduled { .. }));
        assert_eq!(unscheduled.status(), StatusCode::FORBIDDEN);
        assert_eq!(AuthError::Api("down".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn the_root_round_trips_through_its_secret() {
        let ca = Ca::generate("cluster.local").unwrap();
        let secret = secret_for(&ca);
        assert_eq!(secret.metadata.name.as_deref(), Some(ROOT_SECRET_NAME));
        assert_eq!(secret.metadata.namespace.as_deref(), Some(ROOT_SECRET_NAMESPACE));
        assert_eq!(root_from_secret(&secret).unwrap().root(), ca.root());
        let mut without_key = secret.clone();
        without_key.data.as_mut().unwrap().remove(ROOT_KEY_KEY);
        assert!(matches!(root_from_secret(&without_key), Err(RootError::MissingKey(ROOT_KEY_KEY))));
        let mut garbled = secret;
        garbled.data.as_mut().unwrap().insert(ROOT_CERT_KEY.into(), ByteString(b"not PEM".to_vec()));
        assert!(matches!(root_from_secret(&garbled), Err(RootError::BadRoot(_))));
    }

    #[test]
    fn kubernetes_mode_needs_neither_a_root_directory_nor_tokens() {
        use clap::Parser;
        let parse = |args: &str| {
            crate::Cli::try_parse_from(std::iter::once("controller").chain(args.split_whitespace()))
        };
        let Ok(crate::Cli { command: crate::Command::Serve { ca_dir, tokens, ztunnel_service_account, .. } }) =
            parse("serve --kubernetes --out f")
        else {
            panic!("serve --kubernetes without --ca-dir and --tokens is refused")
        };
        assert_eq!((ca_dir, tokens, ztunnel_service_account), (None, None, ztunnel()));
        assert!(parse("serve --kubernetes --out f --ztunnel-service-account mesh/zt").is_ok());
        for wrong in [
            "serve --dir d --out f --tokens t",
            "serve --dir d --out f --ca-dir c",
            "serve --kubernetes --out f --ztunnel-service-account ztunnel",
        ] {
            assert!(parse(wrong).is_err(), "accepted: {wrong}");
        }
    }

    #[test]
    fn service_accounts_are_namespace_slash_name() {
        assert_eq!(ztunnel().username(), "system:serviceaccount:warren-system:ztunnel");
        assert_eq!(ServiceAccountRef::from_username(&ztunnel().username()), Some(ztunnel()));
        for wrong in ["ztunnel", "/ztunnel", "warren-system/", "a/b/c"] {
            assert!(wrong.parse::<ServiceAccountRef>().is_err(), "{wrong}");
        }
    }

    fn claim(pod: &str) -> PodClaim {
        PodClaim { service_account: ztunnel(), name: pod.into(), uid: format!("uid-{pod}") }
    }

    #[test]
    fn a_review_is_reused_until_its_time_is_up() {
        let cache = ReviewCache::default();
        let now = Instant::now();
        cache.insert("token-a", claim("a"), now, now + Duration::from_secs(60));
        assert_eq!(cache.get("token-a", now + Duration::from_secs(59)), Some(claim("a")));
        assert_eq!(cache.get("token-a", now + Duration::from_secs(60)), None, "expired");
        assert_eq!(cache.get("token-b", now), None, "another token");
        assert_eq!(cache.get("token-", now), None, "the whole token is the key");
    }

    #[test]
    fn a_full_cache_drops_expired_reviews_first() {
        let cache = ReviewCache::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        cache.insert("old", claim("old"), now, now + Duration::from_secs(5));
        for i in 1..REVIEW_CACHE_MAX {
            cache.insert(&format!("t{i}"), claim("x"), now, now + Duration::from_secs(60));
        }
        // Full: the expired review goes, the live ones stay.
        cache.insert("new", claim("new"), later, later + Duration::from_secs(60));
        assert_eq!(cache.get("new", later), Some(claim("new")));
        assert_eq!(cache.get("t1", later), Some(claim("x")));
        // Full of live reviews: all go (it is only a cache), the new one is kept.
        cache.insert("newer", claim("newer"), later, later + Duration::from_secs(60));
        assert_eq!(cache.get("newer", later), Some(claim("newer")));
        assert_eq!(cache.get("t1", later), None);
    }

    /// A JWT with `payload` (unsigned: only the shape matters here).
    fn jwt(payload: &str) -> String {
        let part = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2lnbmF0dXJl", part(r#"{"alg":"RS256"}"#), part(payload))
    }

    #[test]
    fn a_review_is_never_reused_past_the_tokens_expiry() {
        let token = jwt(r#"{"iss":"https://kubernetes.default.svc","exp":1900000000}"#);
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        assert_eq!(token_expiry(&token), Some(expiry));
        for garbage in ["", "abc", "a.!!!.c", &jwt(r#"{"exp":"soon"}"#), &jwt("not json")] {
            assert_eq!(token_expiry(garbage), None, "{garbage}");
        }
        let now = Instant::now();
        let wall = expiry - Duration::from_secs(3600);
        assert_eq!(review_reused_until(now, wall, Some(expiry)), now + REVIEW_TTL, "far from expiry");
        let wall = expiry - Duration::from_secs(10);
        assert_eq!(review_reused_until(now, wall, Some(expiry)), now + Duration::from_secs(10));
        assert_eq!(review_reused_until(now, expiry + Duration::from_secs(1), Some(expiry)), now, "expired");
        assert_eq!(review_reused_until(now, wall, None), now + REVIEW_TTL, "no exp claim");
    }
}
