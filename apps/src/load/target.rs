//! What `warren-load` sends: the URL (plain `http` to a literal IP or a host name, nothing
//! else), the `-H` headers, and the request template built from them.

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host without IPv6 brackets: what to resolve or connect to.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written in the URL, for `Host` / `:authority`.
    pub authority: String,
    /// Path and query string, at least `/`.
    pub path_and_query: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{0:?} is not a valid URL")]
    Invalid(String),
    #[error("only http:// URLs are supported (h2c or HTTP/1.1 in clear text), not {0:?}")]
    Scheme(String),
    #[error("the URL needs a host: http://HOST[:PORT]/PATH")]
    NoHost,
    #[error("user information (user@host) is not supported in the URL")]
    UserInfo,
    #[error("{0:?} is neither an IP address nor a valid host name")]
    Host(String),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let uri: Uri = url.parse().map_err(|_| TargetError::Invalid(url.to_string()))?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            Some(other) => return Err(TargetError::Scheme(other.to_string())),
            None => return Err(TargetError::Scheme(String::new())),
        }
        let authority = uri.authority().ok_or(TargetError::NoHost)?;
        if authority.as_str().contains('@') {
            return Err(TargetError::UserInfo);
        }
        let host = parse_host(authority.host())?;
        Ok(Target {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}

/// A literal IPv4, a bracketed literal IPv6, or an RFC 1123 host name.
fn parse_host(host: &str) -> Result<String, TargetError> {
    let bad = || TargetError::Host(host.to_string());
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        return inner.parse::<Ipv6Addr>().map(|ip| ip.to_string()).map_err(|_| bad());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // All-numeric dotted names that failed to parse as IPv4 (e.g. 1.2.3.999) are typos.
    let numeric = name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if name.is_empty() || name.len() > 253 || numeric || !name.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(host.to_string())
}

/// One `-H 'name: value'` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: HeaderValue,
}

impl FromStr for Header {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) =
            s.split_once(':').ok_or_else(|| format!("{s:?} is not of the form 'name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{:?} is not a valid header name", name.trim()))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of {name} is not a valid header value"))?;
        Ok(Header { name, value })
    }
}

/// Everything needed to stamp out identical requests cheaply, once per request.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    /// HTTP/1.1 sends the origin form (`/path`) and a `Host` header; HTTP/2 sends the absolute
    /// URI, which hyper turns into `:scheme`/`:authority`, so a `-H host:` becomes the authority.
    pub fn new(
        target: &Target,
        http2: bool,
        method: Method,
        headers: &[Header],
        body: Bytes,
    ) -> Result<Self, String> {
        let mut map = HeaderMap::new();
        for h in headers {
            map.append(h.name.clone(), h.value.clone());
        }
        let uri = if http2 {
            let authority = match map.remove(HOST) {
                Some(host) => {
                    host.to_str().map_err(|_| "the host header is not ASCII".to_string())?.to_string()
                }
                None => target.authority.clone(),
            };
            format!("http://{authority}{}", target.path_and_query)
        } else {
            if !map.contains_key(HOST) {
                let host = HeaderValue::from_str(&target.authority).map_err(|e| e.to_string())?;
                map.insert(HOST, host);
            }
            target.path_and_query.clone()
        };
        let uri = uri.parse().map_err(|_| format!("{uri:?} is not a valid request URI"))?;
        Ok(RequestTemplate { method, uri, headers: map, body })
    }

    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, TargetError> {
        url.parse()
    }

    #[test]
    fn good_urls() {
        let t = target("http://127.0.0.1:8080/a/b?x=1&y=2").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8080));
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path_and_query, "/a/b?x=1&y=2");

        let t = target("http://[::1]:9000").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path_and_query.as_str()), ("::1", 9000, "/"));

        let t = target("http://echo.default.svc.cluster.local/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("echo.default.svc.cluster.local", 80));
        assert!(target("HTTP://localhost:80").is_ok());
    }

    #[test]
    fn bad_urls() {
        assert!(matches!(target("https://127.0.0.1/"), Err(TargetError::Scheme(_))));
        assert!(matches!(target("ftp://127.0.0.1/"), Err(TargetError::Scheme(_))));
        assert!(matches!(target("127.0.0.1:8080"), Err(TargetError::Scheme(_) | TargetError::Invalid(_))));
        assert!(matches!(target("/just/a/path"), Err(TargetError::Scheme(_))));
        assert_eq!(target("http://user@127.0.0.1/"), Err(TargetError::UserInfo));
        assert!(matches!(target("http://bad_host/"), Err(TargetError::Host(_))));
        assert!(matches!(target("http://-bad.example/"), Err(TargetError::Host(_))));
        assert!(matches!(target("http://1.2.3.999/"), Err(TargetError::Host(_))));
        assert!(target("http://exa mple/").is_err());
    }

    #[test]
    fn header_flags() {
        let h: Header = "X-Echo-Status: 418".parse().unwrap();
        assert_eq!(h.name.as_str(), "x-echo-status");
        assert_eq!(h.value, "418");
        let h: Header = "x-empty:".parse().unwrap();
        assert_eq!(h.value, "");
        let h: Header = "x-url: http://a:b".parse().unwrap();
        assert_eq!(h.value, "http://a:b");
        assert!("no-colon".parse::<Header>().is_err());
        assert!("bad name: v".parse::<Header>().is_err());
        assert!(": v".parse::<Header>().is_err());
        assert!("x: a\nb".parse::<Header>().is_err());
    }

    #[test]
    fn templates_per_protocol() {
        let t = target("http://127.0.0.1:8080/p?q=1").unwrap();
        let h1 = RequestTemplate::new(&t, false, Method::GET, &[], Bytes::new()).unwrap().build();
        assert_eq!(h1.uri(), "/p?q=1");
        assert_eq!(h1.headers()[HOST], "127.0.0.1:8080");

        let host: Header = "host: echo.test".parse().unwrap();
        let h2 = RequestTemplate::new(&t, true, Method::POST, &[host], Bytes::from("hi")).unwrap().build();
        assert_eq!(h2.uri(), "http://echo.test/p?q=1");
        assert!(h2.headers().get(HOST).is_none());
        assert_eq!(h2.method(), Method::POST);
    }
}
