//! Route selection: which HTTP route of which VirtualService (or HTTPRoute) handles a request,
//! and which weighted destination it goes to. Pure functions over a compiled [`RouteTable`],
//! unit-tested without sockets.

use std::sync::Arc;

use http::HeaderMap;
use regex::Regex;
use warren_core::{
    FastMap,
    l7::{HttpRoute, RequestMatch, RouteDestination, StringMatch, VirtualService},
    model::Workload,
};

use crate::retry::RetryPolicy;

/// A string matcher ready to run (regexes compiled, anchored: Istio regexes match the whole
/// value).
#[derive(Clone, Debug)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    PathPrefix(String),
    Present,
}

impl Matcher {
    pub fn compile(m: &StringMatch) -> Result<Self, regex::Error> {
        Ok(match m {
            StringMatch::Exact(s) => Matcher::Exact(s.clone()),
            StringMatch::Prefix(s) => Matcher::Prefix(s.clone()),
            StringMatch::Regex(r) => Matcher::Regex(Regex::new(&format!("^(?:{r})$"))?),
            StringMatch::PathPrefix(s) => Matcher::PathPrefix(s.trim_end_matches('/').to_string()),
            StringMatch::Present => Matcher::Present,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => value == s,
            Matcher::Prefix(s) => value.starts_with(s.as_str()),
            Matcher::Regex(r) => r.is_match(value),
            Matcher::PathPrefix(p) => {
                value.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Matcher::Present => true,
        }
    }

    /// Case-insensitive (`ignoreUriCase`): both sides lower-cased; regexes get the `(?i)` flag
    /// at compile time instead.
    fn matches_ignoring_case(&self, value: &str) -> bool {
        let lower = value.to_ascii_lowercase();
        match self {
            Matcher::Exact(s) => lower == s.to_ascii_lowercase(),
            Matcher::Prefix(s) => lower.starts_with(&s.to_ascii_lowercase()),
            Matcher::PathPrefix(p) => Matcher::PathPrefix(p.to_ascii_lowercase()).matches(&lower),
            Matcher::Regex(_) | Matcher::Present => self.matches(value),
        }
    }

    /// The matched prefix, for `rewrite.uri` (which replaces only that part).
    pub fn prefix(&self) -> Option<&str> {
        match self {
            Matcher::Prefix(p) | Matcher::PathPrefix(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CompiledMatch {
    pub uri: Option<Matcher>,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    query_params: Vec<(String, Matcher)>,
    without_headers: Vec<(String, Matcher)>,
    ignore_uri_case: bool,
    port: Option<u16>,
    source_labels: Vec<(String, String)>,
    source_namespace: Option<String>,
}

/// What a request offers to matching.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request arrived on.
    pub port: u16,
    pub source: Option<&'a Workload>,
}

fn compile_map(
    map: &std::collections::BTreeMap<String, StringMatch>,
) -> Result<Vec<(String, Matcher)>, regex::Error> {
    map.iter().map(|(k, m)| Ok((k.to_ascii_lowercase(), Matcher::compile(m)?))).collect()
}

impl CompiledMatch {
    fn compile(m: &RequestMatch) -> Result<Self, regex::Error> {
        let opt = |m: &Option<StringMatch>| m.as_ref().map(Matcher::compile).transpose();
        let mut uri = opt(&m.uri)?;
        if m.ignore_uri_case
            && let Some(StringMatch::Regex(r)) = &m.uri
        {
            uri = Some(Matcher::Regex(Regex::new(&format!("(?i)^(?:{r})$"))?));
        }
        Ok(Self {
            uri,
            scheme: opt(&m.scheme)?,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            headers: compile_map(&m.headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| Ok((k.clone(), Matcher::compile(v)?)))
                .collect::<Result<_, regex::Error>>()?,
            without_headers: compile_map(&m.without_headers)?,
            ignore_uri_case: m.ignore_uri_case,
            port: m.port,
            source_labels: m.source_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            source_namespace: m.source_namespace.clone(),
        })
    }

    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let uri_ok = self.uri.as_ref().is_none_or(|m| {
            if self.ignore_uri_case { m.matches_ignoring_case(r.path) } else { m.matches(r.path) }
        });
        let header = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok());
        uri_ok
            && self.scheme.as_ref().is_none_or(|m| m.matches(r.scheme))
            && self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self.authority.as_ref().is_none_or(|m| m.matches(r.authority))
            && self.headers.iter().all(|(name, m)| header(name).is_some_and(|v| m.matches(v)))
            && self.without_headers.iter().all(|(name, m)| !header(name).is_some_and(|v| m.matches(v)))
            && self
                .query_params
                .iter()
                .all(|(name, m)| query_param(r.query, name).is_some_and(|v| m.matches(&v)))
            && self.port.is_none_or(|p| p == r.port)
            && self.source_namespace.as_ref().is_none_or(|ns| r.source.is_some_and(|s| &s.namespace == ns))
            && self.source_labels.iter().all(|(k, v)| r.source.is_some_and(|s| s.labels.get(k) == Some(v)))
    }
}

/// The value of query parameter `name` (percent-decoding is not applied, as Envoy compares the
/// raw value).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_string())
    })
}

/// One HTTP route with its matches compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    /// `VirtualService ns/name route 1 ("canary")`, for logs and response flags' explanations
    /// (written once here rather than per request).
    pub description: Arc<str>,
    pub route: HttpRoute,
    pub matches: Vec<CompiledMatch>,
    pub uri_regex_rewrite: Option<(Regex, String)>,
    /// `route.retries` compiled; none when the route has `attempts: 0`.
    pub retries: RetryPolicy,
    total_weight: u64,
}

impl CompiledRoute {
    /// The first match that holds (an empty list matches everything).
    pub fn matching(&self, r: &RequestFacts<'_>) -> Option<Option<&CompiledMatch>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find(|m| m.matches(r)).map(Some)
    }

    /// A destination by weight; `roll` is uniform in `0..1`.
    pub fn pick(&self, roll: f64) -> Option<&RouteDestination> {
        if self.total_weight == 0 {
            return self.route.route.first();
        }
        let mut point = (roll * self.total_weight as f64) as u64;
        for d in &self.route.route {
            if point < u64::from(d.weight) {
                return Some(d);
            }
            point -= u64::from(d.weight);
        }
        self.route.route.last()
    }
}

/// A route that could not be compiled: skipped (never silently), shown at `/config_dump`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RouteError {
    pub route: String,
    pub error: String,
}

/// Every service host's routes, in order.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: FastMap<String, Vec<Arc<CompiledRoute>>>,
    pub errors: Vec<RouteError>,
}

impl RouteTable {
    pub fn build(virtual_services: &[VirtualService]) -> Self {
        let mut table = RouteTable::default();
        for vs in virtual_services {
            let source: Arc<str> = vs.display_name().into();
            for (index, route) in vs.http.iter().enumerate() {
                match compile_route(source.clone(), index, route) {
                    Ok(compiled) => {
                        let compiled = Arc::new(compiled);
                        for host in &vs.hosts {
                            table.by_host.entry(host.clone()).or_default().push(compiled.clone());
                        }
                    }
                    Err(e) => table.errors.push(RouteError {
                        route: format!("{source} route {index}"),
                        error: format!("invalid regex, route skipped: {e}"),
                    }),
                }
            }
        }
        table
    }

    /// Whether any route is declared for `host` (no routes: straight to the service).
    pub fn has_routes(&self, host: &str) -> bool {
        self.by_host.contains_key(host)
    }

    /// The route for a request to `host`, and the match that selected it.
    pub fn select<'t>(
        &'t self,
        host: &str,
        r: &RequestFacts<'_>,
    ) -> Option<(&'t Arc<CompiledRoute>, Option<&'t CompiledMatch>)> {
        self.by_host.get(host)?.iter().find_map(|route| route.matching(r).map(|m| (route, m)))
    }
}

fn compile_route(source: Arc<str>, index: usize, route: &HttpRoute) -> Result<CompiledRoute, regex::Error> {
    let matches = route.matches.iter().map(CompiledMatch::compile).collect::<Result<_, _>>()?;
    let uri_regex_rewrite = match route.rewrite.as_ref().and_then(|r| r.uri_regex.as_ref()) {
        Some(r) => Some((Regex::new(&r.regex)?, envoy_to_regex_replacement(&r.rewrite))),
        None => None,
    };
    let description = match &route.name {
        Some(name) => format!("{source} route {index} ({name:?})"),
        None => format!("{source} route {index}"),
    };
    Ok(CompiledRoute {
        description: description.into(),
        total_weight: route.route.iter().map(|d| u64::from(d.weight)).sum(),
        route: route.clone(),
        matches,
        uri_regex_rewrite,
        retries: route.retries.as_ref().map(RetryPolicy::compile).unwrap_or_default(),
    })
}

/// Istio writes group references as `\1`; the regex crate wants `${1}`.
fn envoy_to_regex_replacement(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// The path after `rewrite`: full path, matched prefix, or regex rewrite.
pub fn rewrite_path(route: &CompiledRoute, matched: Option<&CompiledMatch>, path: &str) -> Option<String> {
    let rewrite = route.route.rewrite.as_ref()?;
    if let Some(full) = &rewrite.full_path {
        return Some(full.clone());
    }
    if let Some(uri) = &rewrite.uri {
        let prefix = matched.and_then(|m| m.uri.as_ref()).and_then(Matcher::prefix);
        return Some(match prefix {
            Some(p) if path.len() >= p.len() => {
                let rest = &path[p.len()..];
                // `/api` → `/` on `/api/x` must give `/x`, not `//x`.
                if uri.ends_with('/') && rest.starts_with('/') {
                    format!("{}{}", uri.trim_end_matches('/'), rest)
                } else if uri.is_empty() && !rest.starts_with('/') {
                    format!("/{rest}")
                } else {
                    format!("{uri}{rest}")
                }
            }
            _ => uri.clone(),
        });
    }
    let (regex, replacement) = route.uri_regex_rewrite.as_ref()?;
    Some(regex.replace_all(path, replacement.as_str()).into_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use warren_core::l7::{Destination, Rewrite};

    use super::*;

    fn dest(subset: &str, weight: u32) -> RouteDestination {
        RouteDestination {
            destination: Destination {
                host: "payment.shop.svc.cluster.local".into(),
                subset: Some(subset.into()),
                port: None,
            },
            weight,
            headers: Default::default(),
        }
    }

    fn vs(http: Vec<HttpRoute>) -> VirtualService {
        VirtualService {
            name: "payment".into(),
            namespace: "shop".into(),
            kind: Default::default(),
            hosts: vec!["payment.shop.svc.cluster.local".into()],
            http,
        }
    }

    fn facts<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestFacts {
            method: "GET",
            path,
            query,
            scheme: "http",
            authority: "payment",
            headers,
            port: 80,
            source: None,
        }
    }

    fn beta_then_canary() -> RouteTable {
        let beta = HttpRoute {
            name: Some("beta".into()),
            matches: vec![RequestMatch {
                headers: BTreeMap::from([("x-beta-user".into(), StringMatch::Exact("true".into()))]),
                ..Default::default()
            }],
            route: vec![dest("v2", 100)],
            ..Default::default()
        };
        let canary = HttpRoute { route: vec![dest("v1", 95), dest("v2", 5)], ..Default::default() };
        RouteTable::build(&[vs(vec![beta, canary])])
    }

    #[test]
    fn first_matching_route_wins_and_weights_split() {
        let table = beta_then_canary();
        let mut beta = HeaderMap::new();
        beta.insert("x-beta-user", "true".parse().unwrap());
        let (route, _) = table.select("payment.shop.svc.cluster.local", &facts("/", &beta)).unwrap();
        assert_eq!(route.route.name.as_deref(), Some("beta"));

        let none = HeaderMap::new();
        let (route, _) = table.select("payment.shop.svc.cluster.local", &facts("/", &none)).unwrap();
        let subset = |roll| route.pick(roll).unwrap().destination.subset.clone().unwrap();
        assert_eq!(subset(0.0), "v1");
        assert_eq!(subset(0.9499), "v1");
        assert_eq!(subset(0.95), "v2");
        assert_eq!(subset(0.99999), "v2");
        let v2 = (0..10_000).filter(|i| subset(f64::from(*i) / 10_000.0) == "v2").count();
        assert_eq!(v2, 500);
        assert!(table.select("other.shop.svc.cluster.local", &facts("/", &none)).is_none());
    }

    #[test]
    fn matchers_follow_istio_semantics() {
        let headers = HeaderMap::new();
        let m = |rm: RequestMatch, path: &str| {
            CompiledMatch::compile(&rm).unwrap().matches(&facts(path, &headers))
        };
        let uri = |sm| RequestMatch { uri: Some(sm), ..Default::default() };
        assert!(m(uri(StringMatch::Prefix("/api".into())), "/apix"));
        assert!(!m(uri(StringMatch::PathPrefix("/api".into())), "/apix"));
        assert!(m(uri(StringMatch::PathPrefix("/api/".into())), "/api/x"));
        assert!(m(uri(StringMatch::PathPrefix("/api".into())), "/api"));
        // Regexes match the whole value.
        assert!(!m(uri(StringMatch::Regex("/v[0-9]".into())), "/v1/x"));
        assert!(m(uri(StringMatch::Regex("/v[0-9]/.*".into())), "/v1/x"));
        let ci = RequestMatch {
            uri: Some(StringMatch::Exact("/Charge".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        assert!(m(ci, "/CHARGE"));
        let q = RequestMatch {
            query_params: BTreeMap::from([("debug".into(), StringMatch::Exact("1".into()))]),
            ..Default::default()
        };
        assert!(m(q.clone(), "/x?a=2&debug=1"));
        assert!(!m(q, "/x?debug=0"));
        let without = RequestMatch {
            without_headers: BTreeMap::from([("x-skip".into(), StringMatch::Present)]),
            ..Default::default()
        };
        assert!(m(without, "/"));
    }

    #[test]
    fn rewrites_replace_the_matched_prefix() {
        let route = |rewrite: Rewrite, matched: StringMatch| {
            let r = HttpRoute {
                matches: vec![RequestMatch { uri: Some(matched), ..Default::default() }],
                rewrite: Some(rewrite),
                route: vec![dest("v1", 100)],
                ..Default::default()
            };
            RouteTable::build(&[vs(vec![r])])
        };
        let headers = HeaderMap::new();
        let apply = |table: RouteTable, path: &str| {
            let (route, matched) =
                table.select("payment.shop.svc.cluster.local", &facts(path, &headers)).unwrap();
            rewrite_path(route, matched, path)
        };
        let prefix = Rewrite { uri: Some("/v2/".into()), ..Default::default() };
        assert_eq!(
            apply(route(prefix, StringMatch::Prefix("/v1/".into())), "/v1/pay"),
            Some("/v2/pay".into())
        );
        let root = Rewrite { uri: Some("/".into()), ..Default::default() };
        assert_eq!(apply(route(root, StringMatch::Prefix("/api".into())), "/api/x"), Some("/x".into()));
        let regex = Rewrite {
            uri_regex: Some(warren_core::l7::RegexRewrite {
                regex: "^/service/([^/]+)(/.*)$".into(),
                rewrite: "\\2/instance/\\1".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            apply(route(regex, StringMatch::Prefix("/service".into())), "/service/foo/bar"),
            Some("/bar/instance/foo".into())
        );
    }

    #[test]
    fn a_bad_regex_skips_only_its_route_and_says_which() {
        let bad = HttpRoute {
            matches: vec![RequestMatch { uri: Some(StringMatch::Regex("(".into())), ..Default::default() }],
            route: vec![dest("v1", 100)],
            ..Default::default()
        };
        let good = HttpRoute { route: vec![dest("v2", 100)], ..Default::default() };
        let table = RouteTable::build(&[vs(vec![bad, good])]);
        assert_eq!(table.errors.len(), 1);
        assert!(table.errors[0].route.contains("VirtualService shop/payment route 0"), "{:?}", table.errors);
        let headers = HeaderMap::new();
        let (route, _) = table.select("payment.shop.svc.cluster.local", &facts("/", &headers)).unwrap();
        assert_eq!(&*route.description, "VirtualService shop/payment route 1");
    }
}
