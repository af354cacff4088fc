//! Logging: `tracing` to stderr, plain or JSON, with CHP's level names, and a level that the
//! authenticated API can change while hubgate runs.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// How log lines are written: `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

type Reload = reload::Handle<EnvFilter, Registry>;

/// The handle that swaps the level filter, and the filter's current text.
static LEVEL: OnceLock<(Reload, Mutex<String>)> = OnceLock::new();

/// Installs the process's subscriber. `RUST_LOG`, when set, wins over `level` with a full
/// filter.
pub fn init(level: &str, format: LogFormat) {
    let text = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let output = match format {
        LogFormat::Plain => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = LEVEL.set((handle, Mutex::new(text)));
    }
}

/// The current level filter.
pub fn level() -> Option<String> {
    LEVEL
        .get()
        .map(|(_, text)| text.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Changes the level filter: one of CHP's level names, or a full `tracing` filter.
///
/// # Errors
/// A message when the filter does not parse or logging was not set up by [`init`].
pub fn set_level(level: &str) -> Result<String, String> {
    let (handle, text) = LEVEL.get().ok_or("logging is not reloadable here")?;
    let trimmed = level.trim();
    let wanted = match trimmed.to_ascii_lowercase().as_str() {
        l @ ("trace" | "debug" | "info" | "warn" | "error" | "off") => l.to_owned(),
        "warning" => "warn".to_owned(),
        "critical" | "fatal" => "error".to_owned(),
        // A full filter names targets with `=` (`hubgate=debug,hyper=info`); a bare word that is
        // not a level would be read as a target name and silently turn everything else off.
        _ if trimmed.contains('=') => trimmed.to_owned(),
        _ => {
            return Err(format!(
                "invalid level {level:?}: expected trace, debug, info, warn, error, off, \
                 or a filter such as hubgate=debug"
            ))
        }
    };
    let filter =
        EnvFilter::try_new(&wanted).map_err(|e| format!("invalid level {level:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    *text.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
    tracing::info!(level = %wanted, "log level changed");
    Ok(wanted)
}
