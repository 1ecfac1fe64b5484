//! The `filterplane` binary: the command line turned into the server's settings, and the
//! CLI commands that talk to a running server's admin API (`client`).

mod args;
mod client;

use std::process::ExitCode;

use args::{Cli, Command, WasmCommand};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS implementation for the whole process (servers, registry and admin clients).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Validate { config, preflight_envoy } => {
            if filterplane_server::validate(&config, preflight_envoy.as_deref()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Reload { confirm, admin, client } => match client::request_reload(&admin, confirm, &client) {
            Ok((text, applied)) => {
                println!("{text}");
                if applied {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("filterplane reload: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Rollout { command, admin, client } => {
            let result = match command.action() {
                Some((action, name)) => client::rollout_action(&admin, &client, action, name),
                None => match &command {
                    args::RolloutCommand::Status { name } => client::rollout_status(&admin, &client, name.as_deref()),
                    _ => unreachable!("only status has no action"),
                },
            };
            match result {
                Ok(text) => {
                    print!("{}", if text.ends_with('\n') { text } else { format!("{text}\n") });
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("filterplane rollout: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { admin, client } => match client::fetch_and_render(&admin, &client) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("filterplane status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Wasm {
            command: WasmCommand::Push { file, reference, insecure, credentials_env, registry_ca_file },
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(filterplane_server::wasm_push(
                &file,
                &reference,
                insecure,
                credentials_env.as_deref(),
                registry_ca_file.as_deref(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("filterplane wasm push: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => {
            // One socket per Envoy: lift the soft file-descriptor limit (often 1,024) to
            // the hard one, as a server for thousands of proxies must.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::debug!(limit = n, "file descriptor limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_stop_signal().await;
                    tracing::info!("shutting down");
                    signals.cancel();
                });
                match filterplane_server::serve(args.into_settings(), shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

async fn wait_for_stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
