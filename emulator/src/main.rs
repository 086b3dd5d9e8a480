//! `aoai-emulator [--listen 127.0.0.1:8080] [--token-lifetime SECONDS] [--imds-delay-ms MS]
//!                [--allow-keys] [--quiet]`
//!
//! Runs the local Azure (IMDS + Azure OpenAI) until interrupted.

use std::net::SocketAddr;
use std::process::ExitCode;

use aoai_emulator::{Emulator, Settings};

const USAGE: &str = "usage: aoai-emulator [--listen ADDR] [--token-lifetime SECONDS] [--imds-delay-ms MS] [--allow-keys] [--quiet]";

fn main() -> ExitCode {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut settings = Settings::default();
    let mut verbose = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--listen" => args.next().and_then(|v| v.parse().ok()).map(|v| listen = v),
            "--token-lifetime" => args
                .next()
                .and_then(|v| v.parse().ok())
                .map(|v| settings.token_lifetime_s = v),
            "--imds-delay-ms" => args
                .next()
                .and_then(|v| v.parse().ok())
                .map(|v| settings.imds_delay_ms = v),
            "--allow-keys" => Some(settings.local_auth_disabled = false),
            "--quiet" => Some(verbose = false),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => None,
        };
        if parsed.is_none() {
            eprintln!("aoai-emulator: bad argument `{arg}`\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let lifetime = settings.token_lifetime_s;
    let keys = if settings.local_auth_disabled {
        "refused (disableLocalAuth=true)"
    } else {
        "accepted"
    };
    let emulator = match Emulator::start_on(listen, settings, verbose) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("aoai-emulator: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "[emulator] listening on http://{}: IMDS tokens for {lifetime} s, Azure OpenAI keys {keys}",
        emulator.addr()
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aoai-emulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    drop(emulator);
    ExitCode::SUCCESS
}
