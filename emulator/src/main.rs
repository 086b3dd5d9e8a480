//! `aoai-emulator [--listen 127.0.0.1:8080] [--token-lifetime SECONDS] [--imds-delay-ms MS]
//!                [--token-padding BYTES] [--allow-keys] [--entra-app CLIENT_ID=SECRET]...
//!                [--key-file PATH [--key-expires-in SECONDS]] [--quiet]`
//!
//! Runs the local Azure (IMDS, Entra, and the Azure OpenAI, Foundry project and
//! Azure ML scoring data planes; see the library's rooms) until interrupted.

use std::net::SocketAddr;
use std::process::ExitCode;

use aoai_emulator::{AppSecret, Emulator, EntraApp, Settings};

const USAGE: &str = "usage: aoai-emulator [--listen ADDR] [--token-lifetime SECONDS] [--imds-delay-ms MS] [--token-padding BYTES] [--allow-keys] [--entra-app CLIENT_ID=SECRET]... [--key-file PATH [--key-expires-in SECONDS]] [--quiet]

  --key-file PATH         the key service, GET /keyservice/key, answers {\"key\": <the file's contents>},
                          read anew on every request (without it: 404)
  --key-expires-in SECS   and adds \"expires_in\": SECS to that answer";

struct Args {
    listen: SocketAddr,
    settings: Settings,
    verbose: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        settings: Settings::default(),
        verbose: true,
    };
    fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a valid value"))
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => parsed.listen = value(&arg, args.next())?,
            "--token-lifetime" => parsed.settings.token_lifetime_s = value(&arg, args.next())?,
            "--imds-delay-ms" => parsed.settings.imds_delay_ms = value(&arg, args.next())?,
            "--token-padding" => parsed.settings.token_padding = value(&arg, args.next())?,
            "--allow-keys" => parsed.settings.local_auth_disabled = false,
            // An app registration the Entra room knows, with one secret: for
            // client-credentials clients such as Envoy's credential_injector.
            "--entra-app" => {
                let spec: String = value(&arg, args.next())?;
                let (client_id, secret) = spec
                    .split_once('=')
                    .filter(|(id, secret)| !id.is_empty() && !secret.is_empty())
                    .ok_or_else(|| format!("{arg} needs CLIENT_ID=SECRET"))?;
                let index = parsed.settings.entra_apps.len();
                let mut app =
                    EntraApp::new(client_id, &format!("0e0e0e0e-0000-4000-8000-{index:012x}"));
                app.secrets.push(AppSecret::new(secret));
                parsed.settings.entra_apps.push(app);
            }
            // The reference key service (`GET /keyservice/key`) of the
            // filter's `http` source serves this file, read on every request.
            "--key-file" => {
                let path: std::path::PathBuf = value(&arg, args.next())?;
                if path.as_os_str().is_empty() {
                    return Err(format!("{arg} needs a path"));
                }
                parsed.settings.key_file = Some(path);
            }
            "--key-expires-in" => {
                parsed.settings.key_expires_in_s = Some(value(&arg, args.next())?)
            }
            "--quiet" => parsed.verbose = false,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if parsed.settings.key_expires_in_s.is_some() && parsed.settings.key_file.is_none() {
        return Err("--key-expires-in needs --key-file".to_owned());
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let Args {
        listen,
        settings,
        verbose,
    } = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("aoai-emulator: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let lifetime = settings.token_lifetime_s;
    let key_file = settings.key_file.clone();
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
    if let Some(path) = &key_file {
        println!(
            "[emulator] key service: GET /keyservice/key serves {}",
            path.display()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn entra_apps_are_registered_from_the_command_line_each_with_its_secret() {
        let args = parse(&["--entra-app", "bench-client=s3", "--entra-app", "other=s4"])
            .unwrap()
            .unwrap();
        let apps = &args.settings.entra_apps;
        assert_eq!(apps.len(), 2);
        assert_eq!(apps[0].client_id, "bench-client");
        assert_eq!(apps[0].secrets, vec![AppSecret::new("s3")]);
        assert_ne!(apps[0].object_id, apps[1].object_id);
        for bad in ["bench-client", "=s3", "bench-client="] {
            assert!(parse(&["--entra-app", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_service_serves_the_file_named_on_the_command_line() {
        let args = parse(&["--key-file", "/run/keys/aoai"]).unwrap().unwrap();
        assert_eq!(
            args.settings.key_file,
            Some(std::path::PathBuf::from("/run/keys/aoai"))
        );
        assert_eq!(args.settings.key_expires_in_s, None);
        let args = parse(&["--key-expires-in", "300", "--key-file", "k"])
            .unwrap()
            .unwrap();
        assert_eq!(args.settings.key_expires_in_s, Some(300));
        // Without the option there is no key file: the service answers 404.
        assert_eq!(parse(&[]).unwrap().unwrap().settings.key_file, None);
        for bad in [
            &["--key-file"][..],
            &["--key-file", ""],
            &["--key-expires-in", "300"],
            &["--key-file", "k", "--key-expires-in", "soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
