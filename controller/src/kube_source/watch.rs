//! The async side of Kubernetes mode, kept thin: one reflector per kind, each reporting
//! [`Signal`]s to one loop that debounces them, rebuilds the snapshot from the stores,
//! translates it and rewrites the config file when it changed.
//!
//! Consistency comes from kube-runtime: its watcher re-lists (with backoff) after a watch error,
//! an API-server restart or an expired resourceVersion, and the reflector swaps a re-list into
//! its store atomically at `InitDone`. The snapshot is always rebuilt from the stores' whole
//! state, never from individual events, so an update is neither lost nor applied twice.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    discovery,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use warren_core::model::NodeConfig;

use super::{
    KubeSourceError,
    convert::{self, Objects},
    kinds::Kind,
    readiness::{Next, Readiness, Signal},
};

/// How Kubernetes mode runs.
pub struct Options {
    /// A kubeconfig file; `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// service account.
    pub kubeconfig: Option<PathBuf>,
    /// The config file (`--out`), for tools and development: proxies take the config stream.
    pub out: PathBuf,
    /// A change within this long of the last rebuild waits this long for the rest of its
    /// burst, rebuilt once (a rollout touches many pods); an isolated one is rebuilt at once.
    pub debounce: Duration,
    /// Where to hand the pod watch's store to others (the CA checks token holders' pods in it).
    pub share_pods: Option<SharedPods>,
}

/// A pod store, set once Kubernetes mode has started its pod watch.
pub type SharedPods = Arc<std::sync::OnceLock<Store<Pod>>>;

/// How long the first list may take before the controller says what it is waiting for.
const STARTUP_NOTICE: Duration = Duration::from_secs(10);

/// How long to wait before looking again for a CRD that is not installed.
const CRD_RETRY_MIN: Duration = Duration::from_secs(1);
const CRD_RETRY_MAX: Duration = Duration::from_secs(30);

/// Watches the API server until a fatal error, writing `options.out` and handing each new
/// config to `apply` (the CA service's view of the workloads).
pub async fn run(options: Options, mut apply: impl FnMut(Arc<NodeConfig>)) -> Result<(), KubeSourceError> {
    let client = connect(options.kubeconfig.as_deref()).await?;
    let (tx, mut rx) = unbounded_channel();
    let stores = Stores::start(&client, &tx);
    if let Some(shared) = &options.share_pods {
        let _ = shared.set(stores.pods.clone());
    }
    eprintln!("controller: watching {}", Kind::ALL.map(|k| k.to_string()).join(", "));
    let mut readiness = Readiness::default();
    let out_file = crate::out_file::OutFile::spawn(options.out.clone());
    let mut read_cache = convert::ReadCache::default();
    let mut last_findings = Vec::new();
    let mut last_rebuild: Option<tokio::time::Instant> = None;
    loop {
        let signal = if readiness.started() {
            next(&mut rx).await
        } else {
            // An unreachable server or a slow list: say what the first config is waiting for.
            match tokio::time::timeout(STARTUP_NOTICE, next(&mut rx)).await {
                Ok(signal) => signal,
                Err(_) => {
                    let pending: Vec<String> = readiness.pending().map(|k| k.to_string()).collect();
                    eprintln!(
                        "controller: no config yet: waiting for the first list of {}",
                        pending.join(", ")
                    );
                    continue;
                }
            }
        };
        if !handle(&mut readiness, signal)? {
            continue;
        }
        // Debounce, on the trailing edge only when busy: a change arriving within the window
        // of the last rebuild takes in whatever else arrives within the window, then rebuilds
        // once (a rollout touches many pods); an isolated change is rebuilt at once, with
        // whatever is already queued.
        if last_rebuild.is_some_and(|at| at.elapsed() < options.debounce) {
            let deadline = tokio::time::Instant::now() + options.debounce;
            while let Ok(signal) = tokio::time::timeout_at(deadline, next(&mut rx)).await {
                handle(&mut readiness, signal)?;
            }
        } else {
            while let Ok(signal) = rx.try_recv() {
                handle(&mut readiness, signal)?;
            }
        }
        let (snapshot, mut findings) = convert::snapshot_with(&stores.objects(), &mut read_cache);
        let (config, more) = crate::translate_snapshot(&snapshot);
        findings.extend(more);
        // Findings are reported when they change, not on every pod status update.
        let rendered: Vec<String> = findings.iter().map(ToString::to_string).collect();
        if rendered != last_findings {
            crate::report(&findings);
            last_findings = rendered;
        }
        // Proxies first (the hub publishes a new version only when the config changed), then
        // the file, for tools and development, by a thread of its own at the lowest priority.
        let config = Arc::new(config);
        apply(config.clone());
        out_file.write(config);
        last_rebuild = Some(tokio::time::Instant::now());
    }
}

async fn next(rx: &mut UnboundedReceiver<Signal>) -> Signal {
    // The per-kind tasks loop forever and hold senders: the channel never closes.
    rx.recv().await.expect("the watch tasks never end")
}

/// Feeds `signal` to `readiness`; whether a rebuild is due.
fn handle(readiness: &mut Readiness, signal: Signal) -> Result<bool, KubeSourceError> {
    match readiness.on(signal)? {
        Next::Rebuild => Ok(true),
        Next::Wait => Ok(false),
        Next::Warn(message) => {
            eprintln!("controller: {message}");
            Ok(false)
        }
    }
}

async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| KubeSourceError::Kubeconfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.map_err(|e| {
                KubeSourceError::Kubeconfig { path: path.to_path_buf(), message: e.to_string() }
            })?
        }
        None => kube::Config::infer().await.map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    eprintln!("controller: Kubernetes API server {}", config.cluster_url);
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Readers of every kind's store. A CRD kind's store is replaced whenever its CRD is
/// (re-)discovered, since a store is tied to one API version.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    service_accounts: Store<ServiceAccount>,
    dynamic: BTreeMap<Kind, Arc<Mutex<Option<Store<DynamicObject>>>>>,
}

impl Stores {
    fn start(client: &Client, tx: &UnboundedSender<Signal>) -> Self {
        let dynamic = Kind::DYNAMIC
            .into_iter()
            .map(|kind| {
                let slot = Arc::new(Mutex::new(None));
                tokio::spawn(watch_crd_kind(kind, client.clone(), slot.clone(), tx.clone()));
                (kind, slot)
            })
            .collect();
        Stores {
            namespaces: start_core(Kind::Namespace, client, tx),
            pods: start_core(Kind::Pod, client, tx),
            services: start_core(Kind::Service, client, tx),
            service_accounts: start_core(Kind::ServiceAccount, client, tx),
            dynamic,
        }
    }

    fn objects(&self) -> Objects {
        Objects {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            service_accounts: self.service_accounts.state(),
            dynamic: self
                .dynamic
                .iter()
                .map(|(kind, slot)| {
                    let store = slot.lock().expect("store slot poisoned");
                    (*kind, store.as_ref().map(Store::state).unwrap_or_default())
                })
                .collect(),
        }
    }
}

fn start_core<K>(kind: Kind, client: &Client, tx: &UnboundedSender<Signal>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let tx = tx.clone();
    let api = Api::<K>::all(client.clone());
    tokio::spawn(async move {
        follow(kind, reflect(writer, api), &tx).await;
    });
    store
}

/// A reflector over `api`: the watcher re-lists with kube's default backoff after errors.
/// managedFields are dropped before storing: Warren never reads them and they are most of an
/// object's size.
fn reflect<K>(writer: Writer<K>, api: Api<K>) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear());
    reflector::reflector(writer, events)
}

/// How a watch stream ended.
enum Ended {
    /// The resource is gone (its CRD was deleted).
    NotFound,
}

/// Turns a reflector's events into signals; returns only if the resource disappears.
async fn follow<K>(
    kind: Kind,
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    tx: &UnboundedSender<Signal>,
) -> Ended {
    let mut events = std::pin::pin!(events);
    let mut failing: Option<String> = None;
    while let Some(event) = events.next().await {
        let signal = match event {
            Ok(event) => {
                if failing.take().is_some() {
                    eprintln!("controller: watching {kind} again");
                }
                match event {
                    watcher::Event::InitDone => Signal::Synced(kind),
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => Signal::Changed,
                    // Mid-(re)list: the store swaps the list in at InitDone.
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                }
            }
            Err(e) => {
                let status = api_status(&e);
                if let Some((404, _)) = status
                    && kind.is_dynamic()
                {
                    return Ended::NotFound;
                }
                // During an API-server restart every retry fails the same way: say it once.
                let message = e.to_string();
                if failing.as_deref() == Some(message.as_str()) {
                    continue;
                }
                failing = Some(message.clone());
                match status {
                    Some((code @ (401 | 403), message)) => {
                        Signal::Refused { kind, forbidden: code == 403, message }
                    }
                    _ => {
                        eprintln!("controller: watching {kind} failed: {message}; retrying with backoff");
                        continue;
                    }
                }
            }
        };
        if tx.send(signal).is_err() {
            // The loop has stopped (fatal error): nothing to report to any more.
            break;
        }
    }
    std::future::pending().await
}

/// The API server's status code and message, when the failure is an API answer.
fn api_status(e: &watcher::Error) -> Option<(u16, String)> {
    let client_error = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(status) => return Some((status.code, status.message.clone())),
        watcher::Error::NoResourceVersion => return None,
    };
    match client_error {
        kube::Error::Api(status) => Some((status.code, status.message.clone())),
        _ => None,
    }
}

/// A CRD kind: find the version the server prefers, reflect it; while the CRD is not installed,
/// report the kind as missing once and look again with backoff, so that a missing CRD never
/// holds up the rest and installing it later is picked up.
async fn watch_crd_kind(
    kind: Kind,
    client: Client,
    slot: Arc<Mutex<Option<Store<DynamicObject>>>>,
    tx: UnboundedSender<Signal>,
) {
    let mut missing_reported = false;
    let mut retry = CRD_RETRY_MIN;
    loop {
        match discover(&client, kind).await {
            Ok(Some(resource)) => {
                if missing_reported {
                    eprintln!("controller: {kind} is installed now; watching it");
                }
                missing_reported = false;
                retry = CRD_RETRY_MIN;
                let writer = Writer::new(resource.clone());
                *slot.lock().expect("store slot poisoned") = Some(writer.as_reader());
                let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
                let Ended::NotFound = follow(kind, reflect(writer, api), &tx).await;
                // The CRD was deleted, and its objects with it.
                *slot.lock().expect("store slot poisoned") = None;
                eprintln!("controller: {kind} was removed; its objects read as absent");
                let _ = tx.send(Signal::Changed);
                continue;
            }
            Ok(None) => {
                if !missing_reported {
                    eprintln!(
                        "controller: warning: the CRD {kind} is not installed; {} objects read as absent \
                         until it is (checking again with backoff)",
                        kind.kind()
                    );
                    missing_reported = true;
                    if tx.send(Signal::Missing(kind)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => match &e {
                kube::Error::Api(status) if matches!(status.code, 401 | 403) => {
                    let forbidden = status.code == 403;
                    let _ = tx.send(Signal::Refused { kind, forbidden, message: status.message.clone() });
                }
                _ => eprintln!("controller: looking up {kind} failed: {e}; retrying with backoff"),
            },
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(CRD_RETRY_MAX);
    }
}

/// The kind's resource at the group's preferred version (or the first other version serving
/// it); `None` when the group or kind is not served.
async fn discover(client: &Client, kind: Kind) -> Result<Option<ApiResource>, kube::Error> {
    let group = match discovery::group(client, kind.group()).await {
        Ok(group) => group,
        Err(kube::Error::Discovery(_)) => return Ok(None),
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(e) => return Err(e),
    };
    if let Some((resource, _)) = group.recommended_kind(kind.kind()) {
        return Ok(Some(resource));
    }
    let versions: Vec<String> = group.versions().map(str::to_string).collect();
    Ok(versions
        .iter()
        .flat_map(|v| group.versioned_resources(v))
        .find(|(resource, _)| resource.kind == kind.kind())
        .map(|(resource, _)| resource))
}
