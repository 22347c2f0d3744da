//! One authenticated-or-not link to a server: the Noise handshake, then
//! framed requests and responses, with no reconnects and no background task.
//!
//! [`Connection`] is deliberately low level: the server's integration tests
//! use it to pin the protocol frame by frame and the load generator uses it
//! to pipeline raw frames. Applications want [`crate::Client`], which builds
//! on the same handshake.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use switchboard_proto::pb::{self, client_frame, server_frame};
use switchboard_proto::{PREAMBLE, Session, limits, noise, record, version};
use tracing::{debug, instrument};

use crate::endpoint::Endpoint;
use crate::error::{CloseReason, Error, ProtocolError, ServerError, TransportError, UsageError};
use crate::ids::{DeviceId, UserId};
use crate::register::Credentials;
use crate::transport::{self, Reader, Writer};

/// Most frames kept aside while [`Connection::request`] waits for its
/// response. Pushes arrive paced by acks (≤ 100 entries per batch), so a
/// well-behaved server never comes close; past this the peer is flooding us.
pub const MAX_BUFFERED_FRAMES: usize = 4096;

/// Default limit on TCP connect + WebSocket upgrade + Noise handshake: long
/// enough for a slow mobile link, short enough that a dead server is noticed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to open a connection. Start from [`ConnectOptions::default`] and set
/// the fields you need (new fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Sent in `ClientHello`, for the server's logs.
    pub user_agent: String,
    /// The server's static public key (32 bytes) to pin, if any.
    pub server_key: Option<Vec<u8>>,
    /// Limit on connect + handshake.
    pub connect_timeout: Duration,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: usize,
    /// Protocol versions offered in `ClientHello` (tests may offer others).
    pub versions: Vec<u32>,
    /// Take the kernel's receive time of what is read, for
    /// [`Connection::received_at`] (TCP on Linux; see
    /// [`Reader::stamp_receives`]). Off by default.
    pub receive_timestamps: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            user_agent: concat!("switchboard-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            server_key: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_frame_bytes: limits::DEFAULT_MAX_FRAME_BYTES,
            versions: vec![version::CURRENT],
            receive_timestamps: false,
        }
    }
}

/// An encrypted link to a server, after the handshake.
///
/// Requests get ids from [`Connection::next_request_id`]; responses are
/// matched by id. Frames that arrive while [`Connection::request`] waits for
/// another id (pushes, responses to pipelined requests) are kept, in order,
/// for [`Connection::next_frame`].
#[derive(Debug)]
pub struct Connection {
    endpoint: Endpoint,
    reader: Reader,
    writer: Writer,
    session: Session,
    inbuf: BytesMut,
    next_id: u32,
    buffered: VecDeque<pb::ServerFrame>,
    protocol_version: u32,
    server_time_ms: u64,
    server_key: Vec<u8>,
    goodbye: Option<ServerError>,
}

/// The pieces of a connection, for the client actor.
pub(crate) struct Parts {
    pub reader: Reader,
    pub writer: Writer,
    pub session: Session,
    pub inbuf: BytesMut,
    pub next_id: u32,
    pub buffered: VecDeque<pb::ServerFrame>,
}

/// Name of a server frame body, for errors and logs.
pub(crate) fn body_name(body: Option<&server_frame::Body>) -> &'static str {
    use server_frame::Body;
    match body {
        None => "an empty frame",
        Some(Body::Error(_)) => "Error",
        Some(Body::Pong(_)) => "Pong",
        Some(Body::CodeSent(_)) => "CodeSent",
        Some(Body::Verified(_)) => "Verified",
        Some(Body::AuthOk(_)) => "AuthOk",
        Some(Body::UserInfo(_)) => "UserInfo",
        Some(Body::SendOk(_)) => "SendOk",
        Some(Body::ReceiptOk(_)) => "ReceiptOk",
        Some(Body::Deliver(_)) => "Deliver",
        Some(Body::UpToDate(_)) => "UpToDate",
        Some(Body::Goodbye(_)) => "Goodbye",
        Some(Body::KeysUploaded(_)) => "KeysUploaded",
        Some(Body::Bundles(_)) => "Bundles",
        Some(Body::LinkCode(_)) => "LinkCode",
        Some(Body::DeviceList(_)) => "DeviceList",
        Some(Body::DeviceRevoked(_)) => "DeviceRevoked",
        Some(Body::KeysLow(_)) => "KeysLow",
        Some(Body::PinSet(_)) => "PinSet",
        Some(Body::GroupInfo(_)) => "GroupInfo",
        Some(Body::GroupList(_)) => "GroupList",
        Some(Body::GroupKeysSent(_)) => "GroupKeysSent",
    }
}

pub(crate) fn unexpected(expected: &'static str, got: Option<&server_frame::Body>) -> Error {
    Error::Protocol(ProtocolError::UnexpectedFrame {
        expected,
        got: body_name(got).to_owned(),
    })
}

/// Turns a `Goodbye` body into its reason.
pub(crate) fn goodbye_reason(g: pb::Goodbye) -> ServerError {
    g.reason.unwrap_or_default().into()
}

/// Reads one whole handshake record.
async fn read_record(reader: &mut Reader, inbuf: &mut BytesMut) -> Result<BytesMut, Error> {
    loop {
        if let Some(rec) = record::decode(inbuf)? {
            return Ok(rec);
        }
        if reader.read(inbuf).await? == 0 {
            return Err(Error::Closed(CloseReason::ConnectionLost));
        }
    }
}

impl Connection {
    /// Connects to `endpoint` and completes the Noise handshake; the
    /// connection is not yet authenticated.
    ///
    /// # Errors
    ///
    /// - [`Error::Transport`] if the server cannot be reached, or
    ///   [`TransportError::ConnectTimeout`] after `options.connect_timeout`;
    /// - [`Error::Server`] if the server refuses the handshake (e.g.
    ///   `UNSUPPORTED_VERSION`);
    /// - [`Error::Protocol`] for a bad handshake or
    ///   [`ProtocolError::ServerKeyMismatch`] when a pinned key differs;
    /// - [`Error::Usage`] for a pinned key that is not 32 bytes.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), switchboard_client::Error> {
    /// use switchboard_client::{ConnectOptions, Connection};
    /// let mut conn = Connection::connect(&"127.0.0.1:5222".parse()?, &ConnectOptions::default()).await?;
    /// let pong = conn.ping().await?;
    /// println!("server time {}", pong.server_time_ms);
    /// # Ok(()) }
    /// ```
    #[instrument(level = "debug", skip(options), fields(%endpoint))]
    pub async fn connect(endpoint: &Endpoint, options: &ConnectOptions) -> Result<Self, Error> {
        if let Some(key) = &options.server_key
            && key.len() != noise::KEY_BYTES
        {
            return Err(UsageError::BadServerKey(key.len()).into());
        }
        match tokio::time::timeout(options.connect_timeout, Self::handshake(endpoint, options))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(TransportError::ConnectTimeout(options.connect_timeout).into()),
        }
    }

    async fn handshake(endpoint: &Endpoint, options: &ConnectOptions) -> Result<Self, Error> {
        let (mut reader, mut writer) = transport::connect(endpoint).await?;
        if options.receive_timestamps {
            reader = reader.stamp_receives()?;
        }
        // A fresh static key per connection: the client's Noise key is not a
        // credential (accounts authenticate inside the session).
        let keypair = noise::generate_keypair()?;
        let mut hs = noise::Handshake::initiator(&keypair.private)?;
        let hello = pb::ClientHello {
            versions: options.versions.clone(),
            user_agent: options.user_agent.clone(),
        };
        let mut out = BytesMut::from(&PREAMBLE[..]);
        hs.write_message(&hello.encode_to_vec(), &mut out)?;
        writer.write(out.split().freeze()).await?;

        let mut inbuf = BytesMut::new();
        let rec = read_record(&mut reader, &mut inbuf).await?;
        let payload = hs.read_message(&rec)?;
        let server_key = hs.remote_static().unwrap_or_default();
        if let Some(pinned) = &options.server_key
            && *pinned != server_key
        {
            return Err(ProtocolError::ServerKeyMismatch {
                expected: hex::encode(pinned),
                got: hex::encode(&server_key),
            }
            .into());
        }
        let hello = pb::ServerHello::decode(payload.as_slice())
            .map_err(switchboard_proto::ProtoError::from)?;
        let protocol_version = match hello.result {
            Some(pb::server_hello::Result::Version(v)) => v,
            Some(pb::server_hello::Result::Error(e)) => return Err(Error::Server(e.into())),
            None => {
                return Err(ProtocolError::UnexpectedFrame {
                    expected: "ServerHello with a version",
                    got: "ServerHello without a result".to_owned(),
                }
                .into());
            }
        };
        hs.write_message(&[], &mut out)?;
        writer.write(out.split().freeze()).await?;
        let session = hs.into_session(options.max_frame_bytes)?;
        debug!(protocol_version, "handshake complete");
        Ok(Self {
            endpoint: endpoint.clone(),
            reader,
            writer,
            session,
            inbuf,
            next_id: 1,
            buffered: VecDeque::new(),
            protocol_version,
            server_time_ms: hello.server_time_ms,
            server_key,
            goodbye: None,
        })
    }

    /// When the kernel received the bytes that completed the frame
    /// [`Connection::next_frame`] returned last (an upper bound if that
    /// frame was already buffered); `None` unless connected with
    /// [`ConnectOptions::receive_timestamps`].
    #[must_use]
    pub fn received_at(&self) -> Option<std::time::SystemTime> {
        self.reader.received_at()
    }

    /// The endpoint this connection was opened to.
    #[must_use]
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The protocol version the server chose.
    #[must_use]
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// The server's clock at the handshake (ms since the Unix epoch).
    #[must_use]
    pub fn server_time_ms(&self) -> u64 {
        self.server_time_ms
    }

    /// The server's static public key (pin it for later connections).
    #[must_use]
    pub fn server_public_key(&self) -> &[u8] {
        &self.server_key
    }

    /// A fresh, nonzero request id.
    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Encrypts and writes one frame.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] if the write fails.
    pub async fn send_frame(&mut self, frame: &pb::ClientFrame) -> Result<(), Error> {
        self.send_frames(std::slice::from_ref(frame)).await
    }

    /// Encrypts and writes several frames in one write (pipelining).
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] if the write fails.
    pub async fn send_frames(&mut self, frames: &[pb::ClientFrame]) -> Result<(), Error> {
        for frame in frames {
            self.session.queue(frame);
        }
        let mut out = BytesMut::new();
        self.session.seal(&mut out)?;
        self.writer.write(out.freeze()).await
    }

    /// Writes raw bytes as they are, bypassing encryption (for tests that
    /// check how the server handles garbage).
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] if the write fails.
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<(), Error> {
        self.writer.write(bytes).await
    }

    /// The next frame from the server: first any kept aside by
    /// [`Connection::request`], then from the wire. Cancel-safe.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] when the server closed the link (with the
    /// `Goodbye` reason if one came); [`Error::Transport`] or
    /// [`Error::Protocol`] on failure.
    pub async fn next_frame(&mut self) -> Result<pb::ServerFrame, Error> {
        if let Some(frame) = self.buffered.pop_front() {
            return Ok(frame);
        }
        self.read_frame().await
    }

    async fn read_frame(&mut self) -> Result<pb::ServerFrame, Error> {
        loop {
            if let Some(frame) = self
                .session
                .poll_frame::<pb::ServerFrame>(&mut self.inbuf)?
            {
                if let Some(server_frame::Body::Goodbye(g)) = &frame.body {
                    self.goodbye = Some(goodbye_reason(g.clone()));
                }
                return Ok(frame);
            }
            if self.reader.read(&mut self.inbuf).await? == 0 {
                let reason = self
                    .goodbye
                    .clone()
                    .map_or(CloseReason::ConnectionLost, CloseReason::Goodbye);
                return Err(Error::Closed(reason));
            }
        }
    }

    /// Sends `body` under a fresh id and returns the frame answering it,
    /// whatever it is (including `Error` frames).
    ///
    /// # Errors
    ///
    /// As [`Connection::send_frame`] and [`Connection::next_frame`], plus
    /// [`Error::Closed`] with [`CloseReason::Goodbye`] if the server says
    /// goodbye first.
    pub async fn request(&mut self, body: client_frame::Body) -> Result<pb::ServerFrame, Error> {
        let id = self.next_request_id();
        self.send_frame(&pb::ClientFrame {
            id,
            body: Some(body),
        })
        .await?;
        self.response(id).await
    }

    /// Waits for the frame answering request `id`, keeping other frames for
    /// [`Connection::next_frame`].
    ///
    /// # Errors
    ///
    /// As [`Connection::request`].
    pub async fn response(&mut self, id: u32) -> Result<pb::ServerFrame, Error> {
        if let Some(pos) = self.buffered.iter().position(|f| f.id == id)
            && let Some(frame) = self.buffered.remove(pos)
        {
            return Ok(frame);
        }
        loop {
            let frame = self.read_frame().await?;
            if frame.id == id && id != 0 {
                return Ok(frame);
            }
            if let Some(server_frame::Body::Goodbye(g)) = frame.body {
                return Err(Error::Closed(CloseReason::Goodbye(goodbye_reason(g))));
            }
            if self.buffered.len() >= MAX_BUFFERED_FRAMES {
                return Err(ProtocolError::TooManyBufferedFrames(MAX_BUFFERED_FRAMES).into());
            }
            self.buffered.push_back(frame);
        }
    }

    /// Like [`Connection::request`], but an `Error` answer becomes
    /// [`Error::Server`] and the body is returned.
    ///
    /// # Errors
    ///
    /// As [`Connection::request`], plus [`Error::Server`].
    pub async fn call(&mut self, body: client_frame::Body) -> Result<server_frame::Body, Error> {
        match self.request(body).await?.body {
            Some(server_frame::Body::Error(e)) => Err(Error::Server(e.into())),
            Some(body) => Ok(body),
            None => Err(unexpected("a response", None)),
        }
    }

    /// Round-trips a `Ping`.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`].
    pub async fn ping(&mut self) -> Result<pb::Pong, Error> {
        match self.call(client_frame::Body::Ping(pb::Ping {})).await? {
            server_frame::Body::Pong(p) => Ok(p),
            other => Err(unexpected("Pong", Some(&other))),
        }
    }

    /// Asks for a verification code for `phone`.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; the server may say `INVALID_PHONE` or
    /// `RATE_LIMITED`.
    pub async fn request_code(&mut self, phone: &str) -> Result<pb::CodeSent, Error> {
        self.request_code_in(phone, "").await
    }

    /// As [`Connection::request_code`], asking for the message in `locale`
    /// (a BCP 47 tag such as `pt-BR`; empty: the gateway's default).
    ///
    /// # Errors
    ///
    /// As [`Connection::request_code`]; `BAD_REQUEST` for a malformed locale.
    pub async fn request_code_in(
        &mut self,
        phone: &str,
        locale: &str,
    ) -> Result<pb::CodeSent, Error> {
        let body = client_frame::Body::RequestCode(pb::RequestCode {
            phone: phone.to_owned(),
            locale: locale.to_owned(),
        });
        match self.call(body).await? {
            server_frame::Body::CodeSent(c) => Ok(c),
            other => Err(unexpected("CodeSent", Some(&other))),
        }
    }

    /// Presents the code sent to `phone`; returns the new device's credentials.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; the server may say `CODE_INVALID`,
    /// `CODE_EXPIRED` or `CODE_LOCKED`.
    pub async fn verify_code(&mut self, phone: &str, code: &str) -> Result<Credentials, Error> {
        self.verify_code_with_pin(phone, code, "").await
    }

    /// As [`Connection::verify_code`], with the account's two-step
    /// verification `pin` (empty for none).
    ///
    /// # Errors
    ///
    /// As [`Connection::verify_code`]; also `PIN_REQUIRED`, `PIN_INVALID`,
    /// `PIN_LOCKED`.
    pub async fn verify_code_with_pin(
        &mut self,
        phone: &str,
        code: &str,
        pin: &str,
    ) -> Result<Credentials, Error> {
        let body = client_frame::Body::VerifyCode(pb::VerifyCode {
            phone: phone.to_owned(),
            code: code.to_owned(),
            pin: pin.to_owned(),
        });
        match self.call(body).await? {
            server_frame::Body::Verified(v) => Ok(Credentials {
                user_id: UserId(v.user_id),
                device_id: DeviceId(v.device_id),
                credential: v.credential.to_vec(),
                phone: phone.to_owned(),
                server_key: Some(self.server_key.clone()),
            }),
            other => Err(unexpected("Verified", Some(&other))),
        }
    }

    /// Sets (or, with an empty `pin`, clears) the account's two-step
    /// verification PIN. Needs an authenticated primary device. Returns
    /// whether a PIN is now set.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; the server may say `NOT_PRIMARY`,
    /// `UNAUTHENTICATED` or `BAD_REQUEST` (a PIN has 6 to 64 characters).
    pub async fn set_pin(&mut self, pin: &str) -> Result<bool, Error> {
        let body = client_frame::Body::SetPin(pb::SetPin {
            pin: pin.to_owned(),
        });
        match self.call(body).await? {
            server_frame::Body::PinSet(p) => Ok(p.enabled),
            other => Err(unexpected("PinSet", Some(&other))),
        }
    }

    /// Presents a link code made by a primary device ([`crate::Client::create_link_code`]);
    /// returns the credentials of the new linked device (its phone number is
    /// not known yet: empty; [`crate::register::link_device`] fills it).
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; `LINK_CODE_INVALID` for an unknown, used or
    /// expired code, `TOO_MANY_DEVICES`.
    pub async fn link_device(&mut self, code: &str) -> Result<Credentials, Error> {
        let body = client_frame::Body::LinkDevice(pb::LinkDevice {
            code: code.trim().to_owned(),
        });
        match self.call(body).await? {
            server_frame::Body::Verified(v) => Ok(Credentials {
                user_id: UserId(v.user_id),
                device_id: DeviceId(v.device_id),
                credential: v.credential.to_vec(),
                phone: String::new(),
                server_key: Some(self.server_key.clone()),
            }),
            other => Err(unexpected("Verified", Some(&other))),
        }
    }

    /// Authenticates this connection as one device. The server then starts
    /// pushing the device's queue (`Deliver`, then `UpToDate`).
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; `UNAUTHENTICATED` for a bad credential.
    pub async fn auth(&mut self, creds: &Credentials) -> Result<pb::AuthOk, Error> {
        let body = client_frame::Body::Auth(pb::Auth {
            user_id: creds.user_id.get(),
            device_id: creds.device_id.get(),
            credential: creds.credential.clone().into(),
        });
        match self.call(body).await? {
            server_frame::Body::AuthOk(ok) => Ok(ok),
            other => Err(unexpected("AuthOk", Some(&other))),
        }
    }

    /// Looks up a user by phone number.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; `UNKNOWN_USER` when nobody has that number.
    pub async fn lookup(&mut self, phone: &str) -> Result<pb::UserInfo, Error> {
        let body = client_frame::Body::LookupUser(pb::LookupUser {
            phone: phone.to_owned(),
        });
        match self.call(body).await? {
            server_frame::Body::UserInfo(u) => Ok(u),
            other => Err(unexpected("UserInfo", Some(&other))),
        }
    }

    /// Sends one message and waits for ✓.
    ///
    /// # Errors
    ///
    /// As [`Connection::call`]; `DEVICE_MISMATCH` with the device lists to fix.
    pub async fn send_message(&mut self, send: pb::Send) -> Result<pb::SendOk, Error> {
        match self.call(client_frame::Body::Send(send)).await? {
            server_frame::Body::SendOk(ok) => Ok(ok),
            other => Err(unexpected("SendOk", Some(&other))),
        }
    }

    /// Acknowledges queue entries (no response is expected).
    ///
    /// # Errors
    ///
    /// As [`Connection::send_frame`].
    pub async fn ack(&mut self, seqs: &[u64]) -> Result<(), Error> {
        let frames: Vec<pb::ClientFrame> = seqs
            .chunks(limits::MAX_ACK_SEQS)
            .map(|chunk| pb::ClientFrame {
                id: 0,
                body: Some(client_frame::Body::Ack(pb::Ack {
                    seqs: chunk.to_vec(),
                })),
            })
            .collect();
        self.send_frames(&frames).await
    }

    /// Closes the sending direction; the server then closes its side.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] if the shutdown fails.
    pub async fn close(mut self) -> Result<(), Error> {
        self.writer.shutdown().await
    }

    pub(crate) fn into_parts(self) -> Parts {
        Parts {
            reader: self.reader,
            writer: self.writer,
            session: self.session,
            inbuf: self.inbuf,
            next_id: self.next_id,
            buffered: self.buffered,
        }
    }
}
