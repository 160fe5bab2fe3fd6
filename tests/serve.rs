//! `vram-manager serve` over real HTTP: the control API, errors as JSON
//! with their statuses, requests proxied to stand-in model servers under a
//! lease (a streamed answer is never cut by an eviction), the token, the
//! loopback rule, and SIGTERM stopping every model server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, temp_file, terminate, wait_listening};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const MANAGER: &str = env!("CARGO_BIN_EXE_vram-manager");
const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");

/// A running `serve`, killed when dropped (a failing test leaves nothing);
/// its stderr goes to a file, printed if the test fails.
struct Serve {
    child: Child,
    base: String,
    /// The mark in the environment of its model servers.
    mark: String,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- serve's stderr ({}):\n{log}", self.log.display());
        }
    }
}

/// Settings: a simulated ASR and two stand-in LLM servers that do not fit
/// together on the 16 GiB card.
fn settings(mark: &str, extra: &str) -> String {
    let (a, b) = (free_port(), free_port());
    let llm = |id: &str, port: u16, gib: u64, args: &str| {
        format!(
            "[[models]]\nid = \"{id}\"\nkind = \"llm\"\nvram = \"{gib}GiB\"\nbackend = \"process\"\n\
             command = [\"{STAND_IN}\", \"--port\", \"{port}\", \"--name\", \"{id}\"{args}]\n\
             ready = \"http://127.0.0.1:{port}/health\"\nenv = {{ VRAM_TEST_MARK = \"{mark}\" }}\n"
        )
    };
    format!(
        "[gpu]\nprobe = \"none\"\ntotal = \"16GiB\"\n{extra}\n\
         [[models]]\nid = \"whisper\"\nkind = \"asr\"\nvram = \"3GiB\"\n{}{}",
        llm(
            "llm-a",
            a,
            8,
            ", \"--chunks\", \"5\", \"--chunk-ms\", \"100\""
        ),
        llm("llm-b", b, 10, "")
    )
}

/// Starts `serve` on `path` and waits (up to 10 s) for `/health`.
fn serve(path: &Path) -> Serve {
    let port = free_port();
    let log = path.with_extension("log");
    let child = Command::new(MANAGER)
        .args(["serve", path.to_str().unwrap(), "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let serving = Serve {
        child,
        base: format!("http://127.0.0.1:{port}"),
        mark: String::new(),
        log,
    };
    wait_listening(port, "serve");
    serving
}

/// `serve` on the settings of [`settings`] with `extra`, its model servers
/// marked for test `name`.
fn start(name: &str, extra: &str) -> Serve {
    let mark = format!("serve-{name}-{}", std::process::id());
    let path = temp_file(&format!("serve-{name}.toml"), &settings(&mark, extra));
    let mut serving = serve(&path);
    serving.mark = mark;
    serving
}

/// The status and JSON body of a request.
async fn call(method: &str, url: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut request = client.request(method.parse().unwrap(), url);
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut response = match body {
        Some(body) => request.send_json(&body).await.unwrap(),
        None => request.send().await.unwrap(),
    };
    let bytes = response.body().limit(1 << 20).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (response.status().as_u16(), value)
}

/// The leases held on `model` now (`None`: it holds no VRAM).
async fn leases_of(base: &str, model: &str) -> Option<u64> {
    let (_, report) = call("GET", &format!("{base}/api/status"), None, None).await;
    report["models"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == model)
        .and_then(|m| m["leases"].as_u64())
}

/// Waits (up to 10 s, asking every 20 ms) until `model` holds `leases`.
async fn until_leases(base: &str, model: &str, leases: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases_of(base, model).await != Some(leases) {
        assert!(Instant::now() < deadline, "{what}");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs `body` to `/v1/chat/completions`.
async fn post_chat(base: &str, body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{base}/v1/chat/completions"),
        Some(body),
        None,
    )
    .await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[actix_rt::test]
async fn the_control_api_and_the_proxy_answer_as_documented() {
    let s = start("api", "");
    let base = &s.base;

    assert_eq!(
        call("GET", &format!("{base}/health"), None, None).await,
        (200, json!({"status": "ok"}))
    );
    let (status, models) = call("GET", &format!("{base}/v1/models"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llm-a", "llm-b", "whisper"]);
    assert_eq!(models["data"][2]["state"], "unloaded");

    let (status, error) = call("POST", &format!("{base}/api/models/nope/load"), None, None).await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "unknown_model");
    let (status, loaded) = call(
        "POST",
        &format!("{base}/api/models/whisper/load"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        loaded,
        json!({"model": "whisper", "evicted": [], "already_resident": false})
    );

    // A chat completion loads its model and is answered by its server.
    let (status, answer) = post_chat(base, chat("llm-b")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "hello from llm-b"
    );
    // Its lease ended with the answer.
    let (_, report) = call("GET", &format!("{base}/api/status"), None, None).await;
    let llm_b = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "llm-b")
        .unwrap()
        .clone();
    assert_eq!(
        (llm_b["state"].as_str(), llm_b["leases"].as_u64()),
        (Some("resident"), Some(0))
    );
    assert!(report["idle_ms"]["llm-b"].as_u64().is_some(), "{report}");
    assert!(llm_b["idle_s"].as_f64().is_some(), "{report}");
    assert!(report["card"].is_null(), "no probe, no card view: {report}");
    assert_eq!(report["order"], "strict", "{report}");
    assert_eq!(llm_b["gpu"], 0, "{report}");
    assert_eq!(report["gpus"][0]["gpu"], 0, "{report}");
    assert_eq!(report["gpus"].as_array().map(Vec::len), Some(1), "{report}");
    assert!(
        llm_b.get("p_soon").is_none(),
        "scores only under adaptive: {report}"
    );
    // Every configured model is listed, those not on the card as unloaded.
    let listed: Vec<(&str, &str)> = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["state"].as_str().unwrap()))
        .collect();
    assert!(listed.contains(&("llm-a", "unloaded")), "{report}");
    assert!(listed.contains(&("whisper", "resident")), "{report}");

    // Bad requests name what is wrong.
    let (status, error) = post_chat(base, json!({"messages": []})).await;
    assert_eq!(status, 400);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"model\""),
        "{error}"
    );
    let (status, error) = post_chat(base, chat("whisper")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("no_upstream"))
    );

    let (status, unloaded) = call(
        "POST",
        &format!("{base}/api/models/llm-b/unload"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(unloaded, json!({"model": "llm-b", "was_resident": true}));
}

#[actix_rt::test]
async fn a_streamed_answer_is_never_cut_by_an_eviction() {
    let s = start("stream", "");
    let base = s.base.clone();
    // llm-a streams 5 chunks, 100 ms apart.
    let streamed = actix_rt::spawn({
        let base = base.clone();
        async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish();
            let mut body = json!({"model": "llm-a", "stream": true});
            body["messages"] = json!([]);
            let mut response = client
                .post(format!("{base}/v1/chat/completions"))
                .send_json(&body)
                .await
                .unwrap();
            let text = response.body().limit(1 << 20).await.unwrap();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(&text).into_owned(),
            )
        }
    });
    // Wait until llm-a is leased by that request.
    until_leases(
        &base,
        "llm-a",
        1,
        "the streamed request never got its lease",
    )
    .await;
    // llm-b needs llm-a's room: refused while the answer streams.
    let (status, error) = post_chat(&base, chat("llm-b")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("insufficient_vram"))
    );
    let (status, text) = streamed.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(text.matches("data: {").count(), 5, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Once the answer has ended, llm-b evicts llm-a.
    let (status, answer) = post_chat(&base, chat("llm-b")).await;
    assert_eq!(status, 200, "{answer}");
    let (_, models) = call("GET", &format!("{base}/v1/models"), None, None).await;
    assert_eq!(models["data"][0]["state"], "unloaded", "{models}");
}

#[actix_rt::test]
async fn a_token_guards_everything_but_health() {
    let s = start("token", "[server]\ntoken = \"sekrit\"");
    let base = &s.base;
    assert_eq!(
        call("GET", &format!("{base}/health"), None, None).await.0,
        200
    );
    let (status, error) = call("GET", &format!("{base}/api/status"), None, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        call("GET", &format!("{base}/api/status"), None, Some("wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        call("GET", &format!("{base}/api/status"), None, Some("sekrit"))
            .await
            .0,
        200
    );
}

#[test]
fn off_loopback_without_a_token_is_refused() {
    let path = temp_file("serve-open.toml", "");
    let output = Command::new(MANAGER)
        .args(["serve", path.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("server.token"), "{err}");
}

#[actix_rt::test]
async fn sigterm_stops_every_model_server() {
    let mut s = start("sigterm", "");
    let (status, _) = call(
        "POST",
        &format!("{}/api/models/llm-b/load", s.base),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    kill(Pid::from_raw(s.child.id() as i32), Signal::SIGTERM).unwrap();
    let code = s.child.wait().unwrap().code();
    assert_eq!(code, Some(143));
    assert!(
        common::marked(&s.mark).is_empty(),
        "a model server outlived serve"
    );
}

#[actix_rt::test]
async fn events_stream_in_order_and_leases_live_by_their_ttl() {
    use futures::StreamExt;
    let s = start("events", "");
    let base = s.base.clone();
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut events = client
        .get(format!("{base}/api/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);

    // A lease of the HTTP API loads the model and holds it.
    let (status, lease) = call(
        "POST",
        &format!("{base}/api/leases"),
        Some(json!({"model": "whisper", "ttl": "30s"})),
        None,
    )
    .await;
    assert_eq!(status, 201, "{lease}");
    assert_eq!(
        (lease["model"].as_str(), lease["expires_in_s"].as_f64()),
        (Some("whisper"), Some(30.0))
    );
    let id = lease["lease"].as_str().unwrap().to_string();
    assert_eq!(leases_of(&base, "whisper").await, Some(1));
    assert_eq!(
        call("POST", &format!("{base}/api/leases/{id}/renew"), None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call("DELETE", &format!("{base}/api/leases/{id}"), None, None)
            .await
            .0,
        204
    );
    assert_eq!(leases_of(&base, "whisper").await, Some(0));
    let (status, error) = call("DELETE", &format!("{base}/api/leases/{id}"), None, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("unknown_lease"))
    );
    // ttl is required and bounded.
    for body in [
        json!({"model": "whisper"}),
        json!({"model": "whisper", "ttl": "2h"}),
    ] {
        assert_eq!(
            call("POST", &format!("{base}/api/leases"), Some(body), None)
                .await
                .0,
            400
        );
    }
    // A lease not renewed is released by the server.
    let (status, _) = call(
        "POST",
        &format!("{base}/api/leases"),
        Some(json!({"model": "whisper", "ttl": "300ms"})),
        None,
    )
    .await;
    assert_eq!(status, 201);
    until_leases(&base, "whisper", 0, "the lease never expired").await;

    // The events of all that, in order.
    let mut text = String::new();
    while !text.contains("event: loaded") {
        let chunk = events
            .next()
            .await
            .expect("the event stream stays open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let loading = text.find("event: loading").expect("loading came first");
    let loaded = text.find("event: loaded").unwrap();
    assert!(loading < loaded, "{text}");
    assert!(text.contains("\"model\":\"whisper\""), "{text}");
}

#[actix_rt::test]
async fn a_transcription_names_its_model_in_a_multipart_field() {
    let s = start("multipart", "");
    let client = awc::Client::default();
    let multipart = |fields: &str| {
        client
            .post(format!("{}/v1/audio/transcriptions", s.base))
            .insert_header(("Content-Type", "multipart/form-data; boundary=XyZ"))
            .send_body(fields.to_string())
    };
    let with_model = "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
                      --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XyZ--\r\n";
    let mut answer = multipart(with_model).await.unwrap();
    // The field was read: whisper is known, but has no server to forward to.
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        (answer.status().as_u16(), body["error"]["code"].as_str()),
        (404, Some("no_upstream"))
    );
    let without =
        "--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nRIFF\r\n--XyZ--\r\n";
    assert_eq!(multipart(without).await.unwrap().status().as_u16(), 400);
}

#[actix_rt::test]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let s = start("metrics", "");
    let base = &s.base;
    assert_eq!(post_chat(base, chat("llm-b")).await.0, 200);
    assert_eq!(
        call("POST", &format!("{base}/api/models/nope/load"), None, None)
            .await
            .0,
        404
    );
    let mut response = awc::Client::default()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = String::from_utf8(response.body().await.unwrap().to_vec()).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("vram_manager_capacity_bytes", &[]),
        Some((16u64 << 30) as f64),
        "{text}"
    );
    assert_eq!(
        value("vram_manager_used_bytes", &[]),
        Some((10u64 << 30) as f64),
        "{text}"
    );
    // The same per card, labelled with its position.
    assert_eq!(
        value("vram_manager_gpu_used_bytes", &[("gpu", "0")]),
        Some((10u64 << 30) as f64),
        "{text}"
    );
    assert_eq!(
        value(
            "vram_manager_model_on_gpu",
            &[("model", "llm-b"), ("gpu", "0")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "vram_manager_model_resident",
            &[("model", "llm-b"), ("kind", "llm")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("vram_manager_model_resident", &[("model", "llm-a")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value("vram_manager_model_leases", &[("model", "llm-b")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(
            "vram_manager_loads_total",
            &[("model", "llm-b"), ("result", "ok")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("vram_manager_load_duration_seconds_bucket"),
        "{text}"
    );
}

#[actix_rt::test]
async fn a_client_that_goes_away_releases_its_lease() {
    use std::io::{Read, Write};
    let s = start("gone", "");
    let base = s.base.clone();
    let address = base.trim_start_matches("http://").to_string();
    // A streamed answer (5 chunks, 100 ms apart), left after its first bytes.
    let body = r#"{"model":"llm-a","stream":true,"messages":[]}"#;
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = socket.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(socket);
    until_leases(&base, "llm-a", 0, "the lease outlived its client").await;
}

#[actix_rt::test]
async fn errors_map_to_their_http_statuses() {
    let extra = "[server]\nmax_body = \"1KiB\"\n[[models]]\nid = \"huge\"\nkind = \"llm\"\nvram = \"20GiB\"\n\
                 [[models]]\nid = \"dead-end\"\nkind = \"tts\"\nvram = \"1GiB\"\nproxy = \"http://127.0.0.1:1\"\n";
    let s = start("errors", extra);
    let base = &s.base;
    let (status, error) = call("POST", &format!("{base}/api/models/huge/load"), None, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("exceeds_capacity"))
    );
    // The model loads, its server does not answer.
    let (status, error) = post_chat(base, chat("dead-end")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (502, Some("backend_failed"))
    );
    let mut big = chat("llm-b");
    big["padding"] = json!("x".repeat(2048));
    let (status, error) = call(
        "POST",
        &format!("{base}/v1/chat/completions"),
        Some(big),
        None,
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
}

/// The text of `GET url`, with its content type.
async fn page(url: &str) -> (u16, String, String) {
    let mut answer = awc::Client::default().get(url).send().await.unwrap();
    let kind = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = answer.body().limit(1 << 20).await.unwrap();
    (
        answer.status().as_u16(),
        kind,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[actix_rt::test]
async fn the_dashboard_is_served_and_uses_only_this_server() {
    let s = start("dashboard", "[server]\ntoken = \"sekrit\"");
    // The page holds no data: it is served without the token (it asks for
    // it), while the API still wants it.
    let (status, kind, html) = page(&format!("{}/", s.base)).await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/html"), "{kind}");
    assert_eq!(html, vram_manager::serve::DASHBOARD);
    assert_eq!(
        call("GET", &format!("{}/api/status", s.base), None, None)
            .await
            .0,
        401
    );
    // Same origin only: no absolute URL anywhere, and every request it
    // makes goes to this server's API.
    for foreign in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(//",
        "@import",
    ] {
        assert!(!html.contains(foreign), "the page refers to {foreign}");
    }
    let requested: Vec<&str> = html
        .split("api(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert!(!requested.is_empty());
    assert!(
        requested.iter().all(|path| path.starts_with("/api/")),
        "{requested:?}"
    );
    // What it shows: every model with its tier, pins that the page sets.
    let (code, pinned) = call(
        "POST",
        &format!("{}/api/models/llm-a/pin", s.base),
        None,
        Some("sekrit"),
    )
    .await;
    assert_eq!(
        (code, pinned),
        (200, json!({"model": "llm-a", "pinned": true}))
    );
    let (_, report) = call(
        "GET",
        &format!("{}/api/status", s.base),
        None,
        Some("sekrit"),
    )
    .await;
    let llm_a = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "llm-a")
        .unwrap();
    assert_eq!(
        (&llm_a["state"], &llm_a["pinned"], &llm_a["priority"]),
        (&json!("unloaded"), &json!(true), &json!(0))
    );
    assert_eq!(report["reserve"], 0);
    let (code, error) = call(
        "POST",
        &format!("{}/api/models/nope/unpin", s.base),
        None,
        Some("sekrit"),
    )
    .await;
    assert_eq!(
        (code, error["error"]["code"].as_str()),
        (404, Some("unknown_model"))
    );
}

#[actix_rt::test]
async fn status_shows_the_adaptive_scores() {
    let s = start("adaptive", "[policy]\norder = \"adaptive\"");
    let base = &s.base;
    let (code, _) = call(
        "POST",
        &format!("{base}/api/models/whisper/load"),
        None,
        None,
    )
    .await;
    assert_eq!(code, 200);
    let (_, report) = call("GET", &format!("{base}/api/status"), None, None).await;
    assert_eq!(report["order"], "adaptive", "{report}");
    let models = report["models"].as_array().unwrap();
    let whisper = models.iter().find(|m| m["id"] == "whisper").unwrap();
    let p = whisper["p_soon"]
        .as_f64()
        .expect("a resident model has p_soon");
    assert!((0.0..=1.0).contains(&p), "{report}");
    let value = whisper["value"].as_f64().unwrap();
    assert!(
        (value - 3.0 * (1u64 << 30) as f64 * (p + 1e-9)).abs() < 1.0,
        "{report}"
    );
    let unloaded = models.iter().find(|m| m["id"] == "llm-a").unwrap();
    assert!(unloaded.get("p_soon").is_none(), "{report}");
}

#[actix_rt::test]
async fn an_answer_that_ends_at_close_is_refused_not_forwarded_empty() {
    // A server that streams with neither a length nor chunked encoding
    // (the body ends when it closes the connection).
    let port = free_port();
    let mark = format!("serve-close-{}", std::process::id());
    let extra = format!(
        "[[models]]\nid = \"llm-close\"\nkind = \"llm\"\nvram = \"2GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\", \"--name\", \"llm-close\", \"--close-delimited\"]\n\
         ready = \"http://127.0.0.1:{port}/health\"\nenv = {{ VRAM_TEST_MARK = \"{mark}\" }}\n"
    );
    let s = start("close", &extra);
    // An answer with a length goes through.
    let (status, answer) = post_chat(&s.base, chat("llm-close")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "hello from llm-close"
    );
    // One that ends at close would arrive empty: refused, naming why.
    let mut streamed = chat("llm-close");
    streamed["stream"] = json!(true);
    let (status, error) = post_chat(&s.base, streamed).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (502, Some("backend_failed")),
        "{error}"
    );
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Content-Length"), "{message}");
    until_leases(
        &s.base,
        "llm-close",
        0,
        "the lease outlived the refused answer",
    )
    .await;
}

/// A client that sends `Expect: 100-continue` (curl does for a body over
/// 1 MiB, such as a recording) gets its answer: the proxy has read the body
/// already, so the header is not passed to a model server that would never
/// answer it with a 100 of its own.
#[actix_rt::test]
async fn a_request_that_expects_100_continue_is_answered() {
    use std::io::{Read, Write};
    let s = start("expect", "[server]\nupstream_timeout = \"20s\"");
    let address = s.base.trim_start_matches("http://").to_string();
    let body = chat("llm-b").to_string();
    let answer = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert!(
            String::from_utf8_lossy(&interim).starts_with("HTTP/1.1 100"),
            "{}",
            String::from_utf8_lossy(&interim)
        );
        stream.write_all(body.as_bytes()).unwrap();
        let mut rest = String::new();
        let _ = stream.read_to_string(&mut rest);
        rest
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("llm-b"), "{answer}");
}

/// A lease of the HTTP API ends with its model: once the model's server
/// has died, renewing the lease answers `unknown_lease` instead of
/// promising protection for a model that is gone.
#[actix_rt::test]
async fn a_lease_ends_when_its_model_server_dies() {
    let s = start("lease-crash", "");
    let base = &s.base;
    let (status, lease) = call(
        "POST",
        &format!("{base}/api/leases"),
        Some(json!({"model": "llm-b", "ttl": "1m"})),
        None,
    )
    .await;
    assert_eq!(status, 201, "{lease}");
    let id = lease["lease"].as_str().unwrap().to_string();
    let servers: Vec<i32> = common::marked(&s.mark)
        .into_iter()
        .filter(|pid| {
            // The server itself, not the keeper whose arguments name it.
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .is_some_and(|argv0| argv0.ends_with(b"vram-stand-in"))
            })
        })
        .collect();
    assert_eq!(servers.len(), 1, "llm-b's server: {servers:?}");
    kill(Pid::from_raw(servers[0]), Signal::SIGKILL).unwrap();
    // The manager notices the exit: llm-b leaves the ledger.
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases_of(base, "llm-b").await.is_some_and(|n| n > 0) {
        assert!(Instant::now() < deadline, "the exit was never noticed");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    let (status, error) = call("POST", &format!("{base}/api/leases/{id}/renew"), None, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("unknown_lease")),
        "{error}"
    );
}

/// Every error is the documented JSON, also for what no handler sees: a
/// path or method no route takes, and a body cut short.
#[actix_rt::test]
async fn unknown_routes_and_cut_bodies_answer_json_errors() {
    use std::io::{Read, Write};
    let s = start("routes", "");
    let base = &s.base;
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/api/status"),
        ("GET", "/upstream/llm-a"),
    ] {
        let (status, error) = call(method, &format!("{base}{path}"), None, None).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}: {error}"
        );
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(path)),
            "{error}"
        );
    }
    // A body shorter than its Content-Length, then the client stops.
    let address = s.base.trim_start_matches("http://").to_string();
    let answer = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\": \"llm"
        )
        .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let error: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert_eq!(error["error"]["code"], "bad_request", "{answer}");
    // A model server's own 400 or 413 in plain text reaches the client
    // unchanged.
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    for status in [400u16, 413] {
        let mut refused = client
            .get(format!("{base}/upstream/llm-b/plain-{status}"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), status);
        let text = refused.body().await.unwrap();
        assert_eq!(&text[..], b"the model server's own refusal", "{status}");
    }
}
