//! `vram-stand-in`: a stand-in model server for trying and testing the
//! process backend without a GPU. It listens on a port, answers
//! `GET /health` with 503 until it is "loaded" and 200 after, exits on
//! `GET /exit` (or after a delay), and can ignore SIGTERM or fail at start.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// A stand-in model server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Port to listen on (127.0.0.1).
    #[arg(long)]
    port: u16,
    /// Answer /health with 200 only after this many milliseconds.
    #[arg(long, default_value_t = 0)]
    ready_after_ms: u64,
    /// Never answer /health with 200.
    #[arg(long)]
    never_ready: bool,
    /// Print an error to stderr and exit at once (a model that fails to load).
    #[arg(long)]
    fail_at_start: bool,
    /// Exit by itself after this many milliseconds (a crash while serving).
    #[arg(long)]
    exit_after_ms: Option<u64>,
    /// Exit status for --fail-at-start, --exit-after-ms and /exit.
    #[arg(long, default_value_t = 1)]
    exit_code: u8,
    /// Ignore SIGTERM (the manager must fall back to SIGKILL).
    #[arg(long)]
    ignore_sigterm: bool,
    /// Write the process id to this file.
    #[arg(long)]
    pid_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.pid_file
        && let Err(e) = std::fs::write(path, std::process::id().to_string())
    {
        eprintln!("cannot write pid file {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if args.fail_at_start {
        eprintln!("loading model weights...");
        eprintln!("error: out of memory while loading the model");
        return ExitCode::from(args.exit_code);
    }
    if args.ignore_sigterm {
        // SAFETY: installing SIG_IGN has no handler code to be unsafe in.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::SigHandler::SigIgn,
            );
        }
    }
    if let Some(ms) = args.exit_after_ms {
        let code = args.exit_code;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("crashed: segmentation fault (simulated)");
            std::process::exit(code.into());
        });
    }
    let listener = match TcpListener::bind(("127.0.0.1", args.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{}: {e}", args.port);
            return ExitCode::from(2);
        }
    };
    eprintln!("listening on 127.0.0.1:{}, loading model", args.port);
    let started = Instant::now();
    let ready_after = Duration::from_millis(args.ready_after_ms);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut request_line = String::new();
        if BufReader::new(&stream)
            .read_line(&mut request_line)
            .is_err()
        {
            continue;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let ready = !args.never_ready && started.elapsed() >= ready_after;
        let (status, body) = match path {
            "/health" if ready => ("200 OK", "{\"status\":\"ok\"}"),
            "/health" => ("503 Service Unavailable", "{\"status\":\"loading model\"}"),
            "/exit" => ("200 OK", "{\"status\":\"exiting\"}"),
            _ => ("404 Not Found", "{}"),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if path == "/exit" {
            let _ = stream.flush();
            return ExitCode::from(args.exit_code);
        }
    }
    ExitCode::SUCCESS
}
