//! The command line: `serve`, `check-config`, `demo` and `token`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod healthcheck;
mod token;

use crate::app::Gateway;
use crate::config::{self, Config, Env};

/// orcheo-gateway: an authenticating reverse proxy for HTTP and WebSocket services.
///
/// It terminates TLS, checks every request's credential (JWT, service token or bootstrap
/// token) against the route table, and forwards allowed requests to the upstream with
/// identity headers.
#[derive(Debug, Parser)]
#[command(name = "orcheo-gateway", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or SIGINT (SIGHUP reloads the configuration).
    Serve(ConfigArg),
    /// Validate the configuration and environment exactly as `serve` would, and print
    /// the effective settings with secrets redacted. Exit 1 listing every problem.
    CheckConfig(ConfigArg),
    /// A one-command tour: the gateway on 127.0.0.1:8080 in front of a built-in echo
    /// upstream, with a fresh bootstrap token and HS256 secret, printing curl commands.
    Demo {
        /// Port of the gateway; the admin listener takes the next one.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Ask the admin listener's /healthz (the configuration's `admin.listen`, a wildcard
    /// address asked on loopback); exit 0 when it answers 200, 1 otherwise. For container
    /// health checks.
    Healthcheck(ConfigArg),
    /// Manage service tokens through a gateway's admin API.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: token::TokenCommand,
        /// Where the gateway is and how to authenticate.
        #[command(flatten)]
        connection: token::Connection,
    },
}

/// Where the configuration file is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file. Default: $ORCHEO_GATEWAY_CONFIG, else ./gateway.yaml if it
    /// exists, else built-in defaults.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The process environment as a map (only valid UTF-8 variables).
pub fn process_env() -> Env {
    std::env::vars().collect()
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let env = process_env();
    match cli.command {
        Command::CheckConfig(arg) => check_config(arg.config, &env),
        Command::Serve(arg) => serve(arg.config, env),
        Command::Demo { port } => demo::run(port),
        Command::Healthcheck(arg) => match load(arg.config, &env) {
            Ok((config, _)) => healthcheck::run(&config),
            Err(code) => code,
        },
        Command::Token {
            command,
            connection,
        } => token::run(command, connection, &env),
    }
}

fn load(flag: Option<PathBuf>, env: &Env) -> Result<(Config, Option<PathBuf>), ExitCode> {
    let path = config::resolve_path(flag.as_deref(), env);
    match config::load_file(path.as_deref(), env) {
        Ok(config) => Ok((config, path)),
        Err(errors) => {
            eprint!("{errors}");
            Err(ExitCode::from(1))
        }
    }
}

fn check_config(flag: Option<PathBuf>, env: &Env) -> ExitCode {
    let (config, path) = match load(flag, env) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let source = path.map_or("built-in defaults".to_string(), |p| p.display().to_string());
    match serde_yaml::to_string(&config) {
        Ok(yaml) => {
            println!("# configuration OK: {source}");
            println!("# effective settings (environment applied, secrets redacted)");
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot print the configuration: {error}");
            ExitCode::from(1)
        }
    }
}

fn serve(flag: Option<PathBuf>, env: Env) -> ExitCode {
    let (config, path) = match load(flag, &env) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    crate::logging::init(config.log.level, config.log.format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = runtime.block_on(async move {
        // Signals are caught from before the listeners open: a SIGHUP or SIGTERM sent as
        // soon as the gateway is reachable must not find the default (fatal) action.
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("error: cannot listen for signals: {error}");
                return ExitCode::from(1);
            }
        };
        let gateway = match Gateway::start(config, path, env).await {
            Ok(gateway) => gateway,
            Err(error) => {
                tracing::error!(%error, "start-up failed");
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        };
        signals.wait(&gateway).await;
        gateway.shutdown().await;
        ExitCode::SUCCESS
    });
    // In-flight tasks that outlived the grace period are cut here, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// The multi-threaded runtime the commands run on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("cannot start the runtime: {error}");
            ExitCode::from(1)
        })
}

/// The signals `serve` acts on.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Reloads on SIGHUP; returns on SIGTERM or SIGINT.
    async fn wait(mut self, gateway: &Gateway) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return,
                _ = self.interrupt.recv() => return,
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = gateway.reload().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_token_that_begins_with_a_dash_is_a_value() {
        let secret = "-N3x_q8ZkYv2c1WlJ0tB7uHs5rD4aPmEoIfGyQnXKjT";
        for args in [
            ["orcheo-gateway", "token", "list", "--service-token", secret],
            ["orcheo-gateway", "token", "--service-token", secret, "list"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            let Command::Token { connection, .. } = cli.command else {
                panic!("not the token command");
            };
            assert_eq!(connection.service_token.as_deref(), Some(secret));
        }
    }
}
