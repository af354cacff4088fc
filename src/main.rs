//! The `hubgate` binary: parse the command line, set up logging, run the library.

use std::process::ExitCode;

use clap::Parser;
use hubgate::config::{Cli, Config, EXIT_CONFIG};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("hubgate: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    hubgate::logging::init(&config.log_level, config.log_format);

    // The control plane (API, store, hub, background tasks) runs here; the data plane's
    // workers each get a runtime of their own (see `hubgate::workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hubgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hubgate::run(config)) {
        Ok(hubgate::Exit::Drained) => ExitCode::SUCCESS,
        Ok(hubgate::Exit::Cut) => ExitCode::from(1),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hubgate: {e:#}");
            ExitCode::from(2)
        }
    }
}
