//! The command line: version, both flag forms, configuration errors (exit code 64), layering,
//! and the README's flag table and `config/hubgate.toml` checked against the one declaration.

use std::process::Output;

use http::StatusCode;

use crate::support::Hubgate;

/// Exit code for a bad configuration (`EX_USAGE`).
const EX_USAGE: i32 = 64;

async fn run(args: &[&str]) -> Output {
    Hubgate::builder()
        .args(args.iter().copied())
        .run_to_exit()
        .await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Assert exit code 64 and one stderr line that names every flag in `flags`.
fn assert_config_error(out: &Output, flags: &[&str], what: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(EX_USAGE),
        "{what}: expected exit {EX_USAGE}, got {:?}; stderr:\n{err}",
        out.status
    );
    assert!(
        err.lines()
            .any(|line| flags.iter().all(|flag| line.contains(flag))),
        "{what}: no stderr line names {flags:?}; stderr:\n{err}"
    );
}

#[tokio::test]
async fn version_flags_print_the_version() {
    for flag in ["--version", "-V"] {
        let out = run(&[flag]).await;
        assert!(
            out.status.success(),
            "{flag}: {:?}\n{}",
            out.status,
            stderr(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(env!("CARGO_PKG_VERSION")),
            "{flag} printed {stdout:?}, expected version {}",
            env!("CARGO_PKG_VERSION")
        );
    }
}

#[tokio::test]
async fn flags_with_equals_sign_work() {
    let hg = Hubgate::builder()
        .without_listen_args()
        .args([
            "--ip=127.0.0.1",
            "--port=0",
            "--api-ip=127.0.0.1",
            "--api-port=0",
            "--log-level=info",
        ])
        .start()
        .await;
    let resp = hg.get("/_chp_healthz").await;
    assert_eq!(resp.status, StatusCode::OK);
    let resp = hg.api_get("/api/routes").await;
    assert_eq!(resp.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_flag_is_rejected() {
    let out = run(&["--no-such-flag"]).await;
    assert!(!out.status.success(), "an unknown flag was accepted");
    let err = stderr(&out);
    assert!(
        err.contains("--no-such-flag"),
        "the error should name the flag; stderr:\n{err}"
    );
}

#[tokio::test]
async fn error_target_and_error_path_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "--error-target",
        "http://127.0.0.1:9/hub/error",
        "--error-path",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_config_error(
        &out,
        &["--error-target", "--error-path"],
        "both error flags",
    );
}

#[tokio::test]
async fn features_not_built_are_refused_and_bad_tls_files_named() {
    // CHP's Location/Host rewriting flags are not built: refused, never ignored.
    for flag in ["--change-origin", "--auto-rewrite"] {
        let out = run(&[flag]).await;
        assert_config_error(&out, &[flag], flag);
    }
    let out = run(&["--protocol-rewrite", "https"]).await;
    assert_config_error(&out, &["--protocol-rewrite"], "--protocol-rewrite");
    // TLS is built; a key without its certificate, or a missing file, names the flag.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("missing-k.pem");
    let key = key.to_str().unwrap();
    let out = run(&["--ssl-key", key]).await;
    assert_config_error(&out, &["--ssl-key"], "--ssl-key");
    let out = run(&["--ssl-key", key, "--ssl-cert", key]).await;
    assert_config_error(&out, &["--ssl-key"], "--ssl-key missing file");
}

#[tokio::test]
async fn custom_header_without_colon_is_refused() {
    let out = run(&["--custom-header", "nocolon"]).await;
    assert_config_error(&out, &["--custom-header"], "--custom-header nocolon");
}

#[tokio::test]
async fn default_target_that_is_not_a_url_is_refused() {
    let out = run(&["--default-target", "notaurl"]).await;
    assert_config_error(&out, &["--default-target"], "--default-target notaurl");
}

#[tokio::test]
async fn logs_have_no_colour_codes_when_not_a_terminal() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/x", "http://127.0.0.1:9").await;
    let resp = hg.get("/nothing").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let logs = hg.logs();
    assert!(
        !logs.contains('\u{1b}'),
        "stderr contains escape sequences:\n{logs:?}"
    );
}

/// The cells of a Markdown table row; `\|` stays inside its cell.
fn cells(row: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = row.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cells.last_mut().unwrap().push('|');
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The `--flags` and the `(env NAME)`s written in a cell.
fn flags_and_envs(cell: &str) -> (Vec<String>, Vec<String>) {
    let words = cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    let flags = words
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect();
    let envs = cell
        .split("(env `")
        .skip(1)
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect();
    (flags, envs)
}

#[test]
fn readme_flag_table_matches_the_declaration() {
    use clap::CommandFactory;

    // README rows: flag -> (the envs its row names, its default cell).
    let mut rows = std::collections::BTreeMap::new();
    for line in crate::support::readme_section("Flags") {
        if !line.starts_with("| `") {
            continue;
        }
        let cells = cells(&line);
        let (flags, envs) = flags_and_envs(&cells[0]);
        for flag in flags {
            rows.insert(flag, (envs.clone(), cells[1].clone()));
        }
    }
    let command = hubgate::config::Cli::command();
    let declared: Vec<_> = command
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long().map(|long| (format!("--{long}"), a)))
        .collect();
    for (flag, arg) in &declared {
        let (envs, default) = rows
            .get(flag)
            .unwrap_or_else(|| panic!("{flag} is declared but not in README's flag table"));
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            envs.iter().collect::<Vec<_>>(),
            "{flag}: the environment variable in README's row differs from the declaration's"
        );
        if arg.get_action().takes_values() {
            for value in arg.get_default_values() {
                let value = value.to_string_lossy();
                assert!(
                    default.contains(value.as_ref()),
                    "{flag}: README's default {default:?} does not name the declared {value:?}"
                );
            }
        }
    }
    for flag in rows.keys() {
        assert!(
            flag == "--version" || declared.iter().any(|(f, _)| f == flag),
            "README's flag table lists {flag}, which hubgate does not declare (or hides)"
        );
    }
}

#[test]
fn example_config_names_every_file_key() {
    use hubgate::config::{Cli, Config, Options};

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/hubgate.toml");
    // The example as it stands is a configuration.
    let cli = <Cli as clap::Parser>::try_parse_from(["hubgate", "--config", path]).unwrap();
    if let Err(e) = Config::load(cli, &|_| None) {
        panic!("config/hubgate.toml does not load: {e}");
    }
    // Every key, set or commented out, is a file key of the right type...
    let mut named = std::collections::BTreeSet::new();
    for line in crate::support::repo_file("config/hubgate.toml").lines() {
        let setting = line.trim_start_matches('#').trim_start();
        let Some((key, _)) = setting.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        if let Err(e) = toml::from_str::<Options>(setting) {
            panic!("config/hubgate.toml: {setting:?} is not a valid setting: {e}");
        }
        named.insert(key.to_owned());
    }
    // ... and every file key is in the example.
    let missing: Vec<_> = Options::file_keys()
        .into_iter()
        .filter(|k| !named.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "config/hubgate.toml does not show {missing:?}"
    );
}

#[tokio::test]
async fn workers_take_flag_over_env_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hubgate.toml");
    std::fs::write(&file, "workers = 5000\n").unwrap();
    let file = file.to_str().unwrap();

    let out = Hubgate::builder()
        .env("HUBGATE_WORKERS", "0")
        .run_to_exit()
        .await;
    assert_config_error(&out, &["--workers"], "HUBGATE_WORKERS=0");
    let out = run(&["--config", file]).await;
    assert_config_error(&out, &["--workers"], "workers = 5000 in the file");
    // The environment wins over the file, the flag over both.
    let out = Hubgate::builder()
        .args(["--config", file])
        .env("HUBGATE_WORKERS", "2000")
        .run_to_exit()
        .await;
    assert_config_error(&out, &["--workers", "2000"], "HUBGATE_WORKERS=2000");
    let hg = Hubgate::builder()
        .args(["--config", file, "--workers", "2"])
        .env("HUBGATE_WORKERS", "0")
        .start()
        .await;
    assert_eq!(hg.get("/_chp_healthz").await.status, StatusCode::OK);
}
