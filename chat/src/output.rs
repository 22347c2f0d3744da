//! What sbchat prints: one line per event on stdout, as text or as a JSON
//! object (`--json`), and diagnostics (connection state, errors) on stderr.
//!
//! While `chat`'s line editor owns the terminal, every line goes through the
//! editor's printer instead, which prints it above the prompt and redraws
//! the line being typed. The terminal is one per process, so that printer
//! is a process-wide slot rather than something each caller passes along.

use std::io::Write;
use std::sync::Mutex;

use rustyline::ExternalPrinter;
use serde_json::{Value, json};
use switchboard_client::Error as SdkError;

/// The line editor's printer while it owns the terminal. Held only for one
/// print (no `.await` inside); set and cleared by [`TerminalGuard`].
static EDITOR_PRINTER: Mutex<Option<Box<dyn ExternalPrinter + Send>>> = Mutex::new(None);

/// Routes output through the line editor's printer until dropped.
pub struct TerminalGuard(());

impl TerminalGuard {
    pub fn new(printer: Box<dyn ExternalPrinter + Send>) -> Self {
        if let Ok(mut slot) = EDITOR_PRINTER.lock() {
            *slot = Some(printer);
        }
        Self(())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Ok(mut slot) = EDITOR_PRINTER.lock() {
            *slot = None;
        }
    }
}

/// Prints `line` through the line editor if it owns the terminal; false
/// if it does not (or it failed: the caller prints it plainly).
fn through_editor(line: &str) -> bool {
    let Ok(mut slot) = EDITOR_PRINTER.lock() else {
        return false;
    };
    match slot.as_mut() {
        Some(printer) => printer.print(format!("{line}\n")).is_ok(),
        None => false,
    }
}

/// `error` and its causes, each said once: the SDK's errors repeat their
/// cause in their own message (`invalid use: X` caused by `X`), which
/// `{:#}` would print twice. A cause that ends the text so far is skipped.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// The printer chosen by `--json`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    pub fn is_json(self) -> bool {
        self.json
    }

    /// Prints one event: `text` in text mode, `value` as a JSON line
    /// otherwise. Stdout is line-buffered, so each line is out before the
    /// caller acknowledges what it shows.
    pub fn event(self, text: &str, value: &Value) {
        if !self.json && through_editor(text) {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) must not turn into a panic.
        let _ = if self.json {
            writeln!(stdout, "{value}")
        } else {
            writeln!(stdout, "{text}")
        };
        let _ = stdout.flush();
    }

    /// A diagnostic for humans, on stderr (both modes).
    pub fn note(self, text: &str) {
        if through_editor(text) {
            return;
        }
        let _ = writeln!(std::io::stderr().lock(), "{text}");
    }

    /// Reports a failed command: on stderr in text mode, as an `error` JSON
    /// line on stdout in JSON mode (with the server's error code if any).
    pub fn error(self, error: &anyhow::Error) {
        if self.json {
            let code = error
                .chain()
                .find_map(|e| e.downcast_ref::<SdkError>())
                .and_then(SdkError::server_code)
                .map(|c| c.as_str_name());
            self.event(
                "",
                &json!({"event": "error", "error": describe(error), "code": code}),
            );
        } else {
            self.note(&format!("sbchat: error: {}", describe(error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_says_each_cause_once() {
        let sdk = SdkError::from(switchboard_client::UsageError::Invalid(
            "empty phone number",
        ));
        let error = anyhow::Error::new(sdk).context("cannot send to +1555");
        assert_eq!(
            describe(&error),
            "cannot send to +1555: invalid use: empty phone number"
        );
        let error = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(describe(&error), "top: middle: root");
    }
}
