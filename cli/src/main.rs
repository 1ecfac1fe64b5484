//! The `filterplane` binary: the command line turned into the server's settings, and the
//! CLI commands that talk to a running server's admin API (`client`).

mod args;
mod client;
mod settings_file;

use std::process::ExitCode;

use args::{Cli, Command, WasmCommand};
use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let (cli, report) = match parse(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    if let Some(report) = report {
        print!("{report}");
        return ExitCode::SUCCESS;
    }
    // One TLS implementation for the whole process (servers, registry and admin clients).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    init_logs(cli.log_format);
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
        Command::Status { node, output, wait_synced, admin, client } => {
            match client::status(&admin, &client, node.as_deref(), output, wait_synced) {
                Ok((text, code)) => {
                    print!("{text}");
                    ExitCode::from(code)
                }
                Err(e) => {
                    eprintln!("filterplane status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ConfigDump { node, output, admin, client } => {
            match client::config_dump(&admin, &client, &node, output) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("filterplane config-dump: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <args::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "filterplane", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <args::Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("filterplane man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Wasm { command: WasmCommand::Sign { file, key, output } } => {
            match filterplane_server::wasm_sign(&file, &key, output.as_deref()) {
                Ok(at) => {
                    println!("{}", at.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("filterplane wasm sign: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Wasm { command: WasmCommand::Verify { file, keys, signature } } => {
            match filterplane_server::wasm_verify(&file, &keys, signature.as_deref()) {
                Ok(key) => {
                    println!("{}: signed by {key}", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("filterplane wasm verify: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Wasm {
            command: WasmCommand::Push { file, reference, insecure, credentials_env, registry_ca_file, sign_key },
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
                sign_key.as_deref(),
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

/// The command line, with `serve --settings FILE`'s entries as the flags they name where
/// neither the command line nor a variable set them; and, with `serve --print-settings`,
/// the settings in effect. A bad command line or settings file is printed here.
fn parse(argv: Vec<std::ffi::OsString>) -> Result<(Cli, Option<String>), ExitCode> {
    let command = Cli::command();
    let clap_failed = |e: clap::Error| {
        let _ = e.print();
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    };
    // A first, lenient look: is there a settings file, and which flags were given?
    let first = command.clone().ignore_errors(true).try_get_matches_from(&argv).ok();
    let serve = first.as_ref().and_then(|m| m.subcommand_matches("serve"));
    let settings_path = serve.and_then(|m| m.get_one::<std::path::PathBuf>("settings").cloned());
    let serve_command = command.find_subcommand("serve").cloned().unwrap_or_else(|| clap::Command::new("serve"));
    let mut file = None;
    let mut from_file = Vec::new();
    let mut full = argv.clone();
    if let (Some(path), Some(given)) = (settings_path, serve) {
        let read = match settings_file::SettingsFile::read(&path, &serve_command) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("filterplane serve: {e}");
                return Err(ExitCode::from(2));
            }
        };
        let set_otherwise = |key: &str| {
            let id = serve_command.get_arguments().find(|a| a.get_long() == Some(key)).map(|a| a.get_id().clone());
            id.is_some_and(|id| {
                matches!(given.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
            })
        };
        from_file = read.entries.iter().filter(|e| !set_otherwise(&e.key)).map(|e| e.key.clone()).collect();
        full.extend(read.args(set_otherwise));
        file = Some(read);
    }
    let matches = match command.clone().try_get_matches_from(&full) {
        Ok(m) => m,
        Err(e) => {
            let code = clap_failed(e);
            if let Some(f) = &file {
                eprintln!("(the settings file {} counts as flags here)", f.path.display());
            }
            return Err(code);
        }
    };
    let cli = Cli::from_arg_matches(&matches).map_err(clap_failed)?;
    let report = match (&cli.command, matches.subcommand_matches("serve")) {
        (Command::Serve(args), Some(serve)) if args.print_settings => {
            Some(settings_file::report(&serve_command, serve, file.as_ref(), &from_file))
        }
        _ => None,
    };
    Ok((cli, report))
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

/// Log lines to standard error: `RUST_LOG` picks what (default `info`); text is coloured
/// only on a terminal, and never with `NO_COLOR` set (no-color.org).
fn init_logs(format: args::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        args::LogFormat::Json => builder.json().with_current_span(false).init(),
        args::LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).init()
        }
    }
}
