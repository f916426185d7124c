//! One client connection, HTTP/1.1 or h2c with prior knowledge, built directly on hyper's
//! connection API so the load loop decides when to connect and can tell connect errors from
//! protocol errors.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// TCP connect or the HTTP handshake failed: nothing was sent.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke or the peer answered something that is not valid HTTP.
    #[error("protocol: {0}")]
    Protocol(#[from] hyper::Error),
}

/// A connection ready to carry requests one after another (HTTP/1.1) or at once (HTTP/2).
pub enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    pub async fn open(addr: SocketAddr, http2: bool) -> Result<Connection, RequestError> {
        let connect_error = |e: &dyn std::fmt::Display| RequestError::Connect(format!("{addr}: {e}"));
        let stream = TcpStream::connect(addr).await.map_err(|e| connect_error(&e))?;
        // Requests are small and latency is what is measured: never wait for Nagle.
        stream.set_nodelay(true).map_err(|e| connect_error(&e))?;
        let io = TokioIo::new(stream);
        // hyper splits a connection into a sender and a driver future that must be polled.
        if http2 {
            let (sender, driver) =
                http2::handshake(TokioExecutor::new(), io).await.map_err(|e| connect_error(&e))?;
            tokio::spawn(driver);
            Ok(Connection::Http2(sender))
        } else {
            let (sender, driver) = http1::handshake(io).await.map_err(|e| connect_error(&e))?;
            tokio::spawn(driver);
            Ok(Connection::Http1(sender))
        }
    }

    /// Waits until the connection can take a request; false when it closed meanwhile (e.g. the
    /// server dropped an idle keep-alive connection), which calls for a new one, not an error.
    pub async fn ready(&mut self) -> bool {
        match self {
            Connection::Http1(sender) => sender.ready().await.is_ok(),
            Connection::Http2(sender) => sender.ready().await.is_ok(),
        }
    }

    /// Sends a request and reads the whole response body.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, RequestError> {
        let response = match self {
            Connection::Http1(sender) => sender.send_request(request).await?,
            Connection::Http2(sender) => sender.send_request(request).await?,
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}
