//! The client task's view of peers' devices and identities: telling the
//! application when they change, and asking the server afresh when a message
//! hints they did.

use tokio::sync::oneshot;
use tracing::info;

use super::Actor;
use super::requests::Request;
use crate::client::Event;
use crate::crypto::{BundleOutcome, DeviceChange};
use crate::ids::{self, UserId};

impl Actor {
    pub(super) fn safety_number_changed(&mut self, user_id: u64) {
        let phone = self.phones.get(&user_id).cloned().unwrap_or_default();
        info!(user_id, "a peer's identity keys changed");
        self.emit(Event::SafetyNumberChanged {
            user_id: UserId(user_id),
            phone,
        });
    }

    pub(super) fn contact_devices_changed(&mut self, user_id: u64, change: DeviceChange) {
        let phone = self.phones.get(&user_id).cloned().unwrap_or_default();
        info!(user_id, added = ?change.added, removed = ?change.removed, "a peer's devices changed");
        self.emit(Event::ContactDevicesChanged {
            user_id: UserId(user_id),
            phone,
            devices: ids::devices(&change.devices),
            added: ids::devices(&change.added),
            removed: ids::devices(&change.removed),
        });
    }

    /// Tells the application what a batch of bundles changed about `user`.
    pub(super) fn report_changes(&mut self, user_id: u64, outcome: &BundleOutcome) {
        if let Some(change) = outcome.devices_changed.clone() {
            self.contact_devices_changed(user_id, change);
        }
        if outcome.identity_changed {
            self.safety_number_changed(user_id);
        }
    }

    /// Asks for `user_id`'s current devices and identities, for nobody in
    /// particular (the answer reports any change).
    pub(super) fn refresh_devices(&mut self, user_id: u64) {
        let (reply, _) = oneshot::channel();
        self.push_request(Request::FetchKeys {
            user_id,
            identities_only: true,
            reply,
        });
    }
}
