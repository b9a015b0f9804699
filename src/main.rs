//! `switchboard`: one binary, one subcommand per mode. Parses, configures, wires, waits,
//! drains; the work is in the `edge`, `coordinator` and `bus` crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::{Config, LogFormat, Mode, Overrides};
use switchboard::{run, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Horizontally scalable WebSocket gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One process: an edge and a coordinator over an in-process bus (the default), or over
    /// NATS with --nats (or nats.url), where backends in any language can answer.
    Dev,
    /// An edge: terminates client WebSockets, reports to the coordinators over NATS.
    Edge,
    /// A coordinator: placement and the gRPC services, over NATS.
    Coordinator,
    /// Validate a config file and print the effective config (exit 64 naming the bad key).
    CheckConfig {
        file: PathBuf,
        /// What the file is for: a coordinator needs no valid edge block.
        #[arg(long = "for", value_enum, default_value = "edge")]
        mode: CheckMode,
    },
    /// Mint a test token: HS256 (--secret or SWITCHBOARD_JWT_SECRET), or RS256, ES256,
    /// EdDSA (--key FILE), with any claims.
    Token(switchboard::token::TokenArgs),
    /// Print a fresh random gRPC API key (for coordinator.api.keys).
    ApiKey,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CheckMode {
    Edge,
    Coordinator,
}

/// Flags of every mode; each is also an environment variable and a config key.
#[derive(Debug, Default, clap::Args)]
struct Flags {
    /// YAML config file.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// WebSocket and HTTP listener of the edge (edge.listen) [default: 127.0.0.1:8080].
    #[arg(long, global = true, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// gRPC listener of the coordinator (coordinator.grpc_listen) [default: 127.0.0.1:50051].
    #[arg(long, global = true, env = "SWITCHBOARD_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// HTTP listener of the coordinator: health and metrics (coordinator.http_listen).
    #[arg(long, global = true, env = "SWITCHBOARD_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// NATS server URL(s), comma-separated (nats.url).
    #[arg(long, global = true, env = "SWITCHBOARD_NATS")]
    nats: Option<String>,
    /// Coordinator gRPC URLs for first contact, comma-separated (edge.coordinators).
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_COORDINATOR",
        value_delimiter = ','
    )]
    coordinator: Option<Vec<String>>,
    /// This node's id (node_id).
    #[arg(long, global = true, env = "SWITCHBOARD_NODE_ID")]
    node_id: Option<String>,
    /// Log format (log.format).
    #[arg(long, global = true, env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Dev);
    match &command {
        Command::Token(t) => return switchboard::token::print_token(t),
        Command::ApiKey => return switchboard::token::print_api_key(),
        _ => {}
    }
    let f = cli.flags;
    let file = match &command {
        Command::CheckConfig { file, .. } => Some(file.clone()),
        _ => f.config.clone(),
    };
    let flags = Overrides {
        listen: f.listen,
        grpc_listen: f.grpc_listen,
        http_listen: f.http_listen,
        nats: f.nats,
        coordinators: f.coordinator,
        node_id: f.node_id,
        log_format: f.log_format,
    };
    let (mode, base) = match command {
        Command::Edge => (Mode::Edge, Config::default()),
        Command::Coordinator => (Mode::Coordinator, Config::default()),
        // A file is checked against the production defaults, whatever mode it is for.
        Command::CheckConfig {
            mode: CheckMode::Coordinator,
            ..
        } => (Mode::Coordinator, Config::default()),
        Command::CheckConfig { .. } => (Mode::Dev, Config::default()),
        Command::Dev | Command::Token(_) | Command::ApiKey => (
            Mode::Dev,
            Config {
                edge: edge::EdgeConfig::dev(),
                ..Config::default()
            },
        ),
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let resolved = match Config::load(mode, &base, file.as_deref(), env.clone(), &flags) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::CheckConfig { file, .. } = &command {
        print!(
            "# effective configuration of {}\n{}",
            file.display(),
            resolved.config.to_yaml()
        );
        // What NATS permissions must name (deploy/nats/permissions.conf).
        for rule in resolved.config.edge.history_rules() {
            println!(
                "# history of {:?} is kept in JetStream stream {}",
                rule.pattern,
                proto::subject::history_stream(&rule.pattern)
            );
        }
        return ExitCode::SUCCESS;
    }
    let service = match command {
        Command::Edge => "switchboard-edge",
        Command::Coordinator => "switchboard-coordinator",
        _ => "switchboard",
    };
    let telemetry = telemetry::init(&resolved.config.log, service, &env);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        run::spawn_signal_handler(shutdown.clone())?;
        match command {
            Command::Edge => run::edge(resolved, shutdown).await,
            Command::Coordinator => run::coordinator(resolved, shutdown).await,
            _ => {
                let node = run::DevNode::bind(resolved).await?;
                print!("{}", node.banner());
                node.serve(shutdown).await
            }
        }
    });
    // The runtime goes first: the trace exporter flushes outside any runtime.
    drop(runtime);
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
