//! The byte stream under the protocol: a TCP socket, or a WebSocket whose
//! binary messages carry consecutive chunks of the same stream.
//!
//! A link is opened already split into a [`Reader`] and a [`Writer`], so one
//! task can read while another writes (the client actor never stalls its
//! reads behind a slow write). Both halves are small enums rather than trait
//! objects: there are exactly two transports and the enum keeps the futures
//! `Send` without boxing.

use std::time::SystemTime;

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

/// Bytes asked of the socket per stamped read (see
/// [`Reader::stamp_receives`]); the buffer is zeroed first, so smaller than
/// [`READ_CHUNK_BYTES`].
const STAMPED_READ_CHUNK_BYTES: usize = 16 * 1024;

/// The receiving half of a link.
#[derive(Debug)]
pub enum Reader {
    /// TCP.
    Tcp(OwnedReadHalf),
    /// TCP, each read also taking the kernel's receive time of the bytes
    /// it returned (see [`Reader::stamp_receives`]).
    TcpStamped {
        /// The socket's receiving half.
        half: OwnedReadHalf,
        /// When the kernel received the bytes of the last read.
        last: Option<SystemTime>,
    },
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
            Self::TcpStamped { half, last } => {
                let (n, at) = half
                    .as_ref()
                    .async_io(tokio::io::Interest::READABLE, || stamped::recv(half, buf))
                    .await?;
                if at.is_some() {
                    *last = at;
                }
                Ok(n)
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

impl Reader {
    /// From now on, takes the kernel's receive time of what each read
    /// returns (`SO_TIMESTAMPNS`), for [`Reader::received_at`]: when the
    /// bytes reached this machine's socket, before this process got to
    /// them. For measuring delivery apart from the reader's own delays (a
    /// load generator reading a thousand sockets on one core). TCP on Linux
    /// only; elsewhere the reader is returned unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] if the socket refuses the option.
    pub fn stamp_receives(self) -> Result<Self, Error> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Tcp(half) => {
                stamped::enable(&half)?;
                Ok(Self::TcpStamped { half, last: None })
            }
            other => Ok(other),
        }
    }

    /// When the kernel received the bytes of the last read that had a
    /// receive time (see [`Reader::stamp_receives`]); `None` if not
    /// stamping. A frame completed by that read arrived no later.
    #[must_use]
    pub fn received_at(&self) -> Option<SystemTime> {
        match self {
            Self::TcpStamped { last, .. } => *last,
            _ => None,
        }
    }
}

#[cfg(target_os = "linux")]
mod stamped {
    //! Reads that carry the kernel's receive time (`SO_TIMESTAMPNS`).

    use std::io;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, SystemTime};

    use bytes::BytesMut;
    use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
    use nix::sys::time::{TimeSpec, TimeValLike};
    use tokio::net::tcp::OwnedReadHalf;

    pub(super) fn enable(half: &OwnedReadHalf) -> io::Result<()> {
        socket::setsockopt(half.as_ref(), sockopt::ReceiveTimestampns, &true)?;
        Ok(())
    }

    /// One `recvmsg` appending to `buf`: the bytes read and their receive
    /// time. `WouldBlock` when nothing is waiting.
    pub(super) fn recv(
        half: &OwnedReadHalf,
        buf: &mut BytesMut,
    ) -> io::Result<(usize, Option<SystemTime>)> {
        let start = buf.len();
        buf.resize(start + super::STAMPED_READ_CHUNK_BYTES, 0);
        let mut space = nix::cmsg_space!(TimeSpec);
        let result = {
            let mut iov = [io::IoSliceMut::new(&mut buf[start..])];
            socket::recvmsg::<()>(
                half.as_ref().as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|msg| {
                let at = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(at(ts)),
                        _ => None,
                    })
                });
                (msg.bytes, at)
            })
        };
        match result {
            Ok((n, at)) => {
                buf.truncate(start + n);
                Ok((n, at))
            }
            Err(e) => {
                buf.truncate(start);
                Err(e.into())
            }
        }
    }

    fn at(ts: TimeSpec) -> SystemTime {
        let nanos = u64::try_from(ts.num_nanoseconds()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
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
