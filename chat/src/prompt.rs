//! `chat`'s input: a line editor with a prompt when standard input and
//! output are terminals, else plain lines from standard input (scripts and
//! tests drive `chat` through pipes).
//!
//! Both read on a thread of their own that hands lines over a channel: the
//! editor blocks, and a read of tokio's stdin still pending at exit would
//! keep the runtime (so sbchat) waiting until the other end closes it. While
//! the editor runs, everything sbchat prints goes through its printer (see
//! `output`), which prints above the prompt and redraws the line being
//! typed. rustyline's own fallback for a non-terminal stdin is not used so
//! that one plain reader serves every other case.

use std::io::{BufRead, IsTerminal};

use anyhow::Result;
use rustyline::error::ReadlineError;
use tokio::sync::mpsc;

use crate::output::TerminalGuard;

const PROMPT: &str = "> ";

/// What the user did.
#[derive(Debug)]
pub enum Input {
    Line(String),
    /// Ctrl-C at the prompt: leave now.
    Interrupt,
}

/// The source of typed lines; `None` from [`Prompt::next`] is end of input.
pub struct Prompt {
    /// Filled by the reading thread, which waits (blocks) while the one
    /// slot is taken: one line is read ahead at most. Closed at EOF.
    lines: mpsc::Receiver<Result<Input, String>>,
    /// Output goes through the editor while this is held.
    _printer: Option<TerminalGuard>,
    /// Gives the terminal back its mode if the editor still holds it.
    _mode: Option<TerminalMode>,
}

impl Prompt {
    /// The line editor if `editor` is allowed and both standard input and
    /// output are terminals, else plain lines.
    ///
    /// # Errors
    ///
    /// When no thread can be started to read the input.
    pub fn start(editor: bool) -> Result<Self> {
        if editor && std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            match start_editor() {
                Ok(prompt) => return Ok(prompt),
                Err(e) => tracing::warn!("no line editor, reading plain lines: {e}"),
            }
        }
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("sbchat-stdin".into())
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let input = match stdin.read_until(b'\n', &mut line) {
                        Ok(0) => return,
                        // Bytes that are not UTF-8 show as U+FFFD.
                        Ok(_) => Ok(Input::Line(
                            String::from_utf8_lossy(&line)
                                .trim_end_matches(['\n', '\r'])
                                .to_owned(),
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = input.is_err();
                    if tx.blocking_send(input).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self {
            lines: rx,
            _printer: None,
            _mode: None,
        })
    }

    /// The next input, `None` at end of input.
    ///
    /// # Errors
    ///
    /// When standard input or the terminal cannot be read.
    pub async fn next(&mut self) -> Result<Option<Input>> {
        match self.lines.recv().await {
            None => Ok(None),
            Some(Ok(input)) => Ok(Some(input)),
            Some(Err(e)) => Err(anyhow::anyhow!("cannot read standard input: {e}")),
        }
    }
}

fn start_editor() -> Result<Prompt, ReadlineError> {
    let mode = TerminalMode::save();
    let mut editor = rustyline::DefaultEditor::new()?;
    let printer = editor.create_external_printer()?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("sbchat-prompt".into())
        .spawn(move || {
            loop {
                let input = match editor.readline(PROMPT) {
                    Ok(line) => {
                        let _ = editor.add_history_entry(line.as_str());
                        let quit = line.trim() == "/quit";
                        if tx.blocking_send(Ok(Input::Line(line))).is_err() || quit {
                            // Not back to raw mode for a session that ends.
                            return;
                        }
                        continue;
                    }
                    Err(ReadlineError::Eof) => return,
                    Err(ReadlineError::Interrupted) => Ok(Input::Interrupt),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.blocking_send(input);
                return;
            }
        })?;
    Ok(Prompt {
        lines: rx,
        _printer: Some(TerminalGuard::new(Box::new(printer))),
        _mode: mode,
    })
}

/// The terminal's mode before the editor changed it. The editor restores
/// it itself after each line, but not when sbchat exits while it waits for
/// one (the session ended from the server's side): then this does.
struct TerminalMode(rustix::termios::Termios);

impl TerminalMode {
    fn save() -> Option<Self> {
        rustix::termios::tcgetattr(std::io::stdin()).ok().map(Self)
    }
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}
