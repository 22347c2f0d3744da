//! The byte stream under the protocol: a TCP socket, or a WebSocket whose
//! binary messages carry consecutive chunks of the same stream.
//!
//! A link is opened already split into a [`Reader`] and a [`Writer`], so one
//! task can read while another writes (the client actor never stalls its
//! reads behind a slow write). Both halves are small enums rather than trait
//! objects: there are exactly two transports and the enum keeps the futures
//! `Send` without boxing.

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::endpoint::Endpoint;
use crate::error::{Error, ProtocolError, TransportError};

/// Bytes asked of the socket per TCP read: one full Noise record plus its
/// header, so a record usually arrives in one read.
const READ_CHUNK_BYTES: usize = 64 * 1024 + 2;

/// Largest WebSocket message accepted from the server. A message carries a
/// chunk of the stream; servers send at most a few frames per message, and
/// frames are at most 1 MiB, so 16 MiB bounds memory without refusing any
/// legitimate peer.
const MAX_WS_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The receiving half of a link.
#[derive(Debug)]
pub enum Reader {
    /// TCP.
    Tcp(OwnedReadHalf),
    /// WebSocket.
    WebSocket(SplitStream<Ws>),
}

/// The sending half of a link.
#[derive(Debug)]
pub enum Writer {
    /// TCP.
    Tcp(OwnedWriteHalf),
    /// WebSocket.
    WebSocket(SplitSink<Ws, Message>),
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> Error {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e {
        WsError::Io(io) => Error::Transport(TransportError::Io(io)),
        other => Error::Transport(TransportError::WebSocket(Box::new(other))),
    }
}

/// Opens a link to `endpoint` (no timeout: callers wrap it).
///
/// # Errors
///
/// [`Error::Transport`] when the connection or the WebSocket upgrade fails.
pub async fn connect(endpoint: &Endpoint) -> Result<(Reader, Writer), Error> {
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            // Frames are small and latency matters more than packet count.
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((Reader::Tcp(r), Writer::Tcp(w)))
        }
        Endpoint::WebSocket { .. } => {
            let url = endpoint.ws_url().unwrap_or_default();
            let mut config = WebSocketConfig::default();
            config.max_message_size = Some(MAX_WS_MESSAGE_BYTES);
            config.max_frame_size = Some(MAX_WS_MESSAGE_BYTES);
            let (ws, _response) =
                tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                    .await
                    .map_err(ws_error)?;
            let (sink, stream) = ws.split();
            Ok((Reader::WebSocket(stream), Writer::WebSocket(sink)))
        }
    }
}

impl Reader {
    /// Appends the next bytes of the stream to `buf`; returns how many were
    /// added, 0 meaning the peer closed the stream.
    ///
    /// Cancel-safe: if the future is dropped, no bytes are lost.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] on a socket failure; [`Error::Protocol`] for a
    /// text WebSocket message.
    pub async fn read(&mut self, buf: &mut BytesMut) -> Result<usize, Error> {
        match self {
            Self::Tcp(r) => {
                buf.reserve(READ_CHUNK_BYTES);
                Ok(r.read_buf(buf).await?)
            }
            Self::WebSocket(stream) => loop {
                match stream.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Binary(data))) => {
                        if data.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                    // Control frames are answered by tungstenite itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Text(_))) => {
                        return Err(ProtocolError::NonBinaryMessage.into());
                    }
                    Some(Err(e)) => return Err(ws_error(e)),
                }
            },
        }
    }
}

impl Writer {
    /// Writes `bytes` in full (one binary message on WebSocket).
    ///
    /// Not cancel-safe: dropping the future may leave a partial write, after
    /// which the link must be abandoned.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] on a socket failure.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), Error> {
        match self {
            Self::Tcp(w) => Ok(w.write_all(&bytes).await?),
            Self::WebSocket(sink) => sink.send(Message::Binary(bytes)).await.map_err(ws_error),
        }
    }

    /// Closes the sending direction (TCP FIN, WebSocket close frame).
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] on a socket failure.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        match self {
            Self::Tcp(w) => Ok(w.shutdown().await?),
            Self::WebSocket(sink) => sink.close().await.map_err(ws_error),
        }
    }
}
