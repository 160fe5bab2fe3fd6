//! `vram-stand-in`: a stand-in model server for trying and testing the
//! process backend and `serve` without a GPU. It listens on a port,
//! answers `GET /health` with 503 until it is "loaded" and 200 after,
//! answers `POST /v1/chat/completions` with its own name (streamed as
//! server-sent events when the request says `"stream": true`, a chunk every
//! `--chunk-ms`), exits on `GET /exit` (or after a delay), and can ignore
//! SIGTERM or fail at start. Like vLLM's sleep mode it takes `POST /sleep`
//! (`--sleep-ms`) and `POST /wake_up` (`--wake-ms`), tells
//! `GET /is_sleeping`, and refuses chat completions while asleep.

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
    /// The name it answers chat completions with.
    #[arg(long, default_value = "stand-in")]
    name: String,
    /// Chunks of a streamed answer.
    #[arg(long, default_value_t = 3)]
    chunks: u32,
    /// Pause before each chunk of a streamed answer, milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_ms: u64,
    /// How long `POST /sleep` takes, milliseconds.
    #[arg(long, default_value_t = 0)]
    sleep_ms: u64,
    /// How long `POST /wake_up` takes, milliseconds.
    #[arg(long, default_value_t = 0)]
    wake_ms: u64,
    /// Answer `POST /sleep` with 500 (a server whose sleep fails).
    #[arg(long)]
    fail_sleep: bool,
    /// Stream answers with neither a length nor chunked encoding: the
    /// body ends when the server closes the connection (HTTP/1.1 allows
    /// it; some small servers do it).
    #[arg(long)]
    close_delimited: bool,
}

/// Whether the server sleeps (its weights "in host RAM").
static ASLEEP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One HTTP request: method, path and body.
fn read_request(reader: &mut BufReader<std::net::TcpStream>) -> Option<(String, String, String)> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    std::io::Read::read_exact(reader, &mut body).ok()?;
    Some((method, path, String::from_utf8_lossy(&body).into_owned()))
}

/// Answers a chat completion with `name`, streamed when asked. Answers
/// whether the connection stays open.
fn chat(stream: &mut std::net::TcpStream, body: &str, args: &Args) -> bool {
    let streamed = body.replace(' ', "").contains("\"stream\":true");
    if !streamed {
        let answer = format!(
            "{{\"object\":\"chat.completion\",\"model\":\"{0}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"hello from {0}\"}}}}]}}",
            args.name
        );
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        return true;
    }
    if args.close_delimited {
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        );
        for i in 0..args.chunks {
            std::thread::sleep(Duration::from_millis(args.chunk_ms));
            let _ = write!(stream, "data: {{\"content\":\"{i} \"}}\n\n");
        }
        let _ = write!(stream, "data: [DONE]\n\n");
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return false;
    }
    // Chunked, as llama-server streams: each event is one chunk.
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut send = |data: &str| {
        let chunk = format!("{:x}\r\n{data}\r\n", data.len());
        stream
            .write_all(chunk.as_bytes())
            .and_then(|()| stream.flush())
    };
    for i in 0..args.chunks {
        std::thread::sleep(Duration::from_millis(args.chunk_ms));
        let chunk = format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"model\":\"{}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{i} \"}}}}]}}\n\n",
            args.name
        );
        if send(&chunk).is_err() {
            return false;
        }
    }
    let _ = send("data: [DONE]\n\n");
    send("").is_ok()
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
    let args = std::sync::Arc::new(args);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Answers go out as written (no 40 ms Nagle stall on a kept-alive
        // connection).
        let _ = stream.set_nodelay(true);
        let args = args.clone();
        // One thread per connection: a slow streamed answer does not hold
        // the health check back.
        std::thread::spawn(move || {
            let Ok(reading) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(reading);
            // Chat completions keep the connection alive, as model servers
            // do; anything else answers and closes.
            let (path, _) = loop {
                let Some((method, path, body)) = read_request(&mut reader) else {
                    return;
                };
                if method == "POST"
                    && path == "/v1/chat/completions"
                    && !ASLEEP.load(std::sync::atomic::Ordering::SeqCst)
                {
                    if chat(&mut stream, &body, &args) {
                        continue;
                    }
                    return;
                }
                break (path, body);
            };
            let ready = !args.never_ready && started.elapsed() >= ready_after;
            let route = path.split('?').next().unwrap_or_default();
            let asleep = || ASLEEP.load(std::sync::atomic::Ordering::SeqCst);
            // A refusal of its own, in plain text, as a server may answer
            // a bad request: a proxy must pass it on unchanged.
            let plain = match route {
                "/plain-400" => Some("400 Bad Request"),
                "/plain-413" => Some("413 Payload Too Large"),
                _ => None,
            };
            if let Some(status) = plain {
                let body = "the model server's own refusal";
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return;
            }
            let (status, body) = match route {
                "/sleep" if args.fail_sleep => {
                    ("500 Internal Server Error", "{\"error\":\"cannot sleep\"}")
                }
                "/sleep" => {
                    std::thread::sleep(Duration::from_millis(args.sleep_ms));
                    ASLEEP.store(true, std::sync::atomic::Ordering::SeqCst);
                    eprintln!("asleep: weights moved to host memory");
                    ("200 OK", "{\"status\":\"asleep\"}")
                }
                "/wake_up" => {
                    std::thread::sleep(Duration::from_millis(args.wake_ms));
                    ASLEEP.store(false, std::sync::atomic::Ordering::SeqCst);
                    eprintln!("awake: weights back on the card");
                    ("200 OK", "{\"status\":\"awake\"}")
                }
                "/is_sleeping" if asleep() => ("200 OK", "{\"is_sleeping\":true}"),
                "/is_sleeping" => ("200 OK", "{\"is_sleeping\":false}"),
                "/v1/chat/completions" => ("503 Service Unavailable", "{\"error\":\"asleep\"}"),
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
                std::process::exit(args.exit_code.into());
            }
        });
    }
    ExitCode::SUCCESS
}
