//! The client task's requests: lookups, read receipts, group and device
//! management and key fetches asked for by the application (or by the task
//! itself), which are not part of the outbox.
//!
//! They wait in a bounded line for a link, go out as the link has room, and
//! any still unanswered when a link drops go out again on the next one (all
//! of them are idempotent).

use switchboard_proto::pb::{self, client_frame, server_frame};
use tracing::warn;

use super::{Actor, InFlight, Link};
use crate::ReceiptKind;
use crate::client::{Device, Reply};
use crate::connection::unexpected;
use crate::error::Error;
use crate::ids::DeviceId;

/// Lookups and read receipts waiting for a connection; past this, callers get
/// `Error::Busy` rather than growing an unbounded backlog.
const MAX_PENDING_REQUESTS: usize = 1024;

/// A lookup or read receipt: requests that are not part of the outbox and
/// are re-sent after a reconnect (both are idempotent).
pub(super) enum Request {
    Lookup {
        phone: String,
        reply: Reply<pb::UserInfo>,
    },
    ReadReceipt {
        to_user: u64,
        group_id: u64,
        client_msg_ids: Vec<String>,
        reply: Reply<()>,
    },
    /// Create, change, get or list groups.
    Group {
        body: client_frame::Body,
        reply: Reply<server_frame::Body>,
    },
    CreateLinkCode {
        reply: Reply<pb::LinkCode>,
    },
    ListDevices {
        reply: Reply<Vec<Device>>,
    },
    RevokeDevice {
        device_id: u32,
        reply: Reply<()>,
    },
    FetchKeys {
        user_id: u64,
        /// Only the devices' identity keys (no session made, no one-time
        /// key used up): for safety numbers and noticing device changes.
        identities_only: bool,
        reply: Reply<()>,
    },
}

impl Request {
    fn body(&self) -> client_frame::Body {
        match self {
            Self::Lookup { phone, .. } => client_frame::Body::LookupUser(pb::LookupUser {
                phone: phone.clone(),
            }),
            Self::ReadReceipt {
                to_user,
                group_id,
                client_msg_ids,
                ..
            } => client_frame::Body::SendReceipt(pb::SendReceipt {
                to_user: *to_user,
                kind: ReceiptKind::Read.into(),
                client_msg_ids: client_msg_ids.clone(),
                group_id: *group_id,
            }),
            Self::Group { body, .. } => body.clone(),
            Self::CreateLinkCode { .. } => {
                client_frame::Body::CreateLinkCode(pb::CreateLinkCode {})
            }
            Self::ListDevices { .. } => client_frame::Body::ListDevices(pb::ListDevices {}),
            Self::RevokeDevice { device_id, .. } => {
                client_frame::Body::RevokeDevice(pb::RevokeDevice {
                    device_id: *device_id,
                })
            }
            Self::FetchKeys {
                user_id,
                identities_only,
                ..
            } => client_frame::Body::FetchBundles(pb::FetchBundles {
                user_id: *user_id,
                identities_only: *identities_only,
            }),
        }
    }

    fn expected(&self) -> &'static str {
        match self {
            Self::Lookup { .. } => "UserInfo",
            Self::ReadReceipt { .. } => "ReceiptOk",
            Self::Group { .. } => "GroupInfo or GroupList",
            Self::CreateLinkCode { .. } => "LinkCode",
            Self::ListDevices { .. } => "DeviceList",
            Self::RevokeDevice { .. } => "DeviceRevoked",
            Self::FetchKeys { .. } => "Bundles",
        }
    }

    pub(super) fn fail(self, error: Error) {
        // A caller that stopped waiting has nothing to be told.
        match self {
            Self::Lookup { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ReadReceipt { reply, .. }
            | Self::RevokeDevice { reply, .. }
            | Self::FetchKeys { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::CreateLinkCode { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::ListDevices { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Group { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Actor {
    /// Moves waiting requests onto the link while it has room.
    pub(super) fn pump_requests(&mut self, link: &mut Link) {
        while link.has_room()
            && let Some(request) = self.requests.pop_front()
        {
            let id = link.next_id();
            link.session.queue(&pb::ClientFrame {
                id,
                body: Some(request.body()),
            });
            link.in_flight.insert(id, InFlight::Request(request));
        }
    }

    pub(super) fn push_request(&mut self, request: Request) {
        if self.requests.len() >= MAX_PENDING_REQUESTS {
            request.fail(Error::Busy(self.requests.len()));
        } else {
            self.requests.push_back(request);
        }
    }

    pub(super) fn on_request_answer(
        &mut self,
        request: Request,
        body: Option<server_frame::Body>,
    ) -> Result<(), Error> {
        use server_frame::Body;
        match (request, body) {
            (Request::Lookup { reply, .. }, Some(Body::UserInfo(info))) => {
                self.devices.insert(info.user_id, info.devices.clone());
                self.phones.insert(info.user_id, info.phone.clone());
                let _ = reply.send(Ok(info));
            }
            (Request::ReadReceipt { reply, .. }, Some(Body::ReceiptOk(_))) => {
                let _ = reply.send(Ok(()));
            }
            (
                Request::Group { reply, .. },
                Some(body @ (Body::GroupInfo(_) | Body::GroupList(_))),
            ) => {
                if let Body::GroupInfo(info) = &body {
                    self.learn_group(info);
                }
                let _ = reply.send(Ok(body));
            }
            (Request::CreateLinkCode { reply }, Some(Body::LinkCode(code))) => {
                let _ = reply.send(Ok(code));
            }
            (Request::ListDevices { reply }, Some(Body::DeviceList(list))) => {
                let bad = self.crypto.add_own_device_list(&list.devices);
                if !bad.is_empty() {
                    warn!(devices = ?bad, "devices of this account with invalid identity keys");
                }
                let me = self.shared.device_id;
                let devices = list
                    .devices
                    .into_iter()
                    .map(|d| Device {
                        device_id: DeviceId(d.device_id),
                        primary: d.primary,
                        this_device: d.device_id == me,
                        created_ms: d.created_ms,
                        identity_key: d.identity.as_ref().and_then(|i| {
                            let key: [u8; 32] = i.ed25519.as_ref().try_into().ok()?;
                            Some(vodozemac::base64_encode(key))
                        }),
                    })
                    .collect();
                let _ = reply.send(Ok(devices));
            }
            (Request::RevokeDevice { device_id, reply }, Some(Body::DeviceRevoked(_))) => {
                self.crypto
                    .forget_devices(self.shared.user_id, &[device_id]);
                let _ = reply.send(Ok(()));
            }
            (
                Request::FetchKeys {
                    user_id,
                    identities_only,
                    reply,
                },
                Some(Body::Bundles(bundles)),
            ) => {
                let outcome = if identities_only {
                    self.crypto.refresh_identities(&bundles)
                } else {
                    self.crypto.add_bundles(&bundles)
                };
                match outcome {
                    Ok(outcome) => {
                        let devices = bundles.devices.iter().map(|d| d.device_id).collect();
                        if user_id != self.shared.user_id {
                            self.devices.insert(user_id, devices);
                        }
                        self.report_changes(user_id, &outcome);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            (request, Some(Body::Error(e))) => request.fail(Error::Server(e.into())),
            (request, other) => {
                let expected = request.expected();
                request.fail(unexpected(expected, other.as_ref()));
                return Err(unexpected(expected, other.as_ref()));
            }
        }
        Ok(())
    }
}
