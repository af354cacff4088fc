//! The `hubgate` binary: parse the command line, set up logging, run the library.

use std::process::ExitCode;

// The allocator: glibc's. Measured on the per-core layout (issue 14) with the same release
// binary and LD_PRELOAD, small responses, `benches/load/abtest.sh` 4 rounds in turns and
// `benches/load/memory.sh`: jemalloc 1.02x requests/s and 0.95x CPU per request (inside the
// machine's ~5 % noise) but 644 bytes a route against 498 at 100 000 routes; mimalloc 0.99x
// requests/s, 1.01x CPU per request (9 % fewer instructions under callgrind, no faster), 504
// bytes a route. Neither earns a dependency.
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
