//! The `vram-manager` command: parses arguments, installs tracing, runs one
//! subcommand and maps its outcome to an exit status (0 ok, 1 an
//! expectation failed, 2 bad input).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vram_manager::cli::{self, Outcome};

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
    /// effective capacity, kinds and models.
    CheckConfig {
        /// A settings or scenario file layered over the defaults.
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match args.command {
        Some(Command::CheckConfig { file }) => cli::check_config(file.as_deref()),
        None => cli::check_config(None),
    };
    match outcome {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::Failed(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Outcome::BadInput(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
