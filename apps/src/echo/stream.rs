//! The bidi-streaming gRPC method: every message the client sends is answered at once with
//! the same message, and the call ends `grpc-status: 0` when the client ends its side. A proxy
//! that holds a request body until it is complete stalls such a call at its first message.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// A gRPC call whose method is named `Stream` (any service: `/pkg.Service/Stream`) streams.
pub const STREAM_METHOD_SUFFIX: &str = "/Stream";

/// The length prefix of a gRPC message: a compression flag and a big-endian length.
const PREFIX: usize = 5;
/// Largest message echoed back (gRPC's default receive limit).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The answer's body: frames handed over by the task reading the request.
pub struct StreamedAnswer(mpsc::Receiver<Frame<Bytes>>);

impl Body for StreamedAnswer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// Starts answering `body`'s messages as they arrive; the answer ends `hold` after the
/// request has (a server that takes a while to finish a call).
pub fn answer<B>(body: B, hold: std::time::Duration) -> StreamedAnswer
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let mut pending = BytesMut::new();
        let status = loop {
            match body.frame().await {
                None if pending.is_empty() => break (0, None),
                None => break (13, Some("the request ended inside a message")),
                // The client is gone: nobody to answer.
                Some(Err(_)) => return,
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else { continue };
                    pending.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                    match split_messages(&mut pending) {
                        Ok(messages) => {
                            for message in messages {
                                if tx.send(Frame::data(message)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(reason) => break (8, Some(reason)),
                    }
                }
            }
        };
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(status.0));
        if let Some(message) = status.1 {
            trailers.insert("grpc-message", HeaderValue::from_static(message));
        }
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    StreamedAnswer(rx)
}

/// The complete length-prefixed messages at the front of `pending`, prefixes included (each
/// goes back as it came); an incomplete one stays.
fn split_messages(pending: &mut BytesMut) -> Result<Vec<Bytes>, &'static str> {
    let mut messages = Vec::new();
    while pending.len() >= PREFIX {
        let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err("message larger than 4 MiB");
        }
        if pending.len() < PREFIX + len {
            break;
        }
        messages.push(pending.split_to(PREFIX + len).freeze());
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn messages_are_split_at_their_length_prefixes() {
        let mut pending = BytesMut::new();
        pending.extend_from_slice(&message(b"one"));
        let two = message(b"two");
        pending.extend_from_slice(&two[..6]);
        let first = split_messages(&mut pending).unwrap();
        assert_eq!(first, vec![Bytes::from(message(b"one"))]);
        assert_eq!(pending.len(), 6, "the incomplete message waits");
        pending.extend_from_slice(&two[6..]);
        assert_eq!(split_messages(&mut pending).unwrap(), vec![Bytes::from(two)]);
        assert!(pending.is_empty());
        pending.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(split_messages(&mut pending).is_err());
    }
}
