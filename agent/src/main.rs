//! The `agent` binary: parse the command line, set up logging, hand over.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use grapevine_agent::cli::{CaCommand, CertCommand, Cli, Command, EventCommand, KeysCommand, Shell};
use grapevine_agent::config::{self, LogFormat, ProcessEnv};
use grapevine_agent::membership::keyring::KeyAction;
use grapevine_agent::{client, daemon};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        end_quietly_on_a_closed_stdout();
    }
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Keygen => {
            println!("{}", grapevine_agent::membership::keyring::generate_encoded());
            ExitCode::SUCCESS
        }
        Command::Ca(CaCommand::Init { out, cluster }) => {
            report(grapevine_agent::dataplane::pki::ca_init(&out, &cluster).map(|_| {
                println!(
                    "wrote {} and {} (keep the key secret)",
                    out.join("ca.pem").display(),
                    out.join("ca.key").display()
                )
            }))
        }
        Command::Cert(CertCommand::Issue { ca, node, out, force, days }) => {
            report(grapevine_agent::dataplane::pki::cert_issue(&ca, &node, &out, force, days).map(|_| {
                println!(
                    "wrote {} and {}",
                    out.join(format!("{node}.pem")).display(),
                    out.join(format!("{node}.key")).display()
                )
            }))
        }
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "agent", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        other => client_command(other),
    }
}

fn run(args: &grapevine_agent::cli::RunArgs) -> ExitCode {
    let prepared = args
        .to_layer()
        .and_then(|flags| config::load(args.config.as_deref(), &ProcessEnv, flags))
        .map_err(daemon::RunError::from)
        .and_then(daemon::prepare);
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(prepared.config.log_format, &prepared.config.log_level);
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for (name, close) in config::unknown_env_vars(names) {
        let guess = close.map(|c| format!(" (did you mean {c}?)")).unwrap_or_default();
        tracing::warn!("{name} is set, but no setting reads it{guess}; ignored");
    }
    // Every forwarded connection holds sockets; the default soft limit of 1024 files is far
    // below what a sidecar carries. Raise it to the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => {
            tracing::warn!(limit = n, "open-file limit is low; forwarded connections past it will fail")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // One thread: the current-thread scheduler, which runs every task on the thread that polls
    // the reactor, with none of the work-stealing scheduler's bookkeeping on each wake-up.
    let mut builder = match prepared.config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(prepared)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(daemon::RunError::Config(e)) => {
            say_why_it_stopped(&e.to_string());
            ExitCode::from(2)
        }
        Err(daemon::RunError::Runtime(e)) => {
            say_why_it_stopped(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Says once why the daemon stopped: in the log when the log shows this error (so a JSON log
/// keeps it), plainly on stderr when the log filter hides it (`--log-level grapevine_agent=debug`
/// shows nothing from this binary).
fn say_why_it_stopped(why: &str) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{why}");
    } else {
        eprintln!("agent: {why}");
    }
}

/// Lets SIGPIPE end the process, as it ends any Unix tool whose reader went away (`agent status
/// | head -1`), instead of the Rust default of ignoring it, which makes `println!` panic. Only
/// for the commands that print: the daemon writes to sockets, where a closed peer is an error
/// to handle, not a reason to die.
fn end_quietly_on_a_closed_stdout() {
    // SAFETY: setting a signal's disposition to the default touches no memory of this program;
    // it runs before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Exit code 2 for a bad argument (such as a node id the agent would refuse), 1 otherwise.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e:#}");
            if e.downcast_ref::<config::ConfigError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// Crates that log at INFO on every request (hickory-server: two lines per DNS query): they log
/// at `warn` unless the user's filter names them.
const CHATTY_CRATES: [&str; 3] = ["hickory_server", "hickory_proto", "hickory_net"];

/// The user's filter, with `CRATE=warn` added for each chatty crate none of its directives names
/// (a directive naming a crate's parent, such as `hickory=debug`, or one of its modules counts).
fn log_filter(level: &str) -> String {
    let targets: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter_map(|directive| {
            let target = directive.split(['[', '=']).next().unwrap_or_default();
            let bare_level = !directive.contains('=') && target.parse::<tracing::level_filters::LevelFilter>().is_ok();
            (!target.is_empty() && !bare_level).then_some(target)
        })
        .collect();
    let mut directives: Vec<String> =
        level.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::to_string).collect();
    for krate in CHATTY_CRATES {
        if !targets.iter().any(|t| krate.starts_with(t) || t.starts_with(krate)) {
            directives.push(format!("{krate}=warn"));
        }
    }
    directives.join(",")
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn client_command(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = ProcessEnv;
    let result = runtime.block_on(async {
        match &command {
            Command::Status(a) => client::status(a, &env).await,
            Command::Members(a) => client::members(a, &env).await,
            Command::Services(a) => client::services(a, &env).await,
            Command::Route(r) => client::route(&r.service, r.key.as_deref(), &r.client, &env).await,
            Command::Event(EventCommand::Fire { name, payload, client: a }) => {
                client::fire(name, payload.as_deref(), a, &env).await
            }
            Command::Event(EventCommand::Watch { name, client: a }) => client::watch(name.as_deref(), a, &env).await,
            Command::Leave(a) => client::leave(a, &env).await,
            Command::Reload(a) => client::reload(a, &env).await,
            Command::Keys(KeysCommand::List(a)) => client::keys_list(a, &env).await,
            Command::Keys(KeysCommand::Install(k)) => {
                client::keys_change(KeyAction::Install, k, &env, &mut std::io::stdin().lock()).await
            }
            Command::Keys(KeysCommand::Use(k)) => {
                client::keys_change(KeyAction::Use, k, &env, &mut std::io::stdin().lock()).await
            }
            Command::Keys(KeysCommand::Remove(k)) => {
                client::keys_change(KeyAction::Remove, k, &env, &mut std::io::stdin().lock()).await
            }
            Command::Run(_) | Command::Keygen | Command::Completions { .. } | Command::Ca(_) | Command::Cert(_) => {
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e:#}");
            if e.downcast_ref::<client::UsageError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn hickory_logs_warnings_only_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,hickory_server=warn,hickory_proto=warn,hickory_net=warn");
        assert_eq!(log_filter("debug"), "debug,hickory_server=warn,hickory_proto=warn,hickory_net=warn");
        assert_eq!(
            log_filter("info,hickory_server=debug"),
            "info,hickory_server=debug,hickory_proto=warn,hickory_net=warn"
        );
        assert_eq!(log_filter("hickory=trace"), "hickory=trace", "a parent target names them all");
        assert_eq!(
            log_filter("hickory_server::server[request]=debug"),
            "hickory_server::server[request]=debug,hickory_proto=warn,hickory_net=warn",
            "a module of the crate names it"
        );
        assert_eq!(log_filter("hickory_net"), "hickory_net,hickory_server=warn,hickory_proto=warn");
        assert_eq!(log_filter(""), "hickory_server=warn,hickory_proto=warn,hickory_net=warn");
        for level in ["info", "grapevine_agent=debug", "hickory_server=debug", "[span]=trace", ""] {
            assert!(tracing_subscriber::EnvFilter::try_new(log_filter(level)).is_ok(), "{level}");
        }
    }
}
