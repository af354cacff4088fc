//! The configuration file (`hubgate::config`): TOML an operator writes, read and validated as
//! `hubgate --config FILE` reads it, with no flags and no environment.
//!
//! Properties: any text is either refused with an error that names a flag or file key, or
//! becomes a configuration; the same file gives the same answer twice.
#![no_main]

use std::sync::OnceLock;

use clap::Parser;
use hubgate::config::{Cli, Config, Options};
use libfuzzer_sys::fuzz_target;

fn file() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("hubgate-fuzz-config-{}.toml", std::process::id()))
    })
}

fn load() -> Result<Config, hubgate::config::ConfigError> {
    let path = file().to_str().expect("a UTF-8 scratch path");
    let cli = Cli::try_parse_from(["hubgate", "--config", path]).expect("one flag parses");
    Config::load(cli, &|_| None)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = toml::from_str::<Options>(text);
    std::fs::write(file(), text).expect("the scratch file is writable");
    match load() {
        Ok(config) => {
            assert!(parsed.is_ok(), "a file toml refuses was accepted");
            let again = load().expect("the same file loads twice");
            assert_eq!(
                format!("{:?}", again.proxy_listen),
                format!("{:?}", config.proxy_listen)
            );
            assert_eq!(again.storage, config.storage);
        }
        Err(e) => {
            assert!(!e.flag.is_empty(), "an error naming nothing: {e}");
            if parsed.is_err() {
                assert_eq!(e.flag, "--config");
            }
        }
    }
});
