//! What a consistent-hash load balancer hashes (Istio's `consistentHash`): a header, a cookie,
//! a query parameter or the source IP. A request without its key goes to a random endpoint, as
//! in Envoy — hashing the missing key as "" would send every such request to one endpoint. A
//! cookie key with a `ttl` is made up for a request that has none: hashed in its place and set
//! on the response, so that the client's next requests reach the same endpoint.

use std::{borrow::Cow, net::IpAddr};

use http::{HeaderMap, HeaderValue, header};
use warren_core::l7::{HashCookie, HashKey, LoadBalancer};

/// What the load balancer may hash on.
pub struct HashInput<'a> {
    pub headers: &'a HeaderMap,
    pub source_ip: IpAddr,
    /// The request's query string.
    pub query: Option<&'a str>,
    /// The cookie made for this request, which had none ([`make_cookie`]).
    pub made_cookie: Option<&'a str>,
}

/// The value to hash for `key`, or none when the request lacks it.
pub fn hash_value<'a>(key: &HashKey, input: &HashInput<'a>) -> Option<Cow<'a, str>> {
    match key {
        HashKey::HttpHeaderName(name) => {
            input.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(Cow::Borrowed)
        }
        HashKey::HttpCookie(cookie) => {
            cookie_value(input.headers, &cookie.name).or(input.made_cookie).map(Cow::Borrowed)
        }
        HashKey::HttpQueryParameterName(name) => query_value(input.query?, name).map(Cow::Borrowed),
        HashKey::UseSourceIp => Some(Cow::Owned(input.source_ip.to_string())),
    }
}

/// The value of cookie `name` among the request's `cookie` headers (HTTP/2 may split them).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
    })
}

/// The first value of parameter `name` in `query` (as sent, not decoded: the same text always
/// hashes the same).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A cookie made for a request that lacked it.
pub struct MadeCookie {
    pub value: String,
    /// The response's `set-cookie`.
    pub set_cookie: HeaderValue,
}

/// The cookie to make when `lb` hashes a cookie with a `ttl` and the request has none.
pub fn make_cookie(lb: Option<&LoadBalancer>, headers: &HeaderMap) -> Option<MadeCookie> {
    let Some(LoadBalancer::ConsistentHash(HashKey::HttpCookie(cookie))) = lb else { return None };
    let ttl_ms = cookie.ttl_ms?;
    if cookie_value(headers, &cookie.name).is_some() {
        return None;
    }
    let value = format!("{:016x}", fastrand::u64(..));
    let set_cookie = HeaderValue::try_from(set_cookie_line(cookie, &value, ttl_ms)).ok()?;
    Some(MadeCookie { value, set_cookie })
}

fn set_cookie_line(cookie: &HashCookie, value: &str, ttl_ms: u64) -> String {
    let mut line = format!("{}={value}", cookie.name);
    // A ttl of 0 asks for a session cookie: no Max-Age.
    if ttl_ms > 0 {
        line.push_str(&format!("; Max-Age={}", ttl_ms.div_ceil(1000)));
    }
    if let Some(path) = &cookie.path {
        line.push_str(&format!("; Path={path}"));
    }
    line.push_str("; HttpOnly");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    fn input<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> HashInput<'a> {
        HashInput { headers, source_ip: "10.0.0.9".parse().unwrap(), query, made_cookie: None }
    }

    fn cookie_key(ttl_ms: Option<u64>) -> HashKey {
        HashKey::HttpCookie(HashCookie { name: "session".into(), path: Some("/shop".into()), ttl_ms })
    }

    #[test]
    fn each_key_is_read_where_it_is_and_missing_ones_are_none() {
        let h = headers(&[("x-user", "alice"), ("cookie", "a=1; session=abc"), ("cookie", "b=2")]);
        let value = |key: &HashKey, query| hash_value(key, &input(&h, query)).map(|v| v.into_owned());
        assert_eq!(value(&HashKey::HttpHeaderName("x-user".into()), None).as_deref(), Some("alice"));
        assert_eq!(value(&HashKey::HttpHeaderName("x-tenant".into()), None), None);
        assert_eq!(value(&cookie_key(None), None).as_deref(), Some("abc"));
        let other = HashKey::HttpCookie(HashCookie { name: "sess".into(), ..Default::default() });
        assert_eq!(value(&other, None), None, "a name that only prefixes another is not it");
        let param = HashKey::HttpQueryParameterName("user".into());
        assert_eq!(value(&param, Some("a=1&user=bob&user=eve")).as_deref(), Some("bob"));
        assert_eq!(value(&param, Some("username=bob")), None);
        assert_eq!(value(&param, None), None);
        assert_eq!(value(&HashKey::UseSourceIp, None).as_deref(), Some("10.0.0.9"));
    }

    #[test]
    fn a_cookie_is_made_only_for_a_key_with_a_ttl_and_a_request_without_it() {
        let lb = |ttl| LoadBalancer::ConsistentHash(cookie_key(ttl));
        let none = HeaderMap::new();
        let made = make_cookie(Some(&lb(Some(3_600_000))), &none).expect("made");
        assert_eq!(made.value.len(), 16);
        assert_eq!(made.set_cookie, format!("session={}; Max-Age=3600; Path=/shop; HttpOnly", made.value));
        let session = make_cookie(Some(&lb(Some(0))), &none).unwrap();
        assert!(!session.set_cookie.to_str().unwrap().contains("Max-Age"), "ttl 0: a session cookie");
        assert!(make_cookie(Some(&lb(None)), &none).is_none(), "no ttl: none made");
        let has = headers(&[("cookie", "session=abc")]);
        assert!(make_cookie(Some(&lb(Some(1000))), &has).is_none(), "the client has one");
        // The made cookie is what the request hashes on.
        let with = HashInput { made_cookie: Some(&made.value), ..input(&none, None) };
        assert_eq!(hash_value(&cookie_key(Some(1)), &with).as_deref(), Some(made.value.as_str()));
    }
}
