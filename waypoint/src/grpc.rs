//! gRPC as the waypoint sees it: telling a gRPC call by its content type, reading its status,
//! and answering one that the waypoint fails itself as Envoy does (trailers-only, HTTP 200).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header};
use http_body_util::{Either, Full};

use crate::forward::ResponseBody;

/// A gRPC call: `content-type: application/grpc` or `application/grpc+FORMAT`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+"))
    })
}

/// `response` (written here, with its text body) as Envoy answers a gRPC call it fails itself:
/// HTTP 200, trailers-only, `code` or else the status mapped to a gRPC code (gRPC's
/// HTTP-to-gRPC mapping, as Envoy has it), the text as `grpc-message`.
pub fn grpc_local_reply(response: Response<ResponseBody>, code: Option<u8>) -> Response<ResponseBody> {
    let (parts, body) = response.into_parts();
    let code = code.unwrap_or(match parts.status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    });
    let text = match body {
        Either::Left(full) => full.into_inner().unwrap_or_default(),
        Either::Right(_) => Bytes::new(),
    };
    let mut reply = Response::new(Either::Left(Full::new(Bytes::new())));
    let headers = reply.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    let message = percent_encode(text.trim_ascii_end());
    if let Ok(message) = HeaderValue::from_maybe_shared(message)
        && !message.is_empty()
    {
        headers.insert("grpc-message", message);
    }
    reply
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(text: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    Bytes::from(out)
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A gRPC call's deadline from its `grpc-timeout` (1–8 digits and a unit: `H`ours, `M`inutes,
/// `S`econds, `m`illi-, `u` micro-, `n` nanoseconds); none if absent or malformed, which
/// Envoy treats alike.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC answer's status, from a trailers-only answer's headers or the trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    std::str::from_utf8(headers.get(GRPC_STATUS)?.as_bytes()).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn text_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(text.as_bytes()))));
        *r.status_mut() = status;
        r
    }

    #[test]
    fn a_grpc_calls_local_errors_are_grpc_errors() {
        let reply = |status: StatusCode, text: &'static str| {
            let r = grpc_local_reply(text_response(status, text), None);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
            assert!(hyper::body::Body::is_end_stream(r.body()), "trailers-only: no body");
            let h = r.headers();
            (h["grpc-status"].to_str().unwrap().to_string(), h.get("grpc-message").cloned())
        };
        let (code, message) = reply(StatusCode::FORBIDDEN, "RBAC: access denied");
        assert_eq!((code.as_str(), message.unwrap().as_bytes()), ("7", &b"RBAC: access denied"[..]));
        assert_eq!(reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream").0, "14");
        assert_eq!(reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout").0, "14");
        assert_eq!(reply(StatusCode::NOT_FOUND, "no route matched\n").1.unwrap(), "no route matched");
        assert_eq!(reply(StatusCode::NOT_FOUND, "").0, "12");
        assert!(reply(StatusCode::NOT_FOUND, "").1.is_none(), "no empty grpc-message");
        assert_eq!(reply(StatusCode::PAYLOAD_TOO_LARGE, "too big").0, "2");
        // A fault abort's own gRPC status goes as it is (its HTTP status is 200).
        let aborted = grpc_local_reply(text_response(StatusCode::OK, "fault filter abort"), Some(8));
        assert_eq!(aborted.headers()["grpc-status"], "8");
        assert_eq!(&percent_encode("100% café".as_bytes())[..], b"100%25 caf%C3%A9");
    }

    #[test]
    fn a_grpc_timeout_is_read_in_each_unit_and_a_malformed_one_ignored() {
        let read = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(value));
            grpc_timeout(&h)
        };
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("10S"), Some(Duration::from_secs(10)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(read("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "100", "100x", "123456789m", "-1S", "1.5S", " 1S"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
