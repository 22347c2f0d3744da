//! Typed ids: the account, device and queue-position numbers of the SDK's
//! API, each its own type so one cannot be passed for another.
//!
//! They serialize as the bare integers they wrap (`#[serde(transparent)]`)
//! and `Display` prints the number, so files and JSON written before the
//! ids were typed still load, and new ones look the same. (`Debug` names
//! the type: `UserId(42)`.) The
//! conversion to and from the protocol's integers is explicit (`new` /
//! `get`, or `From`) and happens where the SDK meets the wire types.
//!
//! # Example
//!
//! ```
//! use switchboard_client::{DeviceId, Seq, UserId};
//!
//! let user = UserId::new(42);
//! assert_eq!(user.get(), 42);
//! assert_eq!(user.to_string(), "42");
//! assert_eq!(serde_json::to_string(&DeviceId::new(3)).unwrap(), "3");
//! assert_eq!(Seq::from(7), Seq::new(7));
//! ```
//!
//! A user id is not a queue position:
//!
//! ```compile_fail
//! # async fn demo(client: switchboard_client::Client) -> switchboard_client::Result<()> {
//! use switchboard_client::UserId;
//! let from_user = UserId::new(42);
//! client.ack([from_user]).await?; // error: expected `Seq`, found `UserId`
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize,
            Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl $name {
            /// Wraps the protocol's integer.
            #[must_use]
            pub const fn new(value: $int) -> Self {
                Self(value)
            }

            /// The protocol's integer.
            #[must_use]
            pub const fn get(self) -> $int {
                self.0
            }
        }

        impl From<$int> for $name {
            fn from(value: $int) -> Self {
                Self(value)
            }
        }

        impl From<$name> for $int {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

id! {
    /// An account, as the server numbers it (`user_id` on the wire). 0 is
    /// no user.
    UserId(u64)
}

id! {
    /// One device of an account (`device_id` on the wire); unique within
    /// its account only (a re-registration's new devices get new ids).
    DeviceId(u32)
}

id! {
    /// The position of an entry (a message or a receipt) in this device's
    /// queue on the server: what [`Client::ack`](crate::Client::ack) takes.
    /// Unique per device, not per message.
    Seq(u64)
}

id! {
    /// A group: what [`Client::send_to_group`](crate::Client::send_to_group)
    /// and the group calls take.
    GroupId(u64)
}

/// The ids of a wire list, typed.
pub(crate) fn devices(ids: &[u32]) -> Vec<DeviceId> {
    ids.iter().copied().map(DeviceId).collect()
}

/// The wire integers of typed ids.
pub(crate) fn device_ints(ids: &[DeviceId]) -> Vec<u32> {
    ids.iter().map(|d| d.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_is_the_bare_number() {
        let json = serde_json::to_string(&(UserId(1), DeviceId(2), Seq(3))).unwrap();
        assert_eq!(json, "[1,2,3]");
        let back: (UserId, DeviceId, Seq) = serde_json::from_str("[1,2,3]").unwrap();
        assert_eq!(back, (UserId(1), DeviceId(2), Seq(3)));
    }

    #[test]
    fn display_and_parse_are_the_bare_number() {
        assert_eq!(
            UserId(18_446_744_073_709_551_615).to_string(),
            "18446744073709551615"
        );
        assert_eq!(format!("{:>4}", DeviceId(7)), "   7");
        assert_eq!("12".parse::<Seq>().ok(), Some(Seq(12)));
    }
}
