//! One user's connection as the load driver sees it: to the real server (the
//! SDK's Noise `Connection`) or to the baseline relay (the same frames in
//! plain TCP). The driver code is the same for both, so their numbers
//! compare.

use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_client::transport::{self, Reader, Writer};
use switchboard_client::{Connection, Endpoint};
use switchboard_proto::frame::{self, FrameDecoder};
use switchboard_proto::limits::DEFAULT_MAX_FRAME_BYTES;

/// A driver's connection.
pub enum Link {
    /// To the server: Noise, authenticated, drained.
    Server(Box<Connection>),
    /// To the baseline relay: plain frames.
    Relay(Plain),
}

impl Link {
    /// A fresh, nonzero request id.
    pub fn next_request_id(&mut self) -> u32 {
        match self {
            Self::Server(c) => c.next_request_id(),
            Self::Relay(p) => {
                p.next_id = p.next_id.checked_add(1).unwrap_or(1);
                p.next_id
            }
        }
    }

    /// Writes one frame.
    ///
    /// # Errors
    /// If the write fails.
    pub async fn send_frame(&mut self, f: &pb::ClientFrame) -> Result<()> {
        match self {
            Self::Server(c) => Ok(c.send_frame(f).await?),
            Self::Relay(p) => p.send(f).await,
        }
    }

    /// The next frame. Cancel-safe.
    ///
    /// # Errors
    /// If the link fails or closes.
    pub async fn next_frame(&mut self) -> Result<pb::ServerFrame> {
        match self {
            Self::Server(c) => Ok(c.next_frame().await?),
            Self::Relay(p) => p.next_frame().await,
        }
    }

    /// When the kernel received the bytes that completed the last frame
    /// (`None` unless the link was opened with receive timestamps).
    pub fn received_at(&self) -> Option<SystemTime> {
        match self {
            Self::Server(c) => c.received_at(),
            Self::Relay(p) => p.reader.received_at(),
        }
    }

    /// Acknowledges queue entries.
    ///
    /// # Errors
    /// If the write fails.
    pub async fn ack(&mut self, seqs: &[u64]) -> Result<()> {
        match self {
            Self::Server(c) => Ok(c.ack(seqs).await?),
            Self::Relay(p) => {
                p.send(&pb::ClientFrame {
                    id: 0,
                    body: Some(In::Ack(pb::Ack {
                        seqs: seqs.to_vec(),
                    })),
                })
                .await
            }
        }
    }
}

/// A plain-TCP link to the relay.
pub struct Plain {
    reader: Reader,
    writer: Writer,
    decoder: FrameDecoder,
    inbuf: BytesMut,
    outbuf: BytesMut,
    next_id: u32,
}

impl Plain {
    /// Connects to the relay as `user_id` and waits until it is registered;
    /// `stamped`: take the kernel's receive times (see
    /// [`Link::received_at`]).
    ///
    /// # Errors
    /// If the relay cannot be reached or answers something else.
    pub async fn connect(addr: &str, user_id: u64, stamped: bool) -> Result<Self> {
        let endpoint: Endpoint = addr.parse().context("relay address")?;
        let (mut reader, writer) = transport::connect(&endpoint)
            .await
            .with_context(|| format!("relay at {addr}"))?;
        if stamped {
            reader = reader.stamp_receives()?;
        }
        let mut p = Self {
            reader,
            writer,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES),
            inbuf: BytesMut::with_capacity(8 * 1024),
            outbuf: BytesMut::new(),
            next_id: 0,
        };
        p.send(&pb::ClientFrame {
            id: 1,
            body: Some(In::Auth(pb::Auth {
                user_id,
                device_id: 1,
                credential: Default::default(),
            })),
        })
        .await?;
        p.next_id = 1;
        loop {
            match p.next_frame().await?.body {
                Some(Out::UpToDate(_)) => return Ok(p),
                Some(Out::AuthOk(_)) => {}
                other => bail!("relay answered {other:?}"),
            }
        }
    }

    async fn send(&mut self, f: &pb::ClientFrame) -> Result<()> {
        frame::encode(f, &mut self.outbuf);
        let out = self.outbuf.split().freeze();
        self.writer.write(out).await.context("relay write")
    }

    async fn next_frame(&mut self) -> Result<pb::ServerFrame> {
        loop {
            if let Some(f) = self
                .decoder
                .decode_message::<pb::ServerFrame>(&mut self.inbuf)?
            {
                return Ok(f);
            }
            if self.reader.read(&mut self.inbuf).await? == 0 {
                bail!("the relay closed the connection");
            }
        }
    }
}
