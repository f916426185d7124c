//! What the waypoint does to a request's headers on the way upstream, and to a response's on
//! the way back: route header operations, hop-by-hop headers stripped, and the forwarding
//! headers Envoy adds.

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use warren_core::l7::HeaderOperations;

/// The header values the waypoint writes into one request, all in one shared buffer. Made
/// one by one, each was an allocation, and another the first time the header map was copied
/// for an attempt (a freshly copied value is not yet shareable); from here they cost two
/// allocations together and a count each per copy.
pub struct WrittenValues(BytesMut);

impl WrittenValues {
    /// Room for the trace headers, a request id and a forwarded-for chain of a few hops.
    pub fn new() -> Self {
        WrittenValues(BytesMut::with_capacity(256))
    }

    /// A value made of `parts` in order (`None` if it is not a valid header value).
    pub fn value(&mut self, parts: &[&[u8]]) -> Option<HeaderValue> {
        for part in parts {
            self.0.extend_from_slice(part);
        }
        HeaderValue::from_maybe_shared(self.0.split().freeze()).ok()
    }

    /// A value no other request carries (a trace or request id), marked so that HTTP/2 sends
    /// it as a literal instead of adding it to the connection's HPACK table. Added, each one
    /// would be sent once, never referenced, and push out the entries that repeat on every
    /// request (authority, user agent, content type), which then go out in full again.
    pub fn unique_value(&mut self, parts: &[&[u8]]) -> Option<HeaderValue> {
        let mut value = self.value(parts)?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// A route's header operations, in Envoy's order: remove, then set, then add.
pub fn apply(ops: &HeaderOperations, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
}

/// Headers that belong to one hop and must not be forwarded. `te: trailers` is the exception,
/// as in Envoy: gRPC servers require it (and HTTP/2 allows no other `te`), so a `te` that
/// lists `trailers` goes on as just that.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const COUNT: usize = 8;
    const STRIPPED: [HeaderName; COUNT] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        HeaderName::from_static("http2-settings"),
        header::HOST,
    ];
    // A request carries one or two of these: found in one pass over its (few) header names
    // rather than by hashing all eight names into the map. `content-length` is not among
    // them: the body goes on unchanged, whole or streamed, and its length with it.
    let mut found: [Option<HeaderName>; COUNT] = Default::default();
    for (slot, name) in found.iter_mut().zip(headers.keys().filter(|name| STRIPPED.contains(name))) {
        *slot = Some(name.clone());
    }
    let accepts_trailers = found.iter().flatten().any(|name| name == header::TE)
        && headers.get_all(header::TE).iter().any(|v| lists(v.as_bytes(), "trailers"));
    // The headers `connection` names belong to this hop too (RFC 9110, 7.6.1).
    let connection: Vec<HeaderValue> = match found.iter().flatten().any(|name| name == header::CONNECTION) {
        true => headers.get_all(header::CONNECTION).iter().cloned().collect(),
        false => Vec::new(),
    };
    for name in found.into_iter().flatten() {
        headers.remove(name);
    }
    for value in &connection {
        for option in value.as_bytes().split(|&b| b == b',') {
            // Names that are not header names (`close`) find nothing; `te` follows the rule above.
            if let Ok(name) = std::str::from_utf8(option.trim_ascii())
                && !name.eq_ignore_ascii_case("te")
            {
                headers.remove(name);
            }
        }
    }
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a comma-separated header value (`trailers, deflate;q=0.5`, `keep-alive, Upgrade`)
/// lists `token`, parameters aside, in any case.
pub fn lists(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|item| {
        let name = item.split(|&b| b == b';').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(token.as_bytes())
    })
}

/// `x-forwarded-for`, and an `x-request-id` when the client sent none, as Envoy adds them.
pub fn add_forwarding(headers: &mut HeaderMap, client_ip: &HeaderValue, values: &mut WrittenValues) {
    const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    let forwarded_for = match headers.get(FORWARDED_FOR) {
        None => Some(client_ip.clone()),
        Some(existing) => values.value(&[existing.as_bytes(), b", ", client_ip.as_bytes()]),
    };
    if let Some(v) = forwarded_for {
        headers.insert(FORWARDED_FOR, v);
    }
    if !headers.contains_key(REQUEST_ID)
        && let Some(v) = values.unique_value(&[crate::trace::TraceId::random().as_bytes()])
    {
        headers.insert(REQUEST_ID, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("host", "a"),
            ("connection", "keep-alive"),
            ("connection", "te"),
            ("x-kept", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "deflate"),
            ("http2-settings", "x"),
            ("proxy-connection", "close"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "2"),
        ] {
            h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
        assert_eq!(h.get_all("x-kept").iter().count(), 2);

        // The headers `connection` names go too, whatever their case and spacing.
        let mut named = HeaderMap::new();
        named.append(header::CONNECTION, HeaderValue::from_static("close, X-Hop-Secret ,x-trace-hop"));
        named.append(header::CONNECTION, HeaderValue::from_static("x-other-hop, bad name, te"));
        for name in ["x-hop-secret", "x-trace-hop", "x-other-hop", "x-end-to-end"] {
            named.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        named.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut named);
        assert_eq!(named.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-end-to-end", "te"]);
        let mut plain = HeaderMap::new();
        plain.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2, "end-to-end headers, the body's length among them, stay");
    }

    #[test]
    fn te_goes_on_as_trailers_only_when_the_client_accepts_trailers() {
        let forwarded = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TE, HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h);
            h.get_all(header::TE).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(forwarded(&["trailers"]), ["trailers"]);
        assert_eq!(forwarded(&["deflate;q=0.5, Trailers"]), ["trailers"]);
        assert_eq!(forwarded(&["gzip", " trailers ;q=1"]), ["trailers"]);
        assert!(forwarded(&["gzip, deflate"]).is_empty());
        assert!(forwarded(&["trailersx"]).is_empty());
        assert!(forwarded(&[]).is_empty());
    }

    #[test]
    fn header_operations_remove_then_set_then_add() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        let ops = HeaderOperations {
            set: [("x-a".to_string(), "2".to_string())].into(),
            add: [("x-c".to_string(), "3".to_string())].into(),
            remove: vec!["x-b".into()],
        };
        apply(&ops, &mut h);
        assert_eq!(h["x-a"], "2");
        assert!(!h.contains_key("x-b"));
        assert_eq!(h["x-c"], "3");
    }

    #[test]
    fn forwarding_headers_extend_what_the_client_sent() {
        let client = HeaderValue::from_static("10.0.0.7");
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, &client, &mut WrittenValues::new());
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        let id = h["x-request-id"].to_str().unwrap();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        // A new id each request: kept out of HPACK's table. The client's address repeats.
        assert!(h["x-request-id"].is_sensitive());
        assert!(!h["x-forwarded-for"].is_sensitive());

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1, 10.0.0.2"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let mut values = WrittenValues::new();
        add_forwarding(&mut h, &client, &mut values);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.0.0.2, 10.0.0.7");
        assert_eq!(h["x-request-id"], "abc", "the client's request id is kept");
    }
}
