//! Arbitrary bytes into the server side of the Noise handshake, as
//! `gateway::connection::handshake` consumes it: a responder reading
//! message 1 and decoding its payload as `ClientHello`, or, after a genuine
//! message 1 and the server's message 2, reading the bytes as message 3.
//!
//! Errors are expected; panics are not. A genuine message 3 carrying
//! arbitrary payload must be accepted and turn into a session.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchboard_proto::limits::DEFAULT_MAX_FRAME_BYTES;
use switchboard_proto::noise::Handshake;
use switchboard_proto::{pb, record, version};

/// Fixed static keys: any 32 bytes are an X25519 private key.
const CLIENT_KEY: [u8; 32] = [1; 32];
const SERVER_KEY: [u8; 32] = [2; 32];

fuzz_target!(|data: &[u8]| {
    let Some((mode, msg)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => message_1(msg),
        1 => message_3(msg),
        _ => genuine_message_3(msg),
    }
});

/// The bytes as the first record of a stream.
fn message_1(msg: &[u8]) {
    let mut server = Handshake::responder(&SERVER_KEY).expect("responder");
    let Ok(payload) = server.read_message(msg) else {
        return;
    };
    if let Ok(hello) = pb::ClientHello::decode(&payload[..]) {
        let _ = version::negotiate(version::CURRENT, &hello.versions);
    }
}

/// A client and a server that have exchanged messages 1 and 2.
fn after_message_2() -> (Handshake, Handshake) {
    let mut client = Handshake::initiator(&CLIENT_KEY).expect("initiator");
    let mut server = Handshake::responder(&SERVER_KEY).expect("responder");
    let hello = pb::ClientHello {
        versions: vec![version::CURRENT],
        user_agent: "fuzz".into(),
    };
    let mut wire = BytesMut::new();
    client
        .write_message(&hello.encode_to_vec(), &mut wire)
        .expect("message 1");
    let rec = record::decode(&mut wire).expect("record").expect("whole");
    server.read_message(&rec).expect("read message 1");
    server.write_message(&[], &mut wire).expect("message 2");
    let rec = record::decode(&mut wire).expect("record").expect("whole");
    client.read_message(&rec).expect("read message 2");
    (client, server)
}

/// The bytes as message 3.
fn message_3(msg: &[u8]) {
    let (_, mut server) = after_message_2();
    if server.read_message(msg).is_ok() {
        server
            .into_session(DEFAULT_MAX_FRAME_BYTES)
            .expect("a finished handshake becomes a session");
    }
}

/// A genuine message 3 carrying the bytes as its payload.
fn genuine_message_3(payload: &[u8]) {
    let (mut client, mut server) = after_message_2();
    let mut wire = BytesMut::new();
    if client.write_message(payload, &mut wire).is_err() {
        return; // payload too big for one Noise message
    }
    let rec = record::decode(&mut wire).expect("record").expect("whole");
    assert_eq!(
        server.read_message(&rec).expect("genuine message 3"),
        payload
    );
    assert!(server.is_finished());
    server
        .into_session(DEFAULT_MAX_FRAME_BYTES)
        .expect("a finished handshake becomes a session");
}
