//! Arbitrary bytes as every message the server decodes from client bytes:
//! `ClientHello` (handshake payload), `ClientFrame` and each of its bodies on
//! their own, and `SignedKey` (stored as the client sent it, decoded again
//! when a bundle is handed out).
//!
//! Decoding must never panic; whatever decodes must re-encode to bytes that
//! decode to an equal message and re-encode identically (prost's encoding is
//! canonical, so a second round changes nothing).
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchboard_proto::pb;

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::ClientHello>(data);
    round_trip::<pb::ClientFrame>(data);
    round_trip::<pb::Ping>(data);
    round_trip::<pb::RequestCode>(data);
    round_trip::<pb::VerifyCode>(data);
    round_trip::<pb::Auth>(data);
    round_trip::<pb::LookupUser>(data);
    round_trip::<pb::Send>(data);
    round_trip::<pb::DevicePayload>(data);
    round_trip::<pb::Ack>(data);
    round_trip::<pb::SendReceipt>(data);
    round_trip::<pb::UploadKeys>(data);
    round_trip::<pb::IdentityKeys>(data);
    round_trip::<pb::SignedKey>(data);
    round_trip::<pb::FetchBundles>(data);
    round_trip::<pb::CreateLinkCode>(data);
    round_trip::<pb::LinkDevice>(data);
    round_trip::<pb::ListDevices>(data);
    round_trip::<pb::RevokeDevice>(data);
});

fn round_trip<M: Message + Default + PartialEq + Debug>(data: &[u8]) {
    let Ok(msg) = M::decode(data) else {
        return;
    };
    let bytes = msg.encode_to_vec();
    assert_eq!(bytes.len(), msg.encoded_len());
    let again = match M::decode(&bytes[..]) {
        Ok(again) => again,
        Err(e) => panic!("{msg:?} re-encoded as {bytes:02x?} does not decode: {e}"),
    };
    assert_eq!(again, msg);
    assert_eq!(again.encode_to_vec(), bytes);
}
