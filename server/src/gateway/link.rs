//! Links: the byte pipes a connection runs over. TCP carries the stream
//! directly; a WebSocket carries it in binary messages (any split), so one
//! connection task serves native clients and browsers alike.

use std::future::Future;
use std::io;
use std::pin::Pin;

use axum::extract::ws::{Message, WebSocket};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

/// Bytes reserved for one socket read. Small, because a read buffer is held
/// by every connection with a partial frame in flight.
pub const READ_CHUNK_BYTES: usize = 8 * 1024;

/// A bidirectional byte pipe.
pub trait Link: Send + 'static {
    /// Reads more bytes onto the end of `buf`. `Ok(0)` means the peer closed.
    /// Cancel-safe: no bytes are lost if the future is dropped.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes as much of `bytes` as the link takes right now, without
    /// waiting, and says how much that was. The usual case (a socket with
    /// room) then needs no future at all; links that cannot do this take
    /// nothing here.
    ///
    /// # Errors
    /// A write error other than "would block".
    fn try_write_now(&mut self, _bytes: &[u8]) -> io::Result<usize> {
        Ok(0)
    }

    /// Writes all of `bytes`.
    fn write_all_bytes(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Closes the write side, best effort.
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// "tcp" or "ws", for logs.
    fn kind(&self) -> &'static str;
}

/// A TCP connection.
pub struct TcpLink(pub TcpStream);

impl Link for TcpLink {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            // Wait for readiness before taking memory: an idle connection
            // holds no read buffer at all. `poll_read_ready` keeps the waker
            // in the socket's one reader slot; `readable().await` made a
            // waiter that was linked into, and (whenever another branch of
            // the connection's select won) unlinked from, a mutex-guarded
            // list on every turn: 1.9% of the server's CPU at 10,000
            // msgs/s with 10,000 users.
            std::task::ready!(self.0.poll_read_ready(cx))?;
            buf.reserve(READ_CHUNK_BYTES);
            // `AsyncRead::poll_read`, not `try_read_buf`: a read that comes
            // back short of the room it was given shows that the socket is
            // drained, and `poll_read` then clears the readiness.
            // `try_read_buf` keeps it, so the next turn paid one more
            // `recvfrom` for EAGAIN: 45% of the server's reads at 7,000
            // msgs/s with 10,000 users (`perf trace -s`).
            let read = poll_read_buf(Pin::new(&mut self.0), cx, buf);
            if read.is_pending() && buf.is_empty() {
                // Readiness was stale (the waker is registered again): give
                // the chunk back, or every idle connection keeps 8 KiB
                // (found with massif: most of the idle RSS per connection).
                *buf = BytesMut::new();
            }
            read
        })
        .await
    }

    fn try_write_now(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut written = 0;
        while written < bytes.len() {
            match self.0.try_write(bytes.get(written..).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    async fn write_all_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes).await
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }
}

/// Largest WebSocket message the server sends. The stream may be split
/// across messages anywhere, so a large write (a drain page of big entries
/// can be megabytes) goes out as several messages and the codec's write
/// buffer never has to hold more than one of these.
pub const WS_MAX_OUT_MESSAGE_BYTES: usize = 256 * 1024;

/// A WebSocket connection (server side, from axum).
pub struct WsLink(pub WebSocket);

impl Link for WsLink {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.recv().await {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    buf.extend_from_slice(&b);
                    return Ok(b.len());
                }
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message; Switchboard speaks binary",
                    ));
                }
                Some(Ok(Message::Close(_))) | None => return Ok(0),
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }

    async fn write_all_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(WS_MAX_OUT_MESSAGE_BYTES) {
            self.0
                .send(Message::Binary(Bytes::copy_from_slice(chunk)))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.0.send(Message::Close(None)).await;
    }

    fn kind(&self) -> &'static str {
        "ws"
    }
}
