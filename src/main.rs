//! The `vram-manager` command: parses arguments, installs tracing, runs one
//! subcommand and maps its outcome to an exit status (0 ok, 1 an
//! expectation failed, 2 bad input, 128 + the signal after SIGINT, SIGTERM
//! or SIGHUP: 130, 143, 129).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Writes one line to stderr, ignoring a failure: with stderr closed or
/// full (`2>&1 | head -1`, `2>/dev/full`) a message that cannot be shown
/// must not turn into a panic and a different exit status.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cli;
mod plot;

use cli::Outcome;

/// Shares one GPU between the models of a voice assistant.
///
/// With no subcommand, runs the built-in voice-assistant scenario.
#[derive(Debug, Parser)]
#[command(name = "vram-manager", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate settings (defaults, FILE, VRAM__* variables) and print the
    /// effective capacity, kinds and models. A scenario file (one with
    /// `steps` or `description`) is checked as `scenario` reads it: its
    /// settings (without VRAM__* variables) and every step; the step count
    /// is printed too.
    CheckConfig {
        /// A settings file, or a scenario file, layered over the defaults.
        file: Option<PathBuf>,
    },
    /// Show what NVML sees (each card's memory and processes), or say that
    /// no NVIDIA driver was found and what will be used instead.
    Gpu {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Serve the models over HTTP: OpenAI-compatible routes proxied to
    /// each model's server under a lease, and a control API. Runs until
    /// SIGINT, SIGTERM or SIGHUP, then stops every model server.
    Serve {
        /// A settings file layered over the defaults.
        file: Option<PathBuf>,
        /// Listen here instead of `server.listen` (e.g. 127.0.0.1:8686).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Run a scenario file and check its expectations: exit 0 when all
    /// hold, 1 when one does not (naming the step), 2 when the file is
    /// invalid.
    Scenario {
        /// The scenario file; the built-in voice-assistant day if omitted.
        file: Option<PathBuf>,
        /// Print one JSON object per step, then a summary line.
        #[arg(long)]
        json: bool,
        /// Also draw VRAM use over the steps to this SVG file.
        #[arg(long, value_name = "OUT.svg")]
        plot: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // The same executable keeps each model server's process tree.
    vram_manager::keeper::run_if_keeper();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped: the subscriber's own
        // report of it would go to the same closed stderr, and panic there.
        .log_internal_errors(false)
        // Colour only for a person at a terminal, never in a file or a pipe.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    // Backend panics are caught and answered as backend_failed; report
    // them as one log line rather than the default hook's backtrace.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
    let outcome = match args.command {
        Some(Command::CheckConfig { file }) => cli::check_config(file.as_deref()),
        Some(Command::Gpu { json }) => cli::gpu_report(json),
        Some(Command::Serve { file, listen }) => cli::serve(file.as_deref(), listen),
        Some(Command::Scenario { file, json, plot }) => {
            cli::scenario(file.as_deref(), json, plot.as_deref())
        }
        None => cli::scenario(None, false, None),
    };
    match outcome {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::Failed(message) => {
            say!("error: {message}");
            ExitCode::from(1)
        }
        Outcome::BadInput(message) => {
            say!("error: {message}");
            ExitCode::from(2)
        }
        Outcome::Interrupted(signal) => {
            say!("stopped by signal {signal}; every model server was stopped");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}
