//! Upgraded connections: a request with `connection: upgrade` and an `upgrade` header (a
//! WebSocket's handshake, say) is answered 101 with the same `upgrade`, and from then on every
//! byte the client sends comes back as it is, until the client closes. The WebSocket handshake
//! itself is not checked (no `sec-websocket-accept`): the echo shows whether a proxy lets the
//! connection through, not whether it speaks WebSocket.

use http::{HeaderMap, HeaderValue, Request, header};
use hyper_util::rt::TokioIo;

/// The `upgrade` value a request asks for, when its `connection` names `upgrade`.
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    connection_upgrade.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Echoes the connection's bytes once the 101 answer has handed it over.
pub fn echo_after_switch<B>(request: &mut Request<B>) {
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                if let Err(e) = tokio::io::copy(&mut reader, &mut writer).await {
                    tracing::debug!("upgraded connection: {e}");
                }
            }
            Err(e) => tracing::debug!("upgrade failed: {e}"),
        }
    });
}
