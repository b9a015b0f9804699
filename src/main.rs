//! `switchboard`: one binary, one subcommand per mode. Parses, configures, wires, waits,
//! drains; the work is in the `edge`, `coordinator` and `bus` crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::{Config, LogFormat, Overrides};
use switchboard::{run, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration error (EX_CONFIG-adjacent EX_USAGE, as sysexits.h).
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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One process: an edge and a coordinator over an in-process bus (the default).
    Dev(DevArgs),
    /// Validate a config file and print the effective config (exit 64 naming the bad key).
    CheckConfig { file: PathBuf },
}

#[derive(Debug, Default, clap::Args)]
struct DevArgs {
    /// WebSocket and HTTP listener (edge.listen) [default: 127.0.0.1:8080].
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// gRPC listener (coordinator.grpc_listen) [default: 127.0.0.1:50051].
    #[arg(long, env = "SWITCHBOARD_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// YAML config file.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (node_id).
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    node_id: Option<String>,
    /// Log format (log.format).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check) = match cli.command.unwrap_or(Command::Dev(DevArgs::default())) {
        Command::Dev(a) => (a, None),
        Command::CheckConfig { file } => (
            DevArgs {
                config: Some(file.clone()),
                ..DevArgs::default()
            },
            Some(file),
        ),
    };
    let flags = Overrides {
        listen: args.listen,
        grpc_listen: args.grpc_listen,
        node_id: args.node_id,
        log_format: args.log_format,
    };
    let base = Config {
        edge: edge::EdgeConfig::dev(),
        ..Config::default()
    };
    let resolved = match Config::load(&base, args.config.as_deref(), std::env::vars(), &flags) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(file) = check {
        print!(
            "# effective configuration of {}\n{}",
            file.display(),
            resolved.config.to_yaml()
        );
        return ExitCode::SUCCESS;
    }
    telemetry::init(&resolved.config.log);
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
        run::spawn_signal_handler(shutdown.clone());
        let node = run::DevNode::bind(resolved).await?;
        print!("{}", node.banner());
        node.serve(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
