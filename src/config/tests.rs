use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn errors(yaml: &str, vars: &[(&str, &str)]) -> ConfigErrors {
    load(yaml, &env(vars)).expect_err("the configuration should be refused")
}

#[test]
fn empty_input_is_the_documented_defaults() {
    let config = load("", &Env::new()).unwrap();
    assert_eq!(config.listen.http, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(config.admin.listen, Some("127.0.0.1:8081".parse().unwrap()));
    assert_eq!(config.upstreams.0["default"].url, "http://127.0.0.1:8000");
    assert_eq!(
        config.upstreams.0["default"].connect_timeout.get(),
        Duration::from_secs(5)
    );
    assert_eq!(
        config.upstreams.0["default"].timeout.get(),
        Duration::from_secs(60)
    );
    let limits = &config.limits;
    assert_eq!(limits.max_connections, 10_000);
    assert_eq!(limits.header_read_timeout.get(), Duration::from_secs(10));
    assert_eq!(limits.max_header_bytes.0, 32 * 1024);
    assert_eq!(limits.idle_timeout.get(), Duration::from_secs(60));
    assert_eq!(limits.shutdown_grace.get(), Duration::from_secs(30));
    assert_eq!(limits.max_tracked_clients, 100_000);
    assert_eq!(limits.websocket_max_message.0, 16 << 20);
    assert_eq!(
        limits.websocket_idle_timeout.get(),
        Duration::from_secs(600)
    );
    assert_eq!(limits.workers, 0, "one worker per CPU");
    assert_eq!(config.auth.mode, None);
    assert_eq!(config.auth.jwt.allowed_algorithms.0, vec!["RS256", "HS256"]);
    assert_eq!(config.auth.jwt.required_claims.0, vec!["exp"]);
    assert_eq!(config.auth.bootstrap.scopes.0.len(), 7);
    assert_eq!(config.auth.service_tokens.backend, TokenBackend::Sqlite);
    assert!(config.identity.forward_credentials);
    assert_eq!(config.forward_auth.path, "/_orcheo/auth");
    assert_eq!(config.log.format, LogFormat::Json);
    assert!(config.routes.is_empty());
}

#[test]
fn every_key_of_the_contract_is_accepted() {
    let yaml = r#"
listen: {http: ["127.0.0.1:0"], https: [], proxy_protocol: false}
tls: {cert_file: null, key_file: null}
admin: {listen: "127.0.0.1:0"}
trusted_proxies: ["10.0.0.0/8", "192.0.2.1"]
limits:
  max_connections: 100
  header_read_timeout: 2s
  max_header_bytes: 16KiB
  idle_timeout: 30
  shutdown_grace: 500ms
  max_tracked_clients: 10
  websocket_max_message: 1MiB
  websocket_idle_timeout: 5m
upstreams:
  default: {url: "http://127.0.0.1:8000/prefix", connect_timeout: 1s, timeout: 2.5}
auth:
  mode: required
  jwt:
    secret: s3cret
    jwks_url: https://idp.example/.well-known/jwks.json
    jwks: {keys: [{kty: oct, k: AAAA}]}
    jwks_cache_ttl: 60
    jwks_timeout: 2
    allowed_algorithms: [RS256, ES256, EdDSA]
    audience: [orcheo]
    issuer: https://idp.example
    leeway: 30s
    required_claims: [exp, sub]
  bootstrap: {token: boot, scopes: "workflows:read", expires_at: "2030-01-01T00:00:00Z"}
  service_tokens: {backend: inmemory, sqlite_path: /tmp/x.sqlite, postgres_dsn: "postgres://u:p@h/db"}
  rate_limit: {ip: 10, identity: 5, interval: 60, redis_url: "redis://127.0.0.1:6379"}
identity:
  headers: {subject: X-Sub, identity_type: X-Type, token_id: X-Tid, scopes: X-Scopes, workspaces: X-Ws, auth_method: X-Method}
  forward_credentials: false
  assertion: {enabled: true, header: X-Assert, ttl: 30s, issuer: gw}
forward_auth: {enabled: true, path: /_auth}
routes:
  - name: ws-read
    path: /api/workspaces/{workspace_id}/workflows/**
    methods: [GET, HEAD]
    scopes: [workflows:read]
    workspace: {path_param: workspace_id}
    upstream: default
    public: false
    websocket: false
    rate_limit: {per: ip, requests: 100, window: 1s}
    strip_prefix: /api
    timeout: 60s
log: {level: debug, format: text, sensitive_debug: true}
"#;
    let config = load(yaml, &Env::new()).unwrap();
    assert_eq!(config.auth.service_tokens.backend, TokenBackend::Memory);
    assert_eq!(
        config.auth.bootstrap.expires_at,
        Some(crate::time::Timestamp(1_893_456_000))
    );
    assert_eq!(
        config.routes[0].rate_limit.as_ref().unwrap().per,
        RateLimitPer::Ip
    );
    assert_eq!(
        config.limits.shutdown_grace.get(),
        Duration::from_millis(500)
    );
    assert_eq!(
        config.upstreams.0["default"].timeout.get(),
        Duration::from_millis(2500)
    );
}

#[test]
fn all_problems_are_reported_at_once_each_named_by_its_key() {
    let yaml = r#"
listen: {http: ["not-an-address"], htps: []}
limits: {max_connections: -1, header_read_timeout: soon, max_header_bytes: 10}
upstreams:
  default: {url: "ftp://x", timeout: 0}
  other: {url: "http://127.0.0.1:1", colour: blue}
auth:
  mode: sometimes
  jwt: {allowed_algorithms: [none, XS999]}
  service_tokens: {backend: postgres}
  rate_limit: {redis_url: "http://x"}
identity:
  assertion: {ttl: 5m}
  headers: {subject: "bad header"}
forward_auth: {path: relative}
log: {format: xml}
unknown_section: 1
routes:
  - {name: a, path: /x, upstream: nowhere, methods: [get]}
  - {name: a, path: "api/y", workspace: {path_param: ws, header: X-W}}
  - {name: c, path: "/z/{id}", workspace: {path_param: other}, rate_limit: {per: ip, requests: 0, window: 1s}, strip_prefix: z}
  - {name: d}
  - "just text"
"#;
    let errors = errors(yaml, &[]);
    let expected = [
        "listen.http[0]",
        "listen.htps",
        "limits.max_connections",
        "limits.header_read_timeout",
        "limits.max_header_bytes",
        "upstreams.default.url",
        "upstreams.default.timeout",
        "upstreams.other.colour",
        "auth.mode",
        "auth.jwt.allowed_algorithms",
        "auth.service_tokens.postgres_dsn",
        "auth.rate_limit.redis_url",
        "identity.assertion.ttl",
        "identity.headers.subject",
        "forward_auth.path",
        "log.format",
        "unknown_section",
        "routes[0].upstream",
        "routes[0].methods",
        "routes[1].name",
        "routes[1].path",
        "routes[1].workspace",
        "routes[2].workspace.path_param",
        "routes[2].rate_limit.requests",
        "routes[2].strip_prefix",
        "routes[3]",
        "routes[4]",
    ];
    for key in expected {
        assert!(errors.names(key), "no error names `{key}`; got:\n{errors}");
    }
    let text = errors.to_string();
    assert!(text.starts_with("invalid configuration ("), "{text}");
    assert!(text.contains("`none` is never allowed"), "{text}");
    assert!(text.contains("unknown algorithm `XS999`"), "{text}");
}

#[test]
fn yaml_syntax_errors_and_wrong_top_level_are_reported() {
    assert!(errors("listen: [", &[]).names("gateway.yaml"));
    assert!(errors("- a\n- b\n", &[]).names("gateway.yaml"));
    assert!(errors("routes: {a: 1}", &[]).names("routes"));
}

#[test]
fn environment_overrides_the_yaml() {
    let yaml = "auth:\n  jwt:\n    secret: from-yaml\n    audience: [a, b]\nlog: {level: info}\n";
    let config = load(
        yaml,
        &env(&[
            ("ORCHEO_GATEWAY_LISTEN", "127.0.0.1:9000, 127.0.0.1:9001"),
            ("ORCHEO_GATEWAY_UPSTREAM", "http://10.0.0.5:8000"),
            ("ORCHEO_GATEWAY_TRUSTED_PROXIES", r#"["10.0.0.0/8"]"#),
            ("ORCHEO_GATEWAY_ADMIN_LISTEN", "off"),
            ("ORCHEO_AUTH_JWT_SECRET", "from-env"),
            ("ORCHEO_AUTH_AUDIENCE", "c"),
            (
                "ORCHEO_AUTH_JWKS_STATIC",
                r#"{"keys":[{"kty":"oct","k":"AA","kid":"static"}]}"#,
            ),
            (
                "ORCHEO_AUTH_JWKS",
                r#"[{"kty":"oct","k":"AA","kid":"wins"}]"#,
            ),
            ("ORCHEO_AUTH_BOOTSTRAP_TOKEN_EXPIRES_AT", "1893456000"),
            ("ORCHEO_AUTH_SERVICE_TOKEN_BACKEND", "inmemory"),
            ("ORCHEO_AUTH_RATE_LIMIT_IP", "5"),
            ("ORCHEO_AUTH_RATE_LIMIT_INTERVAL", "30s"),
            ("ORCHEO_AUTH_MODE", ""),
            ("ORCHEO_LOG_LEVEL", "warn"),
            ("ORCHEO_LOG_SENSITIVE_DEBUG", "true"),
        ]),
    )
    .unwrap();
    assert_eq!(config.listen.http.len(), 2);
    assert_eq!(config.upstreams.0["default"].url, "http://10.0.0.5:8000");
    assert_eq!(config.trusted_proxies.len(), 1);
    assert_eq!(config.admin.listen, None);
    assert_eq!(
        config.auth.jwt.secret.as_ref().unwrap().expose(),
        "from-env"
    );
    assert_eq!(
        config.auth.jwt.audience.0,
        vec!["c"],
        "lists are replaced, not merged"
    );
    let jwks = serde_json::to_string(&config.auth.jwt.jwks).unwrap();
    assert!(jwks.contains("wins"), "ORCHEO_AUTH_JWKS wins: {jwks}");
    assert_eq!(config.auth.bootstrap.expires_at.unwrap().0, 1_893_456_000);
    assert_eq!(config.auth.service_tokens.backend, TokenBackend::Memory);
    assert_eq!(config.auth.rate_limit.ip, 5);
    assert_eq!(
        config.auth.rate_limit.interval.get(),
        Duration::from_secs(30)
    );
    assert_eq!(config.auth.mode, None, "an empty variable counts as unset");
    assert_eq!(config.log.level, LogLevel::Warn);
    assert!(config.log.sensitive_debug);
}

#[test]
fn bad_environment_values_are_named_by_variable() {
    let errors = errors(
        "",
        &[
            ("ORCHEO_GATEWAY_LISTEN", "localhost"),
            ("ORCHEO_AUTH_MODE", "strict"),
            ("ORCHEO_AUTH_RATE_LIMIT_IP", "1e3"),
            ("ORCHEO_AUTH_JWT_LEEWAY", "a while"),
            ("ORCHEO_AUTH_BOOTSTRAP_TOKEN_EXPIRES_AT", "next week"),
            ("ORCHEO_LOG_SENSITIVE_DEBUG", "maybe"),
            ("ORCHEO_AUTH_SERVICE_TOKEN_BACKEND", "mysql"),
            ("ORCHEO_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/99"),
            ("ORCHEO_AUTH_JWKS", "{not json"),
            ("ORCHEO_LOG_FORMAT", "xml"),
        ],
    );
    for key in [
        "ORCHEO_GATEWAY_LISTEN",
        "ORCHEO_AUTH_MODE",
        "ORCHEO_AUTH_RATE_LIMIT_IP",
        "ORCHEO_AUTH_JWT_LEEWAY",
        "ORCHEO_AUTH_BOOTSTRAP_TOKEN_EXPIRES_AT",
        "ORCHEO_LOG_SENSITIVE_DEBUG",
        "ORCHEO_AUTH_SERVICE_TOKEN_BACKEND",
        "ORCHEO_GATEWAY_TRUSTED_PROXIES",
        "ORCHEO_AUTH_JWKS",
        "ORCHEO_LOG_FORMAT",
    ] {
        assert!(errors.names(key), "no error names {key}:\n{errors}");
    }
}

#[test]
fn values_a_variable_set_are_checked_under_its_name() {
    let errors = errors(
        "auth: {jwt: {allowed_algorithms: [RS256]}}\nroutes: []\n",
        &[
            ("ORCHEO_AUTH_ALLOWED_ALGORITHMS", "HS256,XS999"),
            ("ORCHEO_GATEWAY_UPSTREAM", "ftp://nowhere"),
            ("ORCHEO_AUTH_RATE_LIMIT_INTERVAL", "0"),
        ],
    );
    for key in [
        "ORCHEO_AUTH_ALLOWED_ALGORITHMS",
        "ORCHEO_GATEWAY_UPSTREAM",
        "ORCHEO_AUTH_RATE_LIMIT_INTERVAL",
    ] {
        assert!(errors.names(key), "no error names {key}:\n{errors}");
    }
    assert!(!errors.names("auth.jwt.allowed_algorithms"), "{errors}");
    assert!(errors.to_string().contains("XS999"), "{errors}");
    // The same value in the YAML is reported under its YAML key.
    let errors = errors_of("auth: {jwt: {allowed_algorithms: [HS256, XS999]}}\n");
    assert!(errors.names("auth.jwt.allowed_algorithms"), "{errors}");
}

#[test]
fn https_needs_readable_certificate_files() {
    let errors = errors("listen: {https: ['127.0.0.1:0']}", &[]);
    assert!(
        errors.names("tls.cert_file") && errors.names("tls.key_file"),
        "{errors}"
    );
    let errors = errors_of("listen: {https: ['127.0.0.1:0']}\ntls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}");
    assert!(
        errors
            .to_string()
            .contains("/nonexistent/c.pem is not a readable file"),
        "{errors}"
    );
}

fn errors_of(yaml: &str) -> ConfigErrors {
    errors(yaml, &[])
}

#[test]
fn the_effective_configuration_prints_without_secrets() {
    let config = load(
        "auth: {jwt: {secret: jwt-secret-value}, bootstrap: {token: boot-secret-value}, service_tokens: {postgres_dsn: 'postgres://u:pg-pass@db/x'}, rate_limit: {redis_url: 'redis://:redis-pass@r:6379'}}",
        &Env::new(),
    )
    .unwrap();
    let printed = serde_yaml::to_string(&config).unwrap();
    for secret in [
        "jwt-secret-value",
        "boot-secret-value",
        "pg-pass",
        "redis-pass",
    ] {
        assert!(!printed.contains(secret), "{secret} leaked:\n{printed}");
    }
    assert!(
        printed.contains("postgres://u:<redacted>@db/x"),
        "{printed}"
    );
    // The printed form is itself a valid configuration.
    assert!(load(&printed.replace("<redacted>", "x"), &Env::new()).is_ok());
}

#[test]
fn the_grpc_listener_is_validated() {
    let found = errors_of("forward_auth: {grpc_listen: '127.0.0.1:9191', grpc_tls: true}\n");
    assert!(found.names("forward_auth.grpc_tls"), "{found}");
    let found = errors_of("forward_auth: {grpc_listen: 'not an address'}\n");
    assert!(found.names("forward_auth.grpc_listen"), "{found}");
    let found = errors_of(
        "listen: {http: ['127.0.0.1:9191']}\nforward_auth: {grpc_listen: '127.0.0.1:9191'}\n",
    );
    assert!(found.names("forward_auth.grpc_listen"), "{found}");
    let from_env = errors("", &[("ORCHEO_GATEWAY_EXTAUTHZ_LISTEN", "nowhere")]);
    assert!(
        from_env.names("ORCHEO_GATEWAY_EXTAUTHZ_LISTEN"),
        "{from_env}"
    );
    let config = load(
        "",
        &env(&[("ORCHEO_GATEWAY_EXTAUTHZ_LISTEN", "0.0.0.0:9191")]),
    )
    .unwrap();
    assert_eq!(
        config.forward_auth.grpc_listen,
        Some("0.0.0.0:9191".parse().unwrap())
    );
    let config = load(
        "forward_auth: {grpc_listen: '127.0.0.1:9191'}\n",
        &env(&[("ORCHEO_GATEWAY_EXTAUTHZ_LISTEN", "off")]),
    )
    .unwrap();
    assert_eq!(config.forward_auth.grpc_listen, None);
}

#[test]
fn workers_are_bounded() {
    assert_eq!(
        load("limits: {workers: 3}", &Env::new())
            .unwrap()
            .limits
            .workers,
        3
    );
    let refused = errors_of("limits: {workers: 1000}").to_string();
    assert!(refused.contains("limits.workers"), "{refused}");
    let refused = errors_of("limits: {workers: -1}").to_string();
    assert!(refused.contains("limits.workers"), "{refused}");
}
