//! The `hubgate` binary: parse the command line, set up logging, run the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use hubgate::config::{Cli, Config, LogFormat, EXIT_CONFIG};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("hubgate: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(&config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
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

/// `RUST_LOG` wins when set; otherwise `--log-level` applies to everything.
fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log_level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
