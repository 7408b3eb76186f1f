//! Environment overrides (contract §2). Each variable replaces the YAML value it maps to;
//! lists are replaced, not merged. An empty variable counts as unset. A bad value is an
//! error named by the variable.

use std::path::PathBuf;
use std::str::FromStr;

use super::errors::{ConfigErrors, Env};
use super::values::{parse_bool, Cidr, Dur, Secret, SecretUrl, StrList};
use super::{AuthMode, Config, LogFormat, LogLevel, TokenBackend, Upstream};
use crate::time::Timestamp;

/// Every variable the gateway reads, for documentation and for `check-config`.
pub const VARIABLES: [&str; 34] = [
    "ORCHEO_GATEWAY_LISTEN",
    "ORCHEO_GATEWAY_LISTEN_TLS",
    "ORCHEO_GATEWAY_TLS_CERT",
    "ORCHEO_GATEWAY_TLS_KEY",
    "ORCHEO_GATEWAY_ADMIN_LISTEN",
    "ORCHEO_GATEWAY_TRUSTED_PROXIES",
    "ORCHEO_GATEWAY_UPSTREAM",
    "ORCHEO_GATEWAY_EXTAUTHZ_LISTEN",
    "ORCHEO_AUTH_MODE",
    "ORCHEO_AUTH_JWT_SECRET",
    "ORCHEO_AUTH_JWKS_URL",
    "ORCHEO_AUTH_JWKS_STATIC",
    "ORCHEO_AUTH_JWKS",
    "ORCHEO_AUTH_JWKS_CACHE_TTL",
    "ORCHEO_AUTH_JWKS_TIMEOUT",
    "ORCHEO_AUTH_ALLOWED_ALGORITHMS",
    "ORCHEO_AUTH_AUDIENCE",
    "ORCHEO_AUTH_ISSUER",
    "ORCHEO_AUTH_JWT_LEEWAY",
    "ORCHEO_AUTH_JWT_REQUIRED_CLAIMS",
    "ORCHEO_AUTH_BOOTSTRAP_SERVICE_TOKEN",
    "ORCHEO_AUTH_BOOTSTRAP_TOKEN_SCOPES",
    "ORCHEO_AUTH_BOOTSTRAP_TOKEN_EXPIRES_AT",
    "ORCHEO_AUTH_SERVICE_TOKEN_BACKEND",
    "ORCHEO_AUTH_SERVICE_TOKEN_DB_PATH",
    "ORCHEO_POSTGRES_DSN",
    "ORCHEO_AUTH_RATE_LIMIT_IP",
    "ORCHEO_AUTH_RATE_LIMIT_IDENTITY",
    "ORCHEO_AUTH_RATE_LIMIT_INTERVAL",
    "ORCHEO_AUTH_RATE_LIMIT_REDIS_URL",
    "ORCHEO_LOG_LEVEL",
    "ORCHEO_LOG_FORMAT",
    "ORCHEO_LOG_SENSITIVE_DEBUG",
    "ORCHEO_GATEWAY_CONFIG",
];

/// Applies every set variable to `config`. Returns which YAML key each applied variable
/// replaced, so that a later problem with that value is reported under the variable.
pub fn apply(config: &mut Config, env: &Env, errors: &mut ConfigErrors) -> Vec<Applied> {
    let mut set = Setter {
        env,
        errors,
        applied: Vec::new(),
    };
    set.value("ORCHEO_GATEWAY_LISTEN", "listen.http", |v: StrList| {
        parse_each(&v.0).map(|addrs| config.listen.http = addrs)
    });
    set.value("ORCHEO_GATEWAY_LISTEN_TLS", "listen.https", |v: StrList| {
        parse_each(&v.0).map(|addrs| config.listen.https = addrs)
    });
    set.value("ORCHEO_GATEWAY_TLS_CERT", "tls.cert_file", |v: PathBuf| {
        config.tls.cert_file = Some(v);
        Ok(())
    });
    set.value("ORCHEO_GATEWAY_TLS_KEY", "tls.key_file", |v: PathBuf| {
        config.tls.key_file = Some(v);
        Ok(())
    });
    set.value(
        "ORCHEO_GATEWAY_ADMIN_LISTEN",
        "admin.listen",
        |v: String| {
            config.admin.listen = address_or_off(&v)?;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_GATEWAY_TRUSTED_PROXIES",
        "trusted_proxies",
        |v: StrList| parse_each::<Cidr>(&v.0).map(|nets| config.trusted_proxies = nets),
    );
    set.value(
        "ORCHEO_GATEWAY_UPSTREAM",
        "upstreams.default.url",
        |v: String| {
            let entry = config.upstreams.0.entry("default".into());
            entry.or_insert_with(|| Upstream::with_url("")).url = v.trim().to_string();
            Ok(())
        },
    );
    set.value(
        "ORCHEO_GATEWAY_EXTAUTHZ_LISTEN",
        "forward_auth.grpc_listen",
        |v: String| {
            config.forward_auth.grpc_listen = address_or_off(&v)?;
            Ok(())
        },
    );
    apply_auth(config, &mut set);
    set.value("ORCHEO_LOG_LEVEL", "log.level", |v: LogLevel| {
        config.log.level = v;
        Ok(())
    });
    set.value("ORCHEO_LOG_FORMAT", "log.format", |v: LogFormat| {
        config.log.format = v;
        Ok(())
    });
    set.value(
        "ORCHEO_LOG_SENSITIVE_DEBUG",
        "log.sensitive_debug",
        |v: Bool| {
            config.log.sensitive_debug = v.0;
            Ok(())
        },
    );
    set.applied
}

/// A variable that replaced the YAML value at `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The YAML key, as validation names it.
    pub key: &'static str,
    /// The variable.
    pub variable: &'static str,
}

/// Renames problems found in a value a variable set: they are reported under the
/// variable, which is what the operator wrote.
pub fn attribute(errors: &mut ConfigErrors, applied: &[Applied]) {
    for error in &mut errors.0 {
        let by = applied.iter().rev().find(|a| {
            error.key == a.key
                || error.key.starts_with(&format!("{}.", a.key))
                || error.key.starts_with(&format!("{}[", a.key))
        });
        if let Some(applied) = by {
            error.message = format!("{} (as {})", error.message, error.key);
            error.key = applied.variable.to_string();
        }
    }
}

fn apply_auth(config: &mut Config, set: &mut Setter) {
    let auth = &mut config.auth;
    set.value("ORCHEO_AUTH_MODE", "auth.mode", |v: AuthMode| {
        auth.mode = Some(v);
        Ok(())
    });
    set.value("ORCHEO_AUTH_JWT_SECRET", "auth.jwt.secret", |v: String| {
        auth.jwt.secret = Some(Secret::new(v));
        Ok(())
    });
    set.value("ORCHEO_AUTH_JWKS_URL", "auth.jwt.jwks_url", |v: String| {
        auth.jwt.jwks_url = Some(v.trim().to_string());
        Ok(())
    });
    // ORCHEO_AUTH_JWKS wins over ORCHEO_AUTH_JWKS_STATIC, so it is applied last.
    for name in ["ORCHEO_AUTH_JWKS_STATIC", "ORCHEO_AUTH_JWKS"] {
        set.value(name, "auth.jwt.jwks", |v: String| {
            let parsed: serde_yaml::Value =
                serde_yaml::from_str(&v).map_err(|e| format!("not valid JSON: {e}"))?;
            auth.jwt.jwks = Some(parsed);
            Ok(())
        });
    }
    set.value(
        "ORCHEO_AUTH_JWKS_CACHE_TTL",
        "auth.jwt.jwks_cache_ttl",
        |v: Dur| {
            auth.jwt.jwks_cache_ttl = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_JWKS_TIMEOUT",
        "auth.jwt.jwks_timeout",
        |v: Dur| {
            auth.jwt.jwks_timeout = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_ALLOWED_ALGORITHMS",
        "auth.jwt.allowed_algorithms",
        |v: StrList| {
            auth.jwt.allowed_algorithms = v;
            Ok(())
        },
    );
    set.value("ORCHEO_AUTH_AUDIENCE", "auth.jwt.audience", |v: StrList| {
        auth.jwt.audience = v;
        Ok(())
    });
    set.value("ORCHEO_AUTH_ISSUER", "auth.jwt.issuer", |v: String| {
        auth.jwt.issuer = Some(v);
        Ok(())
    });
    set.value("ORCHEO_AUTH_JWT_LEEWAY", "auth.jwt.leeway", |v: Dur| {
        auth.jwt.leeway = v;
        Ok(())
    });
    set.value(
        "ORCHEO_AUTH_JWT_REQUIRED_CLAIMS",
        "auth.jwt.required_claims",
        |v: StrList| {
            auth.jwt.required_claims = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_BOOTSTRAP_SERVICE_TOKEN",
        "auth.bootstrap.token",
        |v: String| {
            auth.bootstrap.token = Some(Secret::new(v));
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_BOOTSTRAP_TOKEN_SCOPES",
        "auth.bootstrap.scopes",
        |v: StrList| {
            auth.bootstrap.scopes = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_BOOTSTRAP_TOKEN_EXPIRES_AT",
        "auth.bootstrap.expires_at",
        |v: Timestamp| {
            auth.bootstrap.expires_at = Some(v);
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_SERVICE_TOKEN_BACKEND",
        "auth.service_tokens.backend",
        |v: TokenBackend| {
            auth.service_tokens.backend = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_SERVICE_TOKEN_DB_PATH",
        "auth.service_tokens.sqlite_path",
        |v: PathBuf| {
            auth.service_tokens.sqlite_path = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_POSTGRES_DSN",
        "auth.service_tokens.postgres_dsn",
        |v: String| {
            auth.service_tokens.postgres_dsn = Some(SecretUrl::new(v));
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_RATE_LIMIT_IP",
        "auth.rate_limit.ip",
        |v: u32| {
            auth.rate_limit.ip = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_RATE_LIMIT_IDENTITY",
        "auth.rate_limit.identity",
        |v: u32| {
            auth.rate_limit.identity = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_RATE_LIMIT_INTERVAL",
        "auth.rate_limit.interval",
        |v: Dur| {
            auth.rate_limit.interval = v;
            Ok(())
        },
    );
    set.value(
        "ORCHEO_AUTH_RATE_LIMIT_REDIS_URL",
        "auth.rate_limit.redis_url",
        |v: String| {
            auth.rate_limit.redis_url = Some(SecretUrl::new(v));
            Ok(())
        },
    );
}

/// Reads variables, parses them, and records failures under the variable's name.
struct Setter<'a> {
    env: &'a Env,
    errors: &'a mut ConfigErrors,
    applied: Vec<Applied>,
}

impl Setter<'_> {
    fn value<T, F>(&mut self, name: &'static str, key: &'static str, apply: F)
    where
        T: FromStr,
        T::Err: std::fmt::Display,
        F: FnOnce(T) -> Result<(), String>,
    {
        let Some(raw) = self.env.get(name).filter(|v| !v.trim().is_empty()) else {
            return;
        };
        let result = raw.parse::<T>().map_err(|e| e.to_string()).and_then(apply);
        match result {
            Ok(()) => self.applied.push(Applied {
                key,
                variable: name,
            }),
            Err(message) => self.errors.push(name, message),
        }
    }
}

/// A boolean as the environment spells it.
struct Bool(bool);

impl FromStr for Bool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_bool(s).map(Bool)
    }
}

fn parse_each<T: FromStr>(items: &[String]) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    items
        .iter()
        .map(|item| item.parse::<T>().map_err(|e| format!("`{item}`: {e}")))
        .collect()
}

/// A listener address, or `off` for none.
fn address_or_off(v: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if v.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.trim().parse().map(Some).map_err(|_| not_address(v))
}

fn not_address(v: &str) -> String {
    format!(
        "`{}` is not an address like 127.0.0.1:8081 (or `off`)",
        v.trim()
    )
}
