//! What `vram-manager serve` adds to a request: chat completions against a
//! stand-in model server, straight to it and through `serve` (a lease per
//! request, the answer streamed back), from concurrent clients, in
//! alternating rounds. Prints requests per second and p50/p99 latencies of
//! both, and the difference, twice:
//!
//! - saturated: every client sends its next request as soon as the last
//!   one is answered (the most the pair can do; on a small machine the
//!   latency is mostly the queue for the CPU);
//! - paced: the same clients together send `--rate` requests per second on
//!   a fixed schedule, below what either path can do, so the difference is
//!   the proxy's own cost per request. Latency counts from the moment a
//!   request was due, so a request sent late because the last one was slow
//!   is counted as late (no coordinated omission).
//!
//! ```sh
//! cargo build --release && cargo run --release --example proxy_bench -- --json
//! ```
//!
//! It needs the `vram-manager` and `vram-stand-in` binaries of the same
//! build (`cargo build` puts them beside the examples' directory).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

/// Measures the proxy's own cost.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Requests per round, all clients together.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Rounds of each (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per second, all clients together, of the paced rounds.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// A binary of this build (target/<profile>/NAME).
fn binary(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the example has a path");
    me.parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join(name))
        .expect("examples live in target/<profile>/examples")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Latencies of `requests` chat completions to `url` from `clients`
/// concurrent clients, and the round's wall time. With a `rate`, the
/// clients together send that many a second on a fixed schedule and a
/// latency counts from when its request was due.
async fn round(
    url: &str,
    clients: usize,
    requests: usize,
    rate: Option<u64>,
) -> (Vec<Duration>, Duration) {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (url, body) = (url.to_string(), body.clone());
            let share = requests / clients + usize::from(i < requests % clients);
            actix_rt::spawn(async move {
                let client = awc::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .finish();
                let mut latencies = Vec::with_capacity(share);
                // Client i sends at start + (i + n x clients) / rate.
                let every = rate.map(|r| Duration::from_secs_f64(clients as f64 / r as f64));
                let offset = rate.map(|r| Duration::from_secs_f64(i as f64 / r as f64));
                for n in 0..share {
                    let sent = match (every, offset) {
                        (Some(every), Some(offset)) => {
                            let due = started + offset + every * n as u32;
                            actix_rt::time::sleep_until(due.into()).await;
                            due
                        }
                        _ => Instant::now(),
                    };
                    let mut answer = client.post(&url).send_json(&body).await.expect("an answer");
                    let _ = answer.body().await.expect("a body");
                    assert!(answer.status().is_success(), "{}", answer.status());
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(requests);
    for task in tasks {
        all.extend(task.await.expect("a client finished"));
    }
    (all, started.elapsed())
}

/// Alternating rounds straight to the upstream and through `serve`; the
/// figures of both and the difference.
async fn side_by_side(
    direct_url: &str,
    proxied_url: &str,
    args: &Args,
    rate: Option<u64>,
) -> serde_json::Value {
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    let (mut direct_wall, mut proxied_wall) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..args.rounds {
        let (l, w) = round(direct_url, args.clients, args.requests, rate).await;
        direct.extend(l);
        direct_wall += w;
        let (l, w) = round(proxied_url, args.clients, args.requests, rate).await;
        proxied.extend(l);
        proxied_wall += w;
    }
    direct.sort();
    proxied.sort();
    let rps = |n: usize, wall: Duration| (n as f64 / wall.as_secs_f64()).round();
    let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
    let (p50, p99) = (percentile(&proxied, 50.0), percentile(&proxied, 99.0));
    let ms = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({
        "rate": rate,
        "requests": direct.len(),
        "direct_rps": rps(direct.len(), direct_wall),
        "proxied_rps": rps(proxied.len(), proxied_wall),
        "direct_p50_ms": ms(d50),
        "direct_p99_ms": ms(d99),
        "proxied_p50_ms": ms(p50),
        "proxied_p99_ms": ms(p99),
        "added_p50_ms": ms(p50 - d50),
        "added_p99_ms": ms(p99 - d99),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let args = Args::parse();
    let (upstream, listen) = (free_port(), free_port());
    let settings = format!(
        "[gpu]\nprobe = \"none\"\n[[models]]\nid = \"m\"\nkind = \"llm\"\nvram = \"4GiB\"\nbackend = \"process\"\n\
         command = [\"{}\", \"--port\", \"{upstream}\", \"--name\", \"m\"]\nready = \"http://127.0.0.1:{upstream}/health\"\n",
        binary("vram-stand-in").display()
    );
    let path = std::env::temp_dir().join(format!("proxy-bench-{}.toml", std::process::id()));
    std::fs::write(&path, settings).expect("settings written");
    let _serve = Running(
        Command::new(binary("vram-manager"))
            .args(["serve", path.to_str().expect("a UTF-8 path"), "--listen"])
            .arg(format!("127.0.0.1:{listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vram-manager serve starts"),
    );
    wait_for(listen);
    let json_out = args.json;
    let figures = actix_rt::System::new().block_on(async move {
        let load = format!("http://127.0.0.1:{listen}/api/models/m/load");
        let loaded = awc::Client::default()
            .post(load)
            .send()
            .await
            .expect("loaded");
        assert!(loaded.status().is_success());
        let direct_url = format!("http://127.0.0.1:{upstream}/v1/chat/completions");
        let proxied_url = format!("http://127.0.0.1:{listen}/v1/chat/completions");
        let saturated = side_by_side(&direct_url, &proxied_url, &args, None).await;
        let paced = side_by_side(&direct_url, &proxied_url, &args, Some(args.rate)).await;
        json!({
            "clients": args.clients,
            "saturated": saturated,
            "paced": paced,
        })
    });
    let _ = std::fs::remove_file(&path);
    if json_out {
        println!("{figures}");
    } else {
        for (key, value) in figures.as_object().into_iter().flatten() {
            println!("{key:<16} {value}");
        }
    }
}
