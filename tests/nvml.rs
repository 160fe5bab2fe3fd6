//! The NVML code path for real, on machines without a GPU: `nvml-stub` (a
//! `libnvidia-ml.so.1` of this workspace over a scripted JSON state) is
//! loaded by `nvml-wrapper` through `LD_LIBRARY_PATH`, exactly as the
//! driver's library is. Checked: the device list, `probe = "nvml"`,
//! `total = "auto"`, a device by UUID, other processes' use respected in
//! planning, memory coming back after an eviction, a card that fails
//! mid-run, and two cards placed by what each shows.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{GIB, free_port, outcome, temp_file, wait_listening};
use serde_json::{Value, json};

const MANAGER: &str = env!("CARGO_BIN_EXE_vram-manager");
const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");

/// A folder holding the stub as `libnvidia-ml.so.1`, built once (by cargo,
/// into this build's target folder) for all tests.
fn stub_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // target/<profile>/deps/<this test> -> target/<profile>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let release = profile_dir.ends_with("release");
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "nvml-stub"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            build.arg("--release");
        }
        let built = build.status().expect("cargo runs");
        assert!(built.success(), "cargo build -p nvml-stub failed");
        let lib = profile_dir.join("libnvml_stub.so");
        assert!(lib.exists(), "{} was not built", lib.display());
        let dir = std::env::temp_dir().join(format!("nvml-stub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("libnvidia-ml.so.1");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link).unwrap();
        dir
    })
}

/// A card of the scripted state.
fn card(name: &str, uuid: &str, total: u64, used: u64, processes: Value) -> Value {
    json!({"name": name, "uuid": uuid, "total": total, "used": used, "processes": processes})
}

/// Writes the scripted state (atomically: the stub may read it any time).
fn script(path: &Path, cards: &[Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "cards": cards }).to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// `vram-manager ARGS` with the stub as the driver's library.
fn with_stub(state: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(MANAGER)
        .args(args)
        .env("LD_LIBRARY_PATH", stub_dir())
        .env("VRAM_NVML_STUB", state)
        .output()
        .unwrap();
    outcome(&output)
}

#[test]
fn gpu_lists_every_card_the_library_reports() {
    let state = temp_file("nvml-two.json", "");
    script(
        &state,
        &[
            card(
                "Stub A",
                "GPU-aaaa",
                16 * GIB,
                2 * GIB,
                json!([{"pid": 4242, "used": GIB}, {"pid": 4343}]),
            ),
            card("Stub B", "GPU-bbbb", 8 * GIB, 0, json!([])),
        ],
    );
    let (code, out, err) = with_stub(&state, &["gpu", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["nvml"], true, "{out}");
    let devices = report["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{out}");
    assert_eq!(devices[0]["uuid"], "GPU-aaaa");
    assert_eq!(devices[0]["free"], 14 * GIB);
    assert_eq!(
        devices[0]["processes"],
        json!([{"pid": 4242, "used": GIB}, {"pid": 4343, "used": null}])
    );
    assert_eq!(
        (devices[1]["index"].as_u64(), devices[1]["total"].as_u64()),
        (Some(1), Some(8 * GIB))
    );
}

#[test]
fn nvml_total_auto_and_a_device_by_uuid() {
    let state = temp_file("nvml-uuid.json", "");
    script(
        &state,
        &[
            card("Stub A", "GPU-aaaa", 16 * GIB, 0, json!([])),
            card("Stub B", "GPU-bbbb", 8 * GIB, 0, json!([])),
        ],
    );
    let settings = temp_file(
        "nvml-uuid.toml",
        "[gpu]\nprobe = \"nvml\"\ntotal = \"auto\"\ndevice = \"GPU-bbbb\"\nreserve = \"1GiB\"\n",
    );
    let (code, out, err) = with_stub(&state, &["check-config", settings.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("NVML device GPU-bbbb") && out.contains(&format!("({} bytes)", 7 * GIB)),
        "{out}"
    );
    // A UUID the library does not know is refused, naming the setting
    // (its total is read from the card, so the card is asked).
    let wrong = temp_file(
        "nvml-wrong.toml",
        "[gpu]\nprobe = \"nvml\"\ntotal = \"auto\"\ndevice = \"GPU-cccc\"\n",
    );
    let (code, _, err) = with_stub(&state, &["check-config", wrong.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gpu."), "{err}");
}

/// A running `serve` with the stub as the driver's library; its stderr
/// goes to a file. Stopped (SIGTERM) when dropped.
struct Serve {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

impl Serve {
    fn start(name: &str, state: &Path, settings: &str) -> Self {
        let path = temp_file(&format!("nvml-{name}.toml"), settings);
        let log = std::env::temp_dir().join(format!("nvml-{name}-{}.log", std::process::id()));
        let port = free_port();
        let child = Command::new(MANAGER)
            .args(["serve", path.to_str().unwrap(), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("LD_LIBRARY_PATH", stub_dir())
            .env("VRAM_NVML_STUB", state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_listening(port, "serve");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POST /api/models/{model}/{what}: status and body.
    async fn post(&self, model: &str, what: &str) -> (u16, Value) {
        let (status, body) = post(format!("{}/api/models/{model}/{what}", self.base)).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn status(&self) -> Value {
        let mut answer = awc::Client::default()
            .get(format!("{}/api/status", self.base))
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&answer.body().await.unwrap()).unwrap()
    }
}

/// A stand-in model server of `gib` GiB on the NVML card, ready after
/// `ready_ms`.
fn server(id: &str, gib: u64, ready_ms: u64) -> String {
    let port = free_port();
    format!(
        "[[models]]\nid = \"{id}\"\nkind = \"llm\"\nvram = \"{gib}GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\", \"--ready-after-ms\", \"{ready_ms}\"]\n\
         ready = \"http://127.0.0.1:{port}/health\"\n"
    )
}

/// `POST url` with an empty body: status and body text.
async fn post(url: String) -> (u16, String) {
    let mut answer = awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish()
        .post(url)
        .send()
        .await
        .unwrap();
    let body = answer.body().await.unwrap();
    (
        answer.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Spawns `POST /api/models/{model}/load`; answers status and body.
fn spawn_load(base: &str, model: &str) -> actix_rt::task::JoinHandle<(u16, String)> {
    actix_rt::spawn(post(format!("{base}/api/models/{model}/load")))
}

/// Waits (up to 20 s) until `/api/status` satisfies `done`.
async fn until(serve: &Serve, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = serve.status().await;
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {status}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state of `model` in a status report.
fn state_of(status: &Value, model: &str) -> String {
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .map(|m| m["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

const NVML_CARD: &str = "[gpu]\nprobe = \"nvml\"\ntotal = \"auto\"\nrelease_timeout = \"60s\"\n";

#[actix_rt::test]
async fn other_processes_use_is_respected_and_a_failing_card_is_survived() {
    let state = temp_file("nvml-others.json", "");
    let others = |used: u64| {
        card(
            "Stub",
            "GPU-aaaa",
            16 * GIB,
            used,
            json!([{"pid": 9999, "used": used}]),
        )
    };
    script(&state, &[others(10 * GIB)]);
    let serve = Serve::start(
        "others",
        &state,
        &format!(
            "{NVML_CARD}{}{}",
            server("big", 8, 0),
            server("small", 2, 0)
        ),
    );
    // 16 GiB on the ledger, but another process holds 10: 8 do not fit.
    let (code, body) = serve.post("big", "load").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_vram", "{body}");
    // The other process leaves: now it fits.
    script(&state, &[others(GIB)]);
    let (code, body) = serve.post("big", "load").await;
    assert_eq!(code, 200, "{body}");
    // The card fails: the manager goes on with its ledger, warning.
    let mut lost = others(GIB);
    lost["fail"] = json!("gpu_lost");
    script(&state, &[lost]);
    let (code, body) = serve.post("small", "load").await;
    assert_eq!(code, 200, "{body}");
    let status = serve.status().await;
    let resident: Vec<&str> = status["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "resident")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(resident, ["big", "small"], "{status}");
    let log = serve.log();
    assert!(log.contains("could not read the card"), "{log}");
    assert!(!log.contains("panic"), "{log}");
}

#[actix_rt::test]
async fn a_load_waits_until_the_card_shows_the_evicted_memory_back() {
    let state = temp_file("nvml-release.json", "");
    let ours = |used: u64| card("Stub", "GPU-aaaa", 16 * GIB, used, json!([]));
    script(&state, &[ours(0)]);
    let serve = Serve::start(
        "release",
        &state,
        &format!(
            "{NVML_CARD}{}{}",
            server("first", 8, 500),
            server("second", 9, 0)
        ),
    );
    // While the first model's server starts, it takes its 8 GiB on the
    // card: the load measures it.
    let first = spawn_load(&serve.base, "first");
    until(&serve, "loading first", |s| {
        state_of(s, "first") == "loading"
    })
    .await;
    script(&state, &[ours(8 * GIB)]);
    let (code, body) = first.await.unwrap();
    assert_eq!(code, 200, "{body}");
    let status = serve.status().await;
    let measured = status["models"][0]["measured"].as_u64();
    assert_eq!(measured, Some(8 * GIB), "{status}");
    // The second needs the first's room: evicted, but the card does not
    // show the memory back yet, so the load waits.
    let second = spawn_load(&serve.base, "second");
    until(&serve, "evicting first", |s| {
        state_of(s, "first") == "unloaded" && s["running"] == true
    })
    .await;
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the load did not wait for the memory"
    );
    // The driver gives the memory back: the load goes on.
    script(&state, &[ours(0)]);
    let (code, body) = second.await.unwrap();
    assert_eq!(code, 200, "{body}");
    let log = serve.log();
    assert!(!log.contains("not returned in time"), "{log}");
}

#[actix_rt::test]
async fn two_cards_each_read_through_nvml() {
    // Card 0 by index (16 GiB, another process holds 12), card 1 by UUID
    // (24 GiB, free). Both totals come from NVML.
    let state = temp_file("nvml-two-cards.json", "");
    script(
        &state,
        &[
            card(
                "Stub A",
                "GPU-aaaa",
                16 * GIB,
                12 * GIB,
                json!([{"pid": 4242, "used": 12 * GIB}]),
            ),
            card("Stub B", "GPU-bbbb", 24 * GIB, 0, json!([])),
        ],
    );
    let cards = "[gpu]\nprobe = \"nvml\"\nrelease_timeout = \"60s\"\n\
                 [[gpus]]\ndevice = \"0\"\ntotal = \"auto\"\n\
                 [[gpus]]\ndevice = \"GPU-bbbb\"\ntotal = \"auto\"\nreserve = \"1GiB\"\n";
    let settings = temp_file("nvml-two-cards.toml", cards);
    let (code, out, err) = with_stub(&state, &["check-config", settings.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "card 0: NVML device 0; capacity 16.0 GiB ({} bytes)",
            16 * GIB
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "card 1: NVML device GPU-bbbb; capacity 23.0 GiB ({} bytes)",
            23 * GIB
        )),
        "{out}"
    );
    // A 6 GiB server may go to either card. By the ledgers card 0 is the
    // best fit (10 GiB left against 17), but the card shows only 4 GiB
    // free: placement plans against each card, so it lands on card 1.
    let serve = Serve::start(
        "two-cards",
        &state,
        &format!("{cards}{}", server("llm", 6, 0)),
    );
    let (code, body) = serve.post("llm", "load").await;
    assert_eq!(code, 200, "{body}");
    let status = serve.status().await;
    let llm = status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "llm")
        .unwrap()
        .clone();
    assert_eq!(llm["gpu"], 1, "{status}");
    assert_eq!(status["gpus"].as_array().map(Vec::len), Some(2), "{status}");
    assert_eq!(status["gpus"][1]["capacity"], 23 * GIB, "{status}");
}
