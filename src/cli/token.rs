//! `token …`: a client of the admin API. It finds the gateway and its credential as
//! Orcheo's CLI does: flags, then `ORCHEO_API_URL` / `ORCHEO_SERVICE_TOKEN` /
//! `ORCHEO_PROFILE`, then the profile in `$ORCHEO_CONFIG_DIR/cli.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::config::Env;

/// Where the gateway is when nothing says otherwise: its default listener.
const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";
/// Time allowed for one call to the admin API.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Flags shared by every token command (accepted before or after the subcommand).
#[derive(Debug, Args)]
pub struct Connection {
    /// The gateway's base URL. Default: $ORCHEO_API_URL, the profile's api_url, http://127.0.0.1:8080.
    #[arg(long, global = true, value_name = "URL")]
    pub api_url: Option<String>,
    /// The credential. Default: $ORCHEO_SERVICE_TOKEN, the profile's service_token.
    // A secret is base64url and may begin with `-`: it is still the value, not a flag.
    #[arg(long, global = true, value_name = "TOKEN", allow_hyphen_values = true)]
    pub service_token: Option<String>,
    /// Profile in cli.toml. Default: $ORCHEO_PROFILE, else `default`.
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a service token and print its secret (shown once).
    Create {
        /// Its id (default: the first 8 hex characters of the secret's hash).
        #[arg(long = "id")]
        id: Option<String>,
        /// A human-readable label.
        #[arg(long)]
        name: Option<String>,
        /// A scope it grants (repeatable).
        #[arg(long = "scope", short = 's')]
        scopes: Vec<String>,
        /// A workspace it may access (repeatable; `*` for all).
        #[arg(long = "workspace", short = 'w')]
        workspaces: Vec<String>,
        /// Lifetime in seconds (at least 60); default: never expires.
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// List tokens with their status.
    List {
        /// Only tokens in this state: active, expired, revoked or rotating.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show every field of one token.
    Show {
        /// The token's id.
        id: String,
    },
    /// Replace a token's secret; the old one stays valid for the overlap.
    Rotate {
        /// The token's id.
        id: String,
        /// Seconds the old secret stays valid (0 ends it now).
        #[arg(long, default_value_t = 300)]
        overlap: i64,
        /// Lifetime of the new token in seconds (at least 60).
        #[arg(long)]
        expires_in: Option<i64>,
        /// New scopes (repeatable; default: the old token's).
        #[arg(long = "scope", short = 's')]
        scopes: Vec<String>,
        /// New workspaces (repeatable; default: the old token's).
        #[arg(long = "workspace", short = 'w')]
        workspaces: Vec<String>,
    },
    /// Revoke a token at once.
    Revoke {
        /// The token's id.
        id: String,
        /// Why (recorded in the audit trail).
        #[arg(long, short = 'r')]
        reason: String,
    },
    /// Show a token's audit trail, newest first.
    Audit {
        /// The token's id.
        id: String,
    },
}

/// A failed command: exit 1 (the server refused) or 2 (usage or connection).
struct Failure(u8, String);

/// Runs a token command.
pub fn run(command: TokenCommand, connection: Connection, env: &Env) -> ExitCode {
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(execute(command, &connection, env)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(Failure(code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

/// The gateway URL and credential, resolved.
struct Target {
    api_url: String,
    token: Option<String>,
}

fn config_file(env: &Env) -> PathBuf {
    match env.get("ORCHEO_CONFIG_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("cli.toml"),
        None => PathBuf::from(env.get("HOME").cloned().unwrap_or_default())
            .join(".config/orcheo/cli.toml"),
    }
}

/// The profile's table: `[profiles.NAME]`, or a bare `[NAME]` as the guide shows it.
fn profile(env: &Env, name: &str) -> Result<toml::Table, Failure> {
    let path = config_file(env);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(toml::Table::new());
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| Failure(2, format!("{}: not valid TOML: {e}", path.display())))?;
    let nested = table
        .get("profiles")
        .and_then(|p| p.get(name))
        .and_then(|p| p.as_table());
    let bare = table.get(name).and_then(|p| p.as_table());
    Ok(nested.or(bare).cloned().unwrap_or_default())
}

fn resolve(connection: &Connection, env: &Env) -> Result<Target, Failure> {
    let from_env = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
    let name = connection
        .profile
        .clone()
        .or_else(|| from_env("ORCHEO_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let profile = profile(env, &name)?;
    let field = |key: &str| {
        profile
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let api_url = connection
        .api_url
        .clone()
        .or_else(|| from_env("ORCHEO_API_URL"))
        .or_else(|| field("api_url"))
        .unwrap_or_else(|| DEFAULT_API_URL.into());
    let token = connection
        .service_token
        .clone()
        .or_else(|| from_env("ORCHEO_SERVICE_TOKEN"))
        .or_else(|| field("service_token"));
    Ok(Target {
        api_url: api_url.trim_end_matches('/').to_string(),
        token,
    })
}

/// One call to the admin API: the status and the JSON body.
async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), Failure> {
    let url = format!("{}/api/admin/service-tokens{path}", target.api_url);
    let uri: Uri = url
        .parse()
        .map_err(|_| Failure(2, format!("`{url}` is not a valid URL")))?;
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("accept", "application/json");
    if let Some(token) = &target.token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let bytes = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let request = request
        .body(Full::new(bytes))
        .map_err(|e| Failure(2, e.to_string()))?;
    let roots = crate::tls_client::Roots::load(target.api_url.starts_with("https://"));
    let tls = crate::tls_client::config(&roots, None).map_err(|e| Failure(2, e))?;
    let connector = crate::tls_client::connector(tls, Some(CALL_TIMEOUT));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| Failure(2, format!("cannot reach {}: {e}", target.api_url)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure(2, e.to_string()))?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure(2, format!("{} did not answer in time", target.api_url)))?
}

/// A refusal: its code and message, as the server gave them.
fn refused(status: StatusCode, body: &Value) -> Failure {
    let field = |name: &str| {
        body.get(name)
            .or_else(|| body.get("detail").and_then(|d| d.get(name)))
            .and_then(Value::as_str)
    };
    let code = field("code").unwrap_or("error");
    let message = field("message").unwrap_or(status.canonical_reason().unwrap_or("refused"));
    Failure(
        1,
        format!("error: {code}: {message} (HTTP {})", status.as_u16()),
    )
}

async fn checked(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
    ok: StatusCode,
) -> Result<Value, Failure> {
    let (status, value) = call(target, method, path, body).await?;
    if status == ok {
        Ok(value)
    } else {
        Err(refused(status, &value))
    }
}

fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The API path of token `id`, with an optional suffix such as `/rotate`.
fn token_path(id: &str, suffix: &str) -> String {
    format!("/{}{suffix}", segment(id))
}

/// The API's JSON with `--json`, else the human form.
fn render(json_out: bool, value: &Value, human: impl FnOnce(&Value) -> String) -> String {
    if json_out {
        pretty(value)
    } else {
        human(value)
    }
}

async fn execute(
    command: TokenCommand,
    connection: &Connection,
    env: &Env,
) -> Result<String, Failure> {
    let target = resolve(connection, env)?;
    let json_out = connection.json;
    match command {
        TokenCommand::Create {
            id,
            name,
            scopes,
            workspaces,
            expires_in,
        } => {
            let mut body = json!({});
            set(&mut body, "identifier", id.map(Value::from));
            set(&mut body, "name", name.map(Value::from));
            set(
                &mut body,
                "scopes",
                (!scopes.is_empty()).then(|| json!(scopes)),
            );
            set(
                &mut body,
                "workspace_ids",
                (!workspaces.is_empty()).then(|| json!(workspaces)),
            );
            set(&mut body, "expires_in_seconds", expires_in.map(Value::from));
            let token = checked(&target, Method::POST, "", Some(body), StatusCode::CREATED).await?;
            Ok(render(json_out, &token, |t| {
                secret_block("Service token created successfully!", t, None)
            }))
        }
        TokenCommand::Rotate {
            id,
            overlap,
            expires_in,
            scopes,
            workspaces,
        } => {
            let mut body = json!({"overlap_seconds": overlap});
            set(&mut body, "expires_in_seconds", expires_in.map(Value::from));
            set(
                &mut body,
                "scopes",
                (!scopes.is_empty()).then(|| json!(scopes)),
            );
            set(
                &mut body,
                "workspace_ids",
                (!workspaces.is_empty()).then(|| json!(workspaces)),
            );
            let rotate = token_path(&id, "/rotate");
            let token = checked(&target, Method::POST, &rotate, Some(body), StatusCode::OK).await?;
            if json_out {
                return Ok(pretty(&token));
            }
            let old = checked(
                &target,
                Method::GET,
                &token_path(&id, ""),
                None,
                StatusCode::OK,
            )
            .await?;
            let until = format!(
                "Old token '{id}' valid until {}",
                human_time(&old["expires_at"])
            );
            Ok(secret_block(
                "Service token rotated successfully!",
                &token,
                Some(until),
            ))
        }
        TokenCommand::List { status } => {
            let path = status
                .map(|s| format!("?status={}", segment(&s)))
                .unwrap_or_default();
            let list = checked(&target, Method::GET, &path, None, StatusCode::OK).await?;
            Ok(render(json_out, &list, table))
        }
        TokenCommand::Show { id } => {
            let token = checked(
                &target,
                Method::GET,
                &token_path(&id, ""),
                None,
                StatusCode::OK,
            )
            .await?;
            Ok(render(json_out, &token, fields))
        }
        TokenCommand::Revoke { id, reason } => {
            let body = Some(json!({"reason": reason}));
            checked(
                &target,
                Method::DELETE,
                &token_path(&id, ""),
                body,
                StatusCode::NO_CONTENT,
            )
            .await?;
            let done = json!({"identifier": id, "status": "revoked"});
            Ok(render(json_out, &done, |_| {
                format!("Service token '{id}' revoked.\n")
            }))
        }
        TokenCommand::Audit { id } => {
            let trail = checked(
                &target,
                Method::GET,
                &token_path(&id, "/audit"),
                None,
                StatusCode::OK,
            )
            .await?;
            Ok(render(json_out, &trail, audit))
        }
    }
}

fn set(body: &mut Value, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        body[key] = value;
    }
}

fn pretty(value: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// `2025-12-03T15:30:00Z` → `2025-12-03 15:30:00 UTC`; null → `never`.
fn human_time(value: &Value) -> String {
    match value.as_str() {
        Some(at) => format!("{} UTC", at.trim_end_matches('Z').replace('T', " ")),
        None => "never".into(),
    }
}

fn secret_block(heading: &str, token: &Value, extra: Option<String>) -> String {
    let mut out = format!(
        "{heading}\n\nID: {}\nSecret: {}\n\n⚠ Store this secret securely. It will not be shown again.\n\nScopes: {}\nWorkspaces: {}\nExpires: {}\n",
        text(&token["identifier"]),
        text(&token["secret"]),
        text(&token["scopes"]),
        text(&token["workspace_ids"]),
        human_time(&token["expires_at"]),
    );
    if let Some(extra) = extra {
        out.push_str(&extra);
        out.push('\n');
    }
    out
}

fn table(list: &Value) -> String {
    let rows: Vec<[String; 7]> = list["tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| {
            [
                text(&t["identifier"]),
                text(&t["scopes"]),
                text(&t["workspace_ids"]),
                text(&t["issued_at"]),
                text(&t["expires_at"]),
                text(&t["last_used_at"]),
                text(&t["status"]),
            ]
        })
        .collect();
    let header = [
        "ID",
        "SCOPES",
        "WORKSPACES",
        "ISSUED",
        "EXPIRES",
        "LAST USED",
        "STATUS",
    ]
    .map(String::from);
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &[String; 7]| {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(row));
    }
    out.push_str(&format!("{} token(s)\n", text(&list["total"])));
    out
}

fn fields(token: &Value) -> String {
    let order = [
        "identifier",
        "name",
        "status",
        "scopes",
        "workspace_ids",
        "secret_preview",
        "issued_at",
        "expires_at",
        "last_used_at",
        "use_count",
        "revoked_at",
        "revocation_reason",
        "rotated_to",
        "rotated_from",
    ];
    order
        .iter()
        .map(|key| format!("{key}: {}\n", text(&token[*key])))
        .collect()
}

fn audit(trail: &Value) -> String {
    let events = trail["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if events.is_empty() {
        return "No audit events.\n".into();
    }
    events
        .iter()
        .map(|e| {
            format!(
                "{}  {:<8} actor={} ip={} user_agent={} details={}\n",
                text(&e["timestamp"]),
                text(&e["action"]),
                text(&e["actor"]),
                text(&e["ip_address"]),
                text(&e["user_agent"]),
                text(&e["details"]),
            )
        })
        .collect()
}
