//! An echo bot on the Switchboard SDK: answers every message with the same
//! bytes, and acknowledges every message and receipt.
//!
//! ```text
//! cargo run -p switchboard-client --example echo_bot -- SERVER CREDENTIALS_JSON STATE_DIR
//! ```
//!
//! `CREDENTIALS_JSON` is a serialized [`Credentials`] (an `sbchat` home's
//! `account.json` works); `STATE_DIR` holds the device's keys, sessions
//! and outbox, and must be the directory the keys were published from
//! (the one given to `register::verify_code`). Stop it with Ctrl-C.
//!
//! It shows the three rules of an event loop (see the crate's `guide`):
//! awaiting a send inside the loop is fine; acknowledge what you handled,
//! receipts included; reuse the same client message id when the same work
//! may be done twice (here: the message is echoed, then acknowledged, so a
//! crash in between echoes it again under the same id, which the server
//! answers as a duplicate).

use futures_util::StreamExt;
use switchboard_client::{Client, ClientConfig, Credentials, Error, Event, Events, Seq};

/// Echoes every message of `events` back to its sender until the client
/// closes; returns how many were echoed.
///
/// # Errors
///
/// [`Error::Closed`] if the client stops while an ack is being queued.
/// Acknowledges `seq`; false once the client is closing (whatever was not
/// acknowledged comes again on the next start).
async fn acked(client: &Client, seq: Seq) -> bool {
    match client.ack([seq]).await {
        Ok(()) => true,
        Err(error) => {
            eprintln!("cannot acknowledge {seq}, stopping: {error}");
            false
        }
    }
}

pub async fn echo(client: &Client, mut events: Events) -> Result<u64, Error> {
    let mut echoed = 0;
    while let Some(event) = events.next().await {
        match event {
            Event::Message {
                seq,
                from_user,
                from_own_device: false,
                payload,
                ..
            } => {
                // One id per incoming queue entry: a redelivered message is
                // echoed under the same id, so its peer sees it once.
                let id = format!("echo-{seq}");
                // Awaiting the ✓ here cannot stall the client: it keeps
                // reading answers while this loop is busy.
                match client.send_to_user_with_id(id, from_user, payload).await {
                    Ok(_) => echoed += 1,
                    // Left unacknowledged: the server hands it over again
                    // on the next connection.
                    Err(error) if error.is_retryable() => {
                        eprintln!("cannot echo message {seq} for now: {error}");
                        continue;
                    }
                    // Acknowledged anyway: a message that can never be
                    // echoed must not come back on every connect.
                    Err(error) => eprintln!("cannot echo message {seq}: {error}"),
                }
                if !acked(client, seq).await {
                    break;
                }
            }
            // Copies of our own sends, and receipts (✓✓ of the echoes):
            // acknowledge (in the guard), or they come back on every connect
            // for 30 days; stop if the client is closing.
            Event::Message { seq, .. } | Event::Receipt { seq, .. }
                if !acked(client, seq).await =>
            {
                break;
            }
            Event::Closed { reason } => {
                eprintln!("closed: {reason}");
                break;
            }
            _ => {}
        }
    }
    Ok(echoed)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, creds_path, state_dir] = args.as_slice() else {
        eprintln!("usage: echo_bot SERVER CREDENTIALS_JSON STATE_DIR");
        std::process::exit(2);
    };
    let creds: Credentials = serde_json::from_slice(&std::fs::read(creds_path)?)?;
    let mut config = ClientConfig::new(server.parse()?);
    config.state_dir = Some(state_dir.into());
    config.outbox_dir = Some(std::path::Path::new(state_dir).join("outbox"));
    let (client, events) = Client::start(config, creds).await?;
    tokio::select! {
        echoed = echo(&client, events) => println!("echoed {} messages", echoed?),
        _ = tokio::signal::ctrl_c() => client.close().await?,
    }
    Ok(())
}
