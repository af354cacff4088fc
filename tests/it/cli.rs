//! The command line: version, both flag forms, and configuration errors (exit code 64).

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
