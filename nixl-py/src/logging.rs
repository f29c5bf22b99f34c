//! The engine's `tracing` events on stderr, at the level `NIXL_RS_LOG` names (`error`, `warn`
//! (the default), `info`, `debug`, `trace` or `off`).

use tracing_subscriber::filter::LevelFilter;

/// The environment variable that sets the log level.
pub(crate) const LOG_ENV: &str = "NIXL_RS_LOG";

/// Installs the subscriber, unless the process already has one.
pub(crate) fn init() {
    let level = match std::env::var(LOG_ENV).unwrap_or_default().trim() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => LevelFilter::WARN,
    };
    let _already_set = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}
