//! One CONNECT stream as bytes, and the relays that move a stream's bytes to a TCP socket or
//! to another stream.
//!
//! While a relay waits to pass a frame on (the socket or the other stream is full), it keeps
//! taking the stream's new frames out of h2 into a [`Backlog`], so that a stalled reader
//! cannot make h2 close the whole connection over small frames held unread (see
//! [`crate::frame_backlog`]).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::DATA_CHUNK;
use crate::{
    activity::{Activity, Direction},
    frame_backlog::Backlog,
};

/// One CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), so that hyper can serve
/// HTTP inside it. Reading releases HTTP/2 flow-control capacity as data is consumed; shutting
/// down the write side ends the stream (END_STREAM). For relaying, `relay_with_tcp` and
/// `relay_with_stream` move the frames' buffers themselves, without copying (but for a
/// backlog's small frames).
pub struct H2Stream {
    send: SendStream<Bytes>,
    received: Received,
    /// Told of every chunk the relays move, either way, when set.
    activity: Option<Activity>,
}

/// The receiving half: bytes handed back by the caller, then the backlog, then what h2
/// delivers.
struct Received {
    recv: RecvStream,
    /// Given back with `unread`: read first, their capacity already released.
    replay: Bytes,
    /// Taken from h2 and not yet passed on; their capacity not yet released.
    backlog: Backlog,
    done: bool,
}

impl Received {
    /// The next received bytes and how much flow-control capacity to release once they have
    /// been passed on; `None` at the end of the stream.
    async fn next(&mut self) -> io::Result<Option<(Bytes, usize)>> {
        if !self.replay.is_empty() {
            return Ok(Some((std::mem::take(&mut self.replay), 0)));
        }
        if let Some(data) = self.backlog.pop() {
            let n = data.len();
            return Ok(Some((data, n)));
        }
        if self.done {
            return Ok(None);
        }
        match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
            Some(Ok(data)) => {
                let n = data.len();
                Ok(Some((data, n)))
            }
            Some(Err(e)) => Err(h2_to_io(e)),
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }

    /// Takes every frame h2 holds for this stream into the backlog, and has `cx` woken when
    /// more arrive.
    fn absorb(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.done {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => self.backlog.push(data),
                Poll::Ready(Some(Err(e))) => return Err(h2_to_io(e)),
                Poll::Ready(None) => self.done = true,
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Polls `op` until it is ready, absorbing received frames each time it has to wait.
    async fn absorbing_while<T>(
        &mut self,
        mut op: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> io::Result<T> {
        std::future::poll_fn(|cx| match op(cx) {
            Poll::Pending => {
                self.absorb(cx)?;
                Poll::Pending
            }
            ready => ready,
        })
        .await
    }

    fn release(&mut self, n: usize) {
        if n > 0 {
            let _ = self.recv.flow_control().release_capacity(n);
        }
    }

    /// Passes everything received to `send` as DATA frames, then END_STREAM.
    async fn forward_to(
        &mut self,
        send: &mut SendStream<Bytes>,
        activity: Option<(&Activity, Direction)>,
    ) -> io::Result<u64> {
        let mut moved = 0u64;
        while let Some((data, release)) = self.next().await? {
            let data_len = data.len();
            moved += data_len as u64;
            send_all(send, data, Some(&mut *self)).await?;
            self.release(release);
            if let Some((activity, direction)) = activity {
                activity.moved(direction, data_len);
            }
        }
        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        Ok(moved)
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        let received = Received { recv, replay: Bytes::new(), backlog: Backlog::default(), done: false };
        Self { send, received, activity: None }
    }

    /// Has the relays report every chunk they move, in either direction, to `activity` (for
    /// an idle timeout).
    pub fn watch_activity(&mut self, activity: Activity) {
        self.activity = Some(activity);
    }

    /// Puts bytes already read (a protocol sniff's) back in front of what is still to come.
    pub fn unread(&mut self, bytes: Bytes) {
        let replay = &mut self.received.replay;
        *replay = if replay.is_empty() { bytes } else { [bytes, std::mem::take(replay)].concat().into() };
    }

    /// Relays between this stream and a TCP socket until both directions have ended; returns
    /// (bytes TCP → stream, bytes stream → TCP). Unlike `copy_bidirectional` over the byte-
    /// stream view, no byte is copied in user space (but for a backlog's small frames): each
    /// read from the socket lands in a buffer that becomes the DATA frame as is, and each
    /// received frame is written to the socket from h2's own buffer. The first end (EOF) is
    /// passed on as END_STREAM or FIN while the other direction runs on, as with
    /// `copy_bidirectional`.
    pub async fn relay_with_tcp(&mut self, tcp: &mut tokio::net::TcpStream) -> io::Result<(u64, u64)> {
        let (tcp_read, mut tcp_write) = tcp.split();
        let Self { send, received, activity } = self;
        let activity = activity.as_ref();
        let upstream = async {
            let mut moved = 0u64;
            loop {
                tcp_read.readable().await?;
                // Allocated only once there is something to read: an idle connection holds
                // no buffer. h2 frees the chunk once it has been encrypted.
                let mut chunk = BytesMut::with_capacity(DATA_CHUNK);
                match tcp_read.try_read_buf(&mut chunk) {
                    Ok(0) => {
                        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                        return Ok::<_, io::Error>(moved);
                    }
                    Ok(n) => {
                        moved += n as u64;
                        send_all(send, chunk.freeze(), None).await?;
                        if let Some(activity) = activity {
                            activity.moved(Direction::IntoStream, n);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        let downstream = async {
            use tokio::io::AsyncWriteExt;
            let mut moved = 0u64;
            while let Some((mut data, release)) = received.next().await? {
                let data_len = data.len();
                while !data.is_empty() {
                    let written =
                        received.absorbing_while(|cx| Pin::new(&mut tcp_write).poll_write(cx, &data)).await?;
                    if written == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    data.advance(written);
                }
                moved += data_len as u64;
                received.release(release);
                if let Some(activity) = activity {
                    activity.moved(Direction::OutOfStream, data_len);
                }
            }
            tcp_write.shutdown().await?;
            Ok(moved)
        };
        tokio::try_join!(upstream, downstream)
    }

    /// Relays between two CONNECT streams (a waypoint's TCP passthrough) until both
    /// directions have ended, handing each received frame's buffer on as it is; returns
    /// (bytes self → other, bytes other → self). Reports to this stream's activity, not
    /// `other`'s.
    pub async fn relay_with_stream(&mut self, other: &mut H2Stream) -> io::Result<(u64, u64)> {
        let activity = self.activity.as_ref();
        tokio::try_join!(
            self.received.forward_to(&mut other.send, activity.map(|a| (a, Direction::OutOfStream))),
            other.received.forward_to(&mut self.send, activity.map(|a| (a, Direction::IntoStream)))
        )
    }
}

/// The send capacity h2 has assigned the stream, once it has some.
fn poll_send_capacity(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    match ready!(send.poll_capacity(cx)) {
        Some(Ok(n)) => Poll::Ready(Ok(n)),
        Some(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
        None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
    }
}

/// Sends `data` as DATA frames as flow control allows, without copying it. While it waits for
/// window, `meanwhile` (the other direction of a relay between two streams) keeps taking its
/// own stream's frames out of h2.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    mut meanwhile: Option<&mut Received>,
) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match meanwhile.as_deref_mut() {
            Some(received) => received.absorbing_while(|cx| poll_send_capacity(send, cx)).await?,
            None => std::future::poll_fn(|cx| poll_send_capacity(send, cx)).await?,
        }
        .min(data.len());
        if granted > 0 {
            send.send_data(data.split_to(granted), false).map_err(h2_to_io)?;
        }
    }
    Ok(())
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let received = &mut self.received;
        loop {
            if !received.replay.is_empty() {
                let n = received.replay.len().min(buf.remaining());
                buf.put_slice(&received.replay[..n]);
                received.replay.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(mut data) = received.backlog.pop() {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                data.advance(n);
                received.backlog.push_front(data);
                received.release(n);
                return Poll::Ready(Ok(()));
            }
            if received.done {
                return Poll::Ready(Ok(()));
            }
            match ready!(received.recv.poll_data(cx)) {
                Some(Ok(data)) => received.backlog.push_front(data),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => received.done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let n = ready!(poll_send_capacity(&mut self.send, cx))?.min(buf.len());
        self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        ca::Ca,
        hbone::{
            ConnectRequest, accept, connect,
            handshake_tests::{id, tcp_pair},
        },
        tls::TrustBundle,
    };

    /// Client application ⇄ relay ⇄ HBONE (real mTLS and HTTP/2 over loopback) ⇄ relay ⇄ an
    /// echoing server application: every byte arrives in order both ways, the half-close
    /// travels as END_STREAM and FIN, and both relays count what they moved.
    #[tokio::test]
    async fn relay_with_tcp_moves_every_byte_both_ways_and_passes_the_half_close_on() {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let client_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(600)).unwrap();
        let server_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/payment"), Duration::from_secs(600)).unwrap();
        let (hbone_client_tcp, hbone_server_tcp) = tcp_pair().await;

        let server_bundle = bundle.clone();
        let expected = server_id.identity.clone();
        let server = tokio::spawn(async move {
            let (_peer, mut connection) = accept(hbone_server_tcp, &server_id, &server_bundle).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while let Some(Ok(_)) = connection.accept().await {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            let mut stream = H2Stream::new(send, request.into_body());
            // The server application echoes until the client's FIN, then closes.
            let (mut to_app, mut app) = tcp_pair().await;
            let echo = tokio::spawn(async move {
                let (mut r, mut w) = app.split();
                let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                n
            });
            let moved = stream.relay_with_tcp(&mut to_app).await.unwrap();
            (moved, echo.await.unwrap())
        });

        let (send_request, connection) =
            connect(hbone_client_tcp, &client_id, &bundle, &expected).await.unwrap();
        tokio::spawn(connection);
        let mut send_request = send_request.ready().await.unwrap();
        let target = "10.0.0.1:80".parse().unwrap();
        let (response, send) =
            send_request.send_request(ConnectRequest::new(target).to_request(), false).unwrap();
        let mut stream = H2Stream::new(send, response.await.unwrap().into_body());
        let (mut app, mut to_relay) = tcp_pair().await;
        let client_relay = tokio::spawn(async move { stream.relay_with_tcp(&mut to_relay).await.unwrap() });

        // More than the stream window, in writes that do not line up with the relay's chunks.
        let sent: Vec<u8> = (0..5 * 1024 * 1024 + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = app.split();
        let write = async {
            for piece in sent.chunks(100_003) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let read = r.read_to_end(&mut echoed);
        let ((), read) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .expect("the relays moved 5 MiB within 30 s");
        read.unwrap();
        assert!(
            echoed == sent,
            "the echo differs from what was sent ({} of {} bytes)",
            echoed.len(),
            sent.len()
        );

        let len = sent.len() as u64;
        assert_eq!(client_relay.await.unwrap(), (len, len), "client relay: (TCP → HBONE, HBONE → TCP)");
        let ((to_stream, to_tcp), echoed_by_app) = server.await.unwrap();
        assert_eq!((to_stream, to_tcp, echoed_by_app), (len, len, len), "server relay and application");
    }

    /// Both ends of one CONNECT stream over plain HTTP/2 in memory (h2's default 64 KiB
    /// windows, so flow control must be released for more to come).
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let client = async {
            let (send_request, connection) = h2::client::handshake(c).await.unwrap();
            tokio::spawn(connection);
            let mut send_request = send_request.ready().await.unwrap();
            let request = ConnectRequest::new("10.0.0.1:80".parse().unwrap()).to_request();
            send_request.send_request(request, false).unwrap()
        };
        let server = async {
            let mut connection = h2::server::handshake(s).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while let Some(Ok(_)) = connection.accept().await {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            H2Stream::new(send, request.into_body())
        };
        let ((response, send), server_end) = tokio::join!(client, server);
        (H2Stream::new(send, response.await.unwrap().into_body()), server_end)
    }

    /// Writes of every size, small ones between bulk ones, while earlier writes are still
    /// queued behind flow control: every byte arrives, in order.
    #[tokio::test]
    async fn writes_of_any_size_arrive_whole_and_in_order() {
        let (mut writer, mut reader) = stream_pair().await;
        let sizes = [1, 7, 300, 16 * 1024, 16 * 1024 + 1, 5, 40_000, 2, 900, 70_000, 3, 16 * 1024 - 1, 11];
        let mut sent = Vec::new();
        for (round, size) in sizes.iter().cycle().take(60).enumerate() {
            sent.extend((0..*size).map(|i| ((i * 31 + round * 7) % 253) as u8));
        }
        let expected = sent.clone();
        let write = async move {
            let mut rest = &sent[..];
            for size in sizes.iter().cycle().take(60) {
                let (piece, tail) = rest.split_at(*size);
                writer.write_all(piece).await.unwrap();
                rest = tail;
            }
            writer.shutdown().await.unwrap();
            // Kept open till the reader is done: dropping a stream resets it.
            writer
        };
        let mut received = Vec::new();
        let read = reader.read_to_end(&mut received);
        let (_writer, read) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
                .await
                .expect("the writes arrived within 30 s");
        read.unwrap();
        assert!(received == expected, "{} of {} bytes, or out of order", received.len(), expected.len());
    }

    /// client ⇄ [stream a | relay | stream b] ⇄ server, as a waypoint passes TCP through:
    /// the bytes the relay sniffed and handed back with `unread` go first, the rest follows
    /// in order, END_STREAM crosses in both directions, and the counts are right.
    #[tokio::test]
    async fn relay_with_stream_replays_unread_bytes_and_moves_the_rest_both_ways() {
        let (mut client, mut a) = stream_pair().await;
        let (mut b, mut server) = stream_pair().await;
        let sent: Vec<u8> = (0..1024 * 1024 + 77).map(|i| (i * 13 % 241) as u8).collect();
        let relay = tokio::spawn(async move {
            let mut sniffed = [0u8; 10];
            a.read_exact(&mut sniffed).await.unwrap();
            // Handed back in pieces: each call goes in front of what was handed back before.
            a.unread(Bytes::copy_from_slice(&sniffed[6..]));
            a.unread(Bytes::new());
            a.unread(Bytes::copy_from_slice(&sniffed[..6]));
            let counts = a.relay_with_stream(&mut b).await.unwrap();
            (counts, a, b)
        });
        let reply = b"received everything".to_vec();
        let serve = {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(&reply).await.unwrap();
                server.shutdown().await.unwrap();
                got
            })
        };
        let talk = async {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), talk).await.expect("relayed within 30 s");
        assert_eq!(answer, reply);
        let got = serve.await.unwrap();
        assert!(got == sent, "the server got {} bytes, not the {} sent in order", got.len(), sent.len());
        let (counts, _a, _b) = relay.await.unwrap();
        assert_eq!(counts, (sent.len() as u64, reply.len() as u64));
    }

    /// Writes `bulk` bytes at once, then 2,000 one-byte writes (each a DATA frame of its
    /// own), then ends the stream; returns what it wrote.
    async fn bulk_then_trickle(client: &mut H2Stream, bulk: usize) -> Vec<u8> {
        let mut sent: Vec<u8> = vec![7; bulk];
        client.write_all(&sent).await.unwrap();
        for i in 0..2_000u32 {
            let byte = [(i % 251) as u8];
            client.write_all(&byte).await.unwrap();
            sent.push(byte[0]);
            if i % 100 == 0 {
                // Lets the frames travel: the relay sees them arrive while it waits.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        client.shutdown().await.unwrap();
        sent
    }

    /// A sender trickling 1-byte writes into a stream whose far side reads nothing: the
    /// relay's backlog takes them, so h2 does not hold them (past its small-frame budget —
    /// here h2's default, ~128 frames — it would close the whole connection), and once the
    /// far side reads, every byte arrives in order.
    #[tokio::test]
    async fn tiny_frames_behind_a_stalled_stream_wait_in_the_relay_not_in_h2() {
        let (mut client, mut a) = stream_pair().await;
        let (mut b, mut server) = stream_pair().await;
        let relay = tokio::spawn(async move {
            let counts = a.relay_with_stream(&mut b).await;
            (counts, a, b)
        });
        // Fills b's window (the server reads nothing yet), then the trickle.
        let sent = bulk_then_trickle(&mut client, 70_000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got)).await;
        read.expect("the server read to the end within 10 s").expect("the stream stayed up");
        assert!(got == sent, "the server got {} bytes, not the {} sent in order", got.len(), sent.len());
        server.shutdown().await.unwrap();
        let (counts, _a, _b) = relay.await.unwrap();
        assert_eq!(counts.unwrap(), (sent.len() as u64, 0));
    }

    /// The same toward a TCP socket whose application reads nothing for a while (small
    /// socket buffers, so they fill): the relay takes the trickle out of h2 while its write
    /// waits.
    #[tokio::test]
    async fn tiny_frames_behind_a_full_socket_wait_in_the_relay_not_in_h2() {
        let (mut client, mut relayed) = stream_pair().await;
        let listener = {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            socket.listen(1).unwrap()
        };
        let to_app = tokio::net::TcpSocket::new_v4().unwrap();
        to_app.set_send_buffer_size(4096).unwrap();
        let (to_app, app) = tokio::join!(to_app.connect(listener.local_addr().unwrap()), listener.accept());
        let (mut to_app, (mut app, _)) = (to_app.unwrap(), app.unwrap());
        let relay = tokio::spawn(async move { relayed.relay_with_tcp(&mut to_app).await });
        let sent = bulk_then_trickle(&mut client, 60_000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut got)).await;
        read.expect("the application read to the end within 10 s").unwrap();
        assert!(got == sent, "the application got {} bytes, not the {} sent in order", got.len(), sent.len());
        app.shutdown().await.unwrap();
        let moved = relay.await.unwrap().expect("the stream stayed up");
        assert_eq!(moved, (0, sent.len() as u64));
    }
}
