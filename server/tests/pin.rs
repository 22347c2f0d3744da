//! Two-step verification against the real server: setting and clearing a
//! PIN, re-registration that needs it, and the wrong-PIN lockout that a new
//! SMS code does not lift.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};

const PIN: &str = "246810";

async fn set_pin(c: &mut Raw, pin: &str) -> Out {
    c.request(In::SetPin(pb::SetPin { pin: pin.into() })).await
}

/// Asks for a code on a fresh connection; returns it with the connection.
async fn new_code(server: &TestServer, phone: &str) -> (Raw, String) {
    let mut c = raw_tcp(&server.tcp()).await;
    let _ = std::fs::remove_file(server.data_dir().join("dev-codes").join(phone));
    match c
        .request(In::RequestCode(pb::RequestCode {
            phone: phone.into(),
            ..Default::default()
        }))
        .await
    {
        Out::CodeSent(_) => {}
        other => panic!("{other:?}"),
    }
    let code = dev_code(&server.data_dir(), phone).await;
    (c, code)
}

async fn verify(c: &mut Raw, phone: &str, code: &str, pin: &str) -> Out {
    c.request(In::VerifyCode(pb::VerifyCode {
        phone: phone.into(),
        code: code.into(),
        pin: pin.into(),
    }))
    .await
}

/// Every file under `dir`.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_pin_is_needed_to_register_again_until_cleared() {
    let server = TestServer::start().await;
    let phone = "+15550002001";
    let alice = register(&server, phone).await;
    let mut a = online(&server, &alice).await;
    match set_pin(&mut a, PIN).await {
        Out::PinSet(p) => assert!(p.enabled),
        other => panic!("{other:?}"),
    }
    // Only a salted slow hash is stored: the PIN is in no file of the data dir.
    for path in files(&server.data_dir()) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(PIN.len()).any(|w| w == PIN.as_bytes()),
            "PIN in clear in {}",
            path.display()
        );
    }

    // Whoever has the SMS code but not the PIN cannot take the account.
    let (mut c, code) = new_code(&server, phone).await;
    assert_eq!(
        error_code(&verify(&mut c, phone, &code, "").await),
        pb::ErrorCode::PinRequired
    );
    assert_eq!(
        error_code(&verify(&mut c, phone, &code, "135790").await),
        pb::ErrorCode::PinInvalid
    );
    // The same code still works with the PIN: the account is kept.
    let again = match verify(&mut c, phone, &code, PIN).await {
        Out::Verified(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(again.user_id, alice.user_id);
    assert!(again.device_id > alice.device_id);

    // The new primary clears it; then a code alone is enough.
    let mut b = online(
        &server,
        &Account {
            phone: phone.into(),
            user_id: again.user_id,
            device_id: again.device_id,
            credential: again.credential.to_vec(),
        },
    )
    .await;
    match set_pin(&mut b, "").await {
        Out::PinSet(p) => assert!(!p.enabled),
        other => panic!("{other:?}"),
    }
    let (mut c, code) = new_code(&server, phone).await;
    assert!(matches!(
        verify(&mut c, phone, &code, "").await,
        Out::Verified(_)
    ));
}

#[tokio::test]
async fn wrong_pins_lock_the_number_and_a_new_code_does_not_lift_it() {
    let server = TestServer::start().await;
    let phone = "+15550002002";
    let alice = register(&server, phone).await;
    let mut a = online(&server, &alice).await;
    assert!(matches!(set_pin(&mut a, PIN).await, Out::PinSet(_)));

    let (mut c, code) = new_code(&server, phone).await;
    for _ in 0..4 {
        assert_eq!(
            error_code(&verify(&mut c, phone, &code, "000000").await),
            pb::ErrorCode::PinInvalid
        );
    }
    match verify(&mut c, phone, &code, "000000").await {
        Out::Error(e) => {
            assert_eq!(e.code(), pb::ErrorCode::PinLocked, "{e:?}");
            assert!(e.retry_after_ms > 3_600_000, "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    // Even the right PIN is refused now, with this code or a new one.
    assert_eq!(
        error_code(&verify(&mut c, phone, &code, PIN).await),
        pb::ErrorCode::PinLocked
    );
    let (mut c, code) = new_code(&server, phone).await;
    assert_eq!(
        error_code(&verify(&mut c, phone, &code, PIN).await),
        pb::ErrorCode::PinLocked
    );
    // The account's devices were never touched.
    let mut a = online(&server, &alice).await;
    a.drain().await;
}

#[tokio::test]
async fn only_an_authenticated_primary_device_sets_a_valid_pin() {
    let server = TestServer::start().await;
    let mut anon = raw_tcp(&server.tcp()).await;
    assert_eq!(
        error_code(&set_pin(&mut anon, PIN).await),
        pb::ErrorCode::Unauthenticated
    );

    let alice = register(&server, "+15550002003").await;
    let mut a = online(&server, &alice).await;
    assert_eq!(
        error_code(&set_pin(&mut a, "12").await),
        pb::ErrorCode::BadRequest
    );

    let code = match a.request(In::CreateLinkCode(pb::CreateLinkCode {})).await {
        Out::LinkCode(c) => c.code,
        other => panic!("{other:?}"),
    };
    let mut l = raw_tcp(&server.tcp()).await;
    let linked = match l.request(In::LinkDevice(pb::LinkDevice { code })).await {
        Out::Verified(v) => Account {
            phone: String::new(),
            user_id: v.user_id,
            device_id: v.device_id,
            credential: v.credential.to_vec(),
        },
        other => panic!("{other:?}"),
    };
    let mut l = online(&server, &linked).await;
    assert_eq!(
        error_code(&set_pin(&mut l, PIN).await),
        pb::ErrorCode::NotPrimary
    );
}
