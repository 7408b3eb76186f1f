//! The `token` commands against a running gateway: the guide's walk-through (bootstrap
//! token → persistent token → the bootstrap token no longer needed), human and JSON
//! output, exit codes, and credential and URL resolution from flags, environment and
//! cli.toml profiles in both forms.

mod common;

use std::process::Output;
use std::sync::Arc;

use common::*;
use orcheo_gateway::app::Gateway;
use orcheo_gateway::store::MemoryStore;
use serde_json::Value;

async fn gateway_with_bootstrap() -> (Gateway, Upstream) {
    let up = echo_upstream().await;
    let text = yaml(
        &up.url(),
        "routes: [{name: all, path: '/**'}]\nauth:\n  bootstrap: {token: cli-boot}\n",
    );
    let config = orcheo_gateway::config::load(&text, &Default::default()).unwrap();
    let gateway = Gateway::start_with_store(
        config,
        None,
        Default::default(),
        Arc::new(MemoryStore::new()),
    )
    .await
    .unwrap();
    (gateway, up)
}

async fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_orcheo-gateway"));
    command.arg("token").args(args);
    for name in [
        "ORCHEO_API_URL",
        "ORCHEO_SERVICE_TOKEN",
        "ORCHEO_PROFILE",
        "ORCHEO_CONFIG_DIR",
    ] {
        command.env_remove(name);
    }
    command.env("HOME", temp_dir("cli-home"));
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_walk_through_and_every_command() {
    let (gw, _up) = gateway_with_bootstrap().await;
    let url = format!("http://{}", gw.addresses.http[0]);
    let boot = [
        ("ORCHEO_API_URL", url.as_str()),
        ("ORCHEO_SERVICE_TOKEN", "cli-boot"),
    ];

    // 1. With the bootstrap token, create a persistent token.
    let output = cli(
        &[
            "create",
            "--id",
            "my-ci-token",
            "--scope",
            "workflows:read",
            "-s",
            "admin:tokens:read",
            "-s",
            "admin:tokens:write",
            "--workspace",
            "ws-analytics",
            "--expires-in",
            "3600",
        ],
        &boot,
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = stdout(&output);
    assert!(
        text.starts_with("Service token created successfully!\n\nID: my-ci-token\nSecret: "),
        "{text}"
    );
    assert!(
        text.contains("⚠ Store this secret securely. It will not be shown again."),
        "{text}"
    );
    assert!(text.contains("Scopes: admin:tokens:read, admin:tokens:write, workflows:read\nWorkspaces: ws-analytics\nExpires: "), "{text}");
    assert!(text.contains(" UTC\n"), "{text}");
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("Secret: "))
        .unwrap()
        .to_string();
    assert_eq!(secret.len(), 43);

    // 2. From now on the persistent token does the work, with flags after the subcommand.
    let own = [("ORCHEO_API_URL", url.as_str())];
    let output = cli(&["list", "--service-token", &secret], &own).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list = stdout(&output);
    assert!(list.starts_with("ID"), "{list}");
    assert!(
        list.contains("my-ci-token") && list.contains("active") && list.contains("1 token(s)"),
        "{list}"
    );
    let output = cli(
        &["--json", "show", "my-ci-token", "--service-token", &secret],
        &own,
    )
    .await;
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["identifier"], "my-ci-token");
    assert_eq!(shown["status"], "active");

    // Rotate, audit, revoke.
    let output = cli(&["rotate", "my-ci-token", "--overlap", "120"], &boot).await;
    let text = stdout(&output);
    assert!(
        text.starts_with("Service token rotated successfully!\n"),
        "{text}"
    );
    assert!(
        text.contains("Old token 'my-ci-token' valid until "),
        "{text}"
    );
    let output = cli(&["audit", "my-ci-token", "--json"], &boot).await;
    let trail: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(trail["events"][0]["action"], "rotated");
    let output = cli(
        &["revoke", "my-ci-token", "--reason", "rotated away"],
        &boot,
    )
    .await;
    assert!(output.status.success());
    assert_eq!(stdout(&output), "Service token 'my-ci-token' revoked.\n");
    let output = cli(&["list", "--status", "revoked"], &boot).await;
    assert!(stdout(&output).contains("my-ci-token"));

    // Exit codes: 1 when the server refuses (its code and message shown), 2 for usage or
    // connection errors.
    let output = cli(&["show", "missing"], &boot).await;
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("token.not_found") && error.contains("Service token 'missing' not found"),
        "{error}"
    );
    let output = cli(&["list"], &[("ORCHEO_API_URL", url.as_str())]).await;
    assert_eq!(output.status.code(), Some(1), "no credential: refused");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = cli(
        &["list", "--api-url", &format!("http://{closed}")],
        &[("ORCHEO_SERVICE_TOKEN", "x")],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    let output = cli(&["revoke", "x"], &boot).await;
    assert_eq!(output.status.code(), Some(2), "--reason is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_in_both_forms_and_the_order_of_sources() {
    let (gw, _up) = gateway_with_bootstrap().await;
    let url = format!("http://{}", gw.addresses.http[0]);
    let dir = temp_dir("cli-profiles");
    std::fs::write(
        dir.join("cli.toml"),
        format!(
            "[profiles.default]\napi_url = \"{url}/\"\nservice_token = \"cli-boot\"\n\n[staging]\napi_url = \"{url}\"\nservice_token = \"cli-boot\"\n\n[profiles.wrong]\napi_url = \"{url}\"\nservice_token = \"not-valid\"\n"
        ),
    )
    .unwrap();
    let config_dir = dir.to_str().unwrap();
    let base = [("ORCHEO_CONFIG_DIR", config_dir)];
    assert!(
        cli(&["list"], &base).await.status.success(),
        "the default profile, [profiles.default]"
    );
    assert!(
        cli(&["list", "--profile", "staging"], &base)
            .await
            .status
            .success(),
        "a bare [staging] table"
    );
    let env_profile = [
        ("ORCHEO_CONFIG_DIR", config_dir),
        ("ORCHEO_PROFILE", "wrong"),
    ];
    assert_eq!(
        cli(&["list"], &env_profile).await.status.code(),
        Some(1),
        "ORCHEO_PROFILE picks the profile"
    );
    assert!(
        cli(&["list", "--profile", "staging"], &env_profile)
            .await
            .status
            .success(),
        "the flag wins over the environment"
    );
    let env_token = [
        ("ORCHEO_CONFIG_DIR", config_dir),
        ("ORCHEO_PROFILE", "wrong"),
        ("ORCHEO_SERVICE_TOKEN", "cli-boot"),
    ];
    assert!(
        cli(&["list"], &env_token).await.status.success(),
        "ORCHEO_SERVICE_TOKEN wins over the profile"
    );
}
