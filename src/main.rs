//! Command line: `serve` (default), `get`, `rotation-check`, `check-config`.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::FromArgMatches;
use tokio::net::TcpListener;

use airflow_secrets_sidecar::{
    admin, http, load_aws_config, prefetch, refresh_ahead, Cli, Command, LogFormat, Metrics,
    Resolver, Settings, TokenStore,
};

fn main() -> ExitCode {
    let matches = Cli::shown().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let (settings, sources) = match Settings::load(cli.settings, &matches) {
        Ok((s, sources)) => (Arc::new(s), sources),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `serve` logs to stdout (what Kubernetes collects); the one-shot
    // commands keep stdout for their answer and log to stderr.
    let serving = matches!(cli.command, None | Some(Command::Serve));
    init_logging(&settings, serving);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(settings).await,
            Command::Get { conn_id, refresh } => get(settings, &conn_id, refresh).await,
            Command::RotationCheck { conn_id, all, json } => {
                rotation_check(settings, conn_id, all, json).await
            }
            Command::CheckConfig => {
                println!(
                    "configuration OK: {} connection entr{}, prefix {}",
                    settings.connections.len(),
                    if settings.connections.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    settings.connections_prefix
                );
                // The effective settings, and where each came from.
                let width = sources.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
                for ((name, value), (_, source)) in settings.effective().iter().zip(&sources) {
                    println!("  {name:width$} = {value}  ({})", source.as_str());
                }
                ExitCode::SUCCESS
            }
        }
    })
}

fn init_logging(settings: &Settings, to_stdout: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer =
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
            if to_stdout {
                Box::new(std::io::stdout())
            } else {
                Box::new(std::io::stderr())
            }
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match settings.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn resolver(settings: &Arc<Settings>) -> (Arc<Resolver>, aws_config::SdkConfig) {
    let aws = load_aws_config(settings.aws_timeout).await;
    let metrics = Arc::new(Metrics::new());
    (
        Arc::new(Resolver::new(settings.clone(), &aws, metrics)),
        aws,
    )
}

async fn get(settings: Arc<Settings>, conn_id: &str, refresh: bool) -> ExitCode {
    let (resolver, _) = resolver(&settings).await;
    let answer = match resolver.key(None, conn_id) {
        Ok(key) => resolver.connection(&key, refresh).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(served) => {
            println!("{}", String::from_utf8_lossy(&served.body));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {}", e.code.as_str(), e.message);
            ExitCode::FAILURE
        }
    }
}

/// Exit 0 only when every verdict needs no action.
async fn rotation_check(
    settings: Arc<Settings>,
    conn_id: Option<String>,
    all: bool,
    json: bool,
) -> ExitCode {
    let (resolver, _) = resolver(&settings).await;
    let results = match (conn_id, all) {
        (Some(id), _) => {
            let report = match resolver.key(None, &id) {
                Ok(key) => resolver.rotation_check(&key).await,
                Err(e) => Err(e),
            };
            vec![(id.clone(), report)]
        }
        (None, true) => resolver
            .rotation_check_all()
            .await
            .into_iter()
            .map(|(key, r)| (key.conn_id().to_string(), r))
            .collect(),
        (None, false) => {
            eprintln!("error: name a CONN_ID or use --all");
            return ExitCode::from(2);
        }
    };
    if all && results.is_empty() {
        eprintln!("error: --all found no [connections.*] entries in the configuration");
        return ExitCode::from(2);
    }
    let mut healthy = true;
    let mut reports = Vec::new();
    for (id, result) in results {
        match result {
            Ok(report) => {
                healthy &= report.verdict.needs_no_action();
                if !json {
                    print!("{}", report.to_text());
                }
                reports.push(serde_json::to_value(&*report).unwrap_or_default());
            }
            Err(e) => {
                healthy = false;
                eprintln!("error: connection {id}: {}: {}", e.code.as_str(), e.message);
                reports.push(serde_json::json!({"conn_id": id, "error": e.code.as_str(), "message": e.message}));
            }
        }
    }
    if json {
        let value = if all {
            serde_json::Value::Array(reports)
        } else {
            reports.pop().unwrap_or_default()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn serve(settings: Arc<Settings>) -> ExitCode {
    let stop_signal = install_signals();
    if let Err(e) = settings.check_token() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let (Some(path), true) = (&settings.token_file, settings.token_create) {
        match TokenStore::create_if_missing(path) {
            Ok(true) => tracing::info!(path = %path.display(), "wrote a new token file"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("error: cannot create token file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    for (conn_id, mode) in settings.weakened_entries() {
        tracing::warn!(conn_id, sslmode = mode.as_str(), min_sslmode = settings.min_sslmode.as_str(),
            "this connection's entry chose a TLS mode below min_sslmode; its answers say so in extra.sslmode");
    }
    let token_path = if settings.insecure_no_token {
        tracing::warn!("--insecure-no-token: any local process can read connections");
        None
    } else {
        settings.token_file.clone()
    };
    let token = match TokenStore::new(token_path.clone()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read the token file: {e}");
            return ExitCode::from(2);
        }
    };
    let (resolver, _) = resolver(&settings).await;
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    // The admin listener may fall back from [::] to 0.0.0.0 (no IPv6 in the kernel).
    let admin_bind = |addr| async move {
        admin::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (api_listener, (admin_listener, admin_addr)) = match (
        bind(settings.listen).await,
        admin_bind(settings.admin_listen).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !settings.listen.ip().is_loopback() {
        tracing::warn!(listen = %settings.listen, "the credential API listens beyond loopback");
    }
    tracing::info!(listen = %settings.listen, admin = %admin_addr,
        version = env!("CARGO_PKG_VERSION"), "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let api = Arc::new(http::CredentialApi {
        resolver: resolver.clone(),
        token,
    });
    let api_serving = Arc::new(AtomicBool::new(true));
    let admin = Arc::new(admin::Admin {
        resolver: resolver.clone(),
        token_file: token_path.clone(),
        api_serving: api_serving.clone(),
    });
    let refresher = tokio::spawn(refresh_ahead(resolver.clone()));
    let grace = Duration::from_secs(10);
    let api_stop = stopped(stop_rx.clone());
    let api_task = tokio::spawn(async move {
        http::serve(api_listener, api, api_stop, grace).await;
        // /readyz turns 503 once the credential API no longer accepts.
        api_serving.store(false, Ordering::Release);
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin,
        stopped(stop_rx.clone()),
    ));
    // After the listeners: readiness never waits for it.
    let prefetch = prefetch::spawn(resolver.clone());

    stop_signal.await;
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    let _ = stop_tx.send(true);
    refresher.abort();
    if let Some(p) = prefetch {
        p.abort();
    }
    let _ = api_task.await;
    let _ = admin_task.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGTERM / SIGINT, installed before anything can report ready: a signal
/// that arrives between readiness and the wait is still a graceful stop,
/// not the default action (the process killed mid-request).
fn install_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
