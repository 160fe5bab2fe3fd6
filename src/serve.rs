//! `vram-manager serve`: one HTTP endpoint for the whole voice stack.
//!
//! - OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/embeddings`, `/v1/audio/speech`: the JSON field `model`) and
//!   `ANY /upstream/{model}/{path...}` are forwarded to the model's `proxy`
//!   URL under a lease: the model is acquired first (loaded, evicting by
//!   the policy, if needed), the answer is streamed back as it arrives, and
//!   the lease is released when the answer's body ends — normally, on an
//!   upstream error, or when the client goes away. So a model is never
//!   evicted in the middle of an answer.
//! - `GET /`: the dashboard, one self-contained page (`dashboard.html`).
//! - The control API: `GET /health`, `GET /v1/models`, `GET /api/status`,
//!   `POST /api/models/{id}/load`, `POST /api/models/{id}/unload`,
//!   `POST /api/models/{id}/pin` and `/unpin`;
//!   `GET /api/events` (server-sent events, the JSON of `VramEvent`);
//!   leases for clients that hold a model across requests:
//!   `POST /api/leases {"model","ttl"}`, `POST /api/leases/{id}/renew`,
//!   `DELETE /api/leases/{id}` — a lease not renewed within its `ttl` is
//!   released by the server. `/v1/audio/transcriptions` takes the model
//!   from its multipart field `model`.
//! - `GET /metrics`: Prometheus text. The library counts through the
//!   `metrics` facade (loads, evictions, restarts, load and release-wait
//!   durations, queue length); this edge installs the exporter and sets the
//!   ledger's gauges from a status snapshot at each scrape.
//! - Errors are `{"error":{"code","message"}}` with the status of their
//!   code (unknown_model 404, exceeds_capacity 422, insufficient_vram and
//!   in_use 409, busy 503 with `Retry-After`, timeout 504, backend_failed
//!   502, unavailable 503; a bad request 400 naming the field).
//! - With `server.token` set, every route but `/health` needs
//!   `Authorization: Bearer TOKEN` (compared in constant time); off
//!   loopback a token is required to start at all.
//! - SIGINT, SIGTERM or SIGHUP: stop accepting, let requests in flight
//!   finish for `server.shutdown_timeout`, stop every model server, exit
//!   128 + the signal.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use futures::Stream;
use serde_json::{Value, json};
use vram_actors::{Lease, ModelState, VramError, VramEvent, VramHandle};

use crate::config::Settings;
use crate::manager::Manager;

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting forbids it (the message names the key).
    #[error("{key}: {message}")]
    Invalid {
        /// The setting.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The manager or the listener could not start.
    #[error("{0}")]
    Start(String),
}

/// Leases held for HTTP clients: id -> (lease, ttl, expiry).
type HeldLeases = HashMap<String, (Lease, Duration, Instant)>;

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    vram: VramHandle,
    /// Model id -> (kind, proxy base URL).
    models: Arc<BTreeMap<String, (String, Option<String>)>>,
    /// Each model as configured (for the models not on the card).
    specs: Arc<BTreeMap<String, vram_actors::ModelSpec>>,
    /// What `/api/status` tells besides the ledger: each model's tier,
    /// protection and TTL, the card's device and reserve.
    about: Arc<About>,
    /// Pins set at run time (`/api/models/{id}/pin`), shown for models
    /// not on the card too. An async lock held across the manager's answer,
    /// so two requests cannot record their pins in the other order.
    pins: Arc<tokio::sync::Mutex<BTreeMap<String, bool>>>,
    token: Option<Arc<str>>,
    max_body: usize,
    upstream_timeout: Duration,
    max_lease_ttl: Duration,
    /// Leases held for HTTP clients.
    leases: Arc<Mutex<HeldLeases>>,
    /// Turns true when the server stops: event streams end then, so they
    /// do not hold the graceful shutdown for its whole timeout.
    closing: tokio::sync::watch::Receiver<bool>,
    /// Renders what the `metrics` facade recorded.
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

/// The settings `/api/status` shows beside the ledger.
struct About {
    /// Model id -> (kind priority, kind protected, TTL seconds).
    models: BTreeMap<String, (u32, bool, Option<f64>)>,
    device: String,
    reserve: u64,
}

/// The page at `/`: one self-contained file (HTML, CSS and JavaScript),
/// compiled in; it talks to this server only.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// Runs the server until SIGINT, SIGTERM or SIGHUP; answers the signal's
/// number after every model server was stopped.
pub fn run(settings: &Settings, listen: Option<SocketAddr>) -> Result<i32, ServeError> {
    let listen = listen.unwrap_or(settings.server.listen);
    let token = Some(settings.server.token.clone()).filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(ServeError::Invalid {
            key: "server.token".to_string(),
            message: format!(
                "{listen} is not a loopback address: set a token so only your clients can load and unload models"
            ),
        });
    }
    let models = settings
        .models
        .iter()
        .map(|m| {
            (
                m.spec.id.to_string(),
                (m.spec.kind.to_string(), m.proxy.clone()),
            )
        })
        .collect();
    let settings = settings.clone();
    actix_web::rt::System::new().block_on(async move {
        // The recorder first: the manager keeps the metric handles it
        // registers.
        let prometheus = install_prometheus()?;
        let manager = Manager::start(&settings).map_err(|e| ServeError::Start(e.to_string()))?;
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let upkeep = prometheus.clone();
        actix_web::rt::spawn(async move {
            loop {
                actix_web::rt::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let shared = Shared {
            prometheus,
            closing,
            vram: manager.handle(),
            models: Arc::new(models),
            specs: Arc::new(
                settings
                    .models
                    .iter()
                    .map(|m| (m.spec.id.to_string(), m.spec.clone()))
                    .collect(),
            ),
            about: Arc::new(About {
                models: settings
                    .models
                    .iter()
                    .map(|m| {
                        let kind = settings.kinds.get(&m.spec.kind);
                        (
                            m.spec.id.to_string(),
                            (
                                kind.map_or(0, |k| k.priority),
                                kind.is_some_and(|k| k.protected),
                                m.ttl.map(|t| t.as_secs_f64()),
                            ),
                        )
                    })
                    .collect(),
                device: settings.gpu.device.clone(),
                reserve: settings.gpu.reserve,
            }),
            pins: Arc::default(),
            token: token.map(Arc::from),
            max_body: usize::try_from(settings.server.max_body).unwrap_or(usize::MAX),
            upstream_timeout: settings.server.upstream_timeout,
            max_lease_ttl: settings.server.max_lease_ttl,
            leases: Arc::default(),
        };
        // Leases not renewed in time are released (dropped).
        let leases = shared.leases.clone();
        actix_web::rt::spawn(async move {
            loop {
                actix_web::rt::time::sleep(Duration::from_millis(250)).await;
                let now = Instant::now();
                if let Ok(mut leases) = leases.lock() {
                    // Expired, or void: its model left the card.
                    leases.retain(|_, (lease, _, expiry)| *expiry > now && lease.is_valid());
                }
            }
        });
        let server = HttpServer::new(move || {
            App::new()
                .wrap(
                    actix_web::middleware::ErrorHandlers::new()
                        .handler(StatusCode::PAYLOAD_TOO_LARGE, too_large)
                        .handler(StatusCode::BAD_REQUEST, unreadable),
                )
                .wrap(actix_web::middleware::from_fn(require_token))
                .app_data(web::Data::new(shared.clone()))
                .app_data(web::PayloadConfig::new(shared.max_body))
                .app_data(web::Data::new(
                    awc::Client::builder()
                        .connector(awc::Connector::new().connector(NoDelay::default()))
                        .timeout(shared.upstream_timeout)
                        .finish(),
                ))
                .route("/", web::get().to(dashboard))
                .route("/health", web::get().to(health))
                .route("/metrics", web::get().to(metrics_text))
                .route("/v1/models", web::get().to(list_models))
                .route("/api/status", web::get().to(status))
                .route("/api/models/{id}/load", web::post().to(load))
                .route("/api/models/{id}/unload", web::post().to(unload))
                .route("/api/models/{id}/pin", web::post().to(pin))
                .route("/api/models/{id}/unpin", web::post().to(unpin))
                .route("/api/events", web::get().to(events))
                .route("/api/leases", web::post().to(take_lease))
                .route("/api/leases/{id}/renew", web::post().to(renew_lease))
                .route("/api/leases/{id}", web::delete().to(drop_lease))
                .route(
                    "/v1/audio/transcriptions",
                    web::post().to(forward_multipart),
                )
                .route("/v1/chat/completions", web::post().to(forward_json))
                .route("/v1/completions", web::post().to(forward_json))
                .route("/v1/embeddings", web::post().to(forward_json))
                .route("/v1/audio/speech", web::post().to(forward_json))
                .route("/upstream/{model}/{tail:.*}", web::route().to(forward_any))
                .default_service(web::to(no_route))
        })
        .workers(2)
        // Answers are small writes (a streamed token each): send them at
        // once rather than wait, Nagle's way, for the client's ACK.
        .on_connect(|connection, _| {
            if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .disable_signals()
        .shutdown_timeout(settings.server.shutdown_timeout.as_secs())
        .bind(listen)
        .map_err(|e| ServeError::Start(format!("cannot listen on {listen}: {e}")))?
        .run();
        let handle = server.handle();
        let running = actix_web::rt::spawn(server);
        // Ignored if stderr is closed: serving goes on without the line.
        {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "vram-manager serving on http://{listen}");
        }
        let signal = crate::scenario::shutdown_signal().await;
        let _ = closing_tx.send(true);
        handle.stop(true).await;
        let _ = running.await;
        manager.shutdown().await;
        Ok(signal)
    })
}

/// Installs the Prometheus recorder of the `metrics` facade (once per
/// process: a second `serve` in the same process reuses it).
fn install_prometheus() -> Result<metrics_exporter_prometheus::PrometheusHandle, ServeError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let buckets = [
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &buckets)
        .and_then(|b| b.install_recorder())
        .map_err(|e| ServeError::Start(format!("cannot start the metrics recorder: {e}")))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// `GET /metrics`: the ledger's gauges from a snapshot, then everything
/// the facade recorded, in Prometheus text format.
async fn metrics_text(shared: web::Data<Shared>) -> HttpResponse {
    let status = match shared.vram.status().await {
        Ok(status) => status,
        Err(e) => return vram_error(&e),
    };
    metrics::gauge!("vram_manager_capacity_bytes").set(status.capacity as f64);
    metrics::gauge!("vram_manager_used_bytes").set(status.used as f64);
    metrics::gauge!("vram_manager_free_bytes").set(status.free as f64);
    metrics::gauge!("vram_manager_queue_length").set(status.queued as f64);
    if let Some(card) = status.card {
        metrics::gauge!("vram_manager_card_free_bytes").set(card.free as f64);
    }
    // Each card, labelled with its position in the list.
    for gpu in &status.gpus {
        let label = gpu.gpu.to_string();
        metrics::gauge!("vram_manager_gpu_capacity_bytes", "gpu" => label.clone())
            .set(gpu.capacity as f64);
        metrics::gauge!("vram_manager_gpu_used_bytes", "gpu" => label.clone()).set(gpu.used as f64);
        metrics::gauge!("vram_manager_gpu_free_bytes", "gpu" => label.clone()).set(gpu.free as f64);
        if let Some(card) = gpu.card {
            metrics::gauge!("vram_manager_gpu_card_free_bytes", "gpu" => label)
                .set(card.free as f64);
        }
    }
    for (id, (kind, _)) in shared.models.iter() {
        let entry = status.models.iter().find(|m| &m.id == id);
        let resident = entry.is_some_and(|m| m.state == ModelState::Resident);
        metrics::gauge!("vram_manager_model_resident", "model" => id.clone(), "kind" => kind.clone())
            .set(if resident { 1.0 } else { 0.0 });
        metrics::gauge!("vram_manager_model_leases", "model" => id.clone())
            .set(entry.map_or(0.0, |m| f64::from(m.leases)));
        for gpu in &status.gpus {
            let here = entry.is_some_and(|m| m.gpu == gpu.gpu);
            metrics::gauge!("vram_manager_model_on_gpu", "model" => id.clone(), "gpu" => gpu.gpu.to_string())
                .set(if here { 1.0 } else { 0.0 });
        }
        if let Some(entry) = entry {
            metrics::gauge!("vram_manager_model_size_bytes", "model" => id.clone(), "source" => "declared")
                .set(entry.declared as f64);
            if let Some(measured) = entry.measured {
                metrics::gauge!("vram_manager_model_size_bytes", "model" => id.clone(), "source" => "measured")
                    .set(measured as f64);
            }
        }
    }
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; version=0.0.4"))
        .body(shared.prometheus.render())
}

/// The HTTP status of an error code.
fn status_of(error: &VramError) -> StatusCode {
    match error {
        VramError::UnknownModel { .. } => StatusCode::NOT_FOUND,
        VramError::ExceedsCapacity { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        VramError::InsufficientVram { .. } | VramError::InUse { .. } => StatusCode::CONFLICT,
        VramError::Busy { .. } | VramError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        VramError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        VramError::BackendFailed { .. } => StatusCode::BAD_GATEWAY,
    }
}

/// `{"error":{"code","message"}}` with `status`.
fn error_body(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    if code == "busy" {
        response.insert_header((header::RETRY_AFTER, "1"));
    }
    response.json(json!({"error": {"code": code, "message": message}}))
}

fn vram_error(error: &VramError) -> HttpResponse {
    error_body(status_of(error), error.code(), &error.to_string())
}

fn bad_request(message: &str) -> HttpResponse {
    error_body(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Refuses a request without the bearer token (when one is set); the
/// comparison takes the same time wherever the tokens differ.
fn authorize(request: &HttpRequest, shared: &Shared) -> Result<(), HttpResponse> {
    let Some(token) = &shared.token else {
        return Ok(());
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let mut differ = a.len() ^ b.len();
    for (i, expected) in b.iter().enumerate() {
        differ |= usize::from(a.get(i).copied().unwrap_or(0) ^ expected);
    }
    if differ == 0 {
        Ok(())
    } else {
        Err(error_body(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs Authorization: Bearer TOKEN (server.token)",
        ))
    }
}

/// Refuses every request but `/health` and the page at `/` without the
/// bearer token (when one is set): the page holds no data, and asks for
/// the token itself.
async fn require_token(
    request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    if request.path() != "/health"
        && request.path() != "/"
        && let Some(shared) = request.app_data::<web::Data<Shared>>().cloned()
        && let Err(refused) = authorize(request.request(), &shared)
    {
        return Ok(request.into_response(refused).map_into_right_body());
    }
    next.call(request).await.map(|r| r.map_into_left_body())
}

/// A body over `server.max_body`, as our JSON error.
fn too_large<B>(
    response: actix_web::dev::ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    as_json_error(response, "too_large", |_| {
        "the request body is larger than server.max_body".to_string()
    })
}

/// A body actix could not read (cut short before its Content-Length), as
/// our JSON error.
fn unreadable<B>(
    response: actix_web::dev::ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    as_json_error(response, "bad_request", |e| {
        format!("the request could not be read: {e}")
    })
}

/// Rewrites a refusal that actix made from an error as our JSON error,
/// keeping its status. Any other response with that status passes as sent:
/// a model server's own (proxied, with no error attached) must reach the
/// client unchanged, and ours are JSON already.
fn as_json_error<B>(
    response: actix_web::dev::ServiceResponse<B>,
    code: &str,
    message: impl FnOnce(&actix_web::Error) -> String,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    let Some(message) = response.response().error().map(message) else {
        return Ok(actix_web::middleware::ErrorHandlerResponse::Response(
            response.map_into_left_body(),
        ));
    };
    let status = response.status();
    let (request, _) = response.into_parts();
    let answer = error_body(status, code, &message).map_into_right_body();
    Ok(actix_web::middleware::ErrorHandlerResponse::Response(
        actix_web::dev::ServiceResponse::new(request, answer),
    ))
}

/// A method and path no route takes.
async fn no_route(request: HttpRequest) -> HttpResponse {
    error_body(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route for {} {}", request.method(), request.path()),
    )
}

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // Everything the page uses comes from here; nothing else may run.
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
        ))
        .body(DASHBOARD)
}

async fn pin(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    set_pinned(&shared, id.into_inner(), true).await
}

async fn unpin(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    set_pinned(&shared, id.into_inner(), false).await
}

/// `POST /api/models/{id}/pin|unpin` -> `{"model","pinned"}`.
async fn set_pinned(shared: &Shared, model: String, pinned: bool) -> HttpResponse {
    let mut pins = shared.pins.lock().await;
    match shared.vram.set_pinned(model.clone(), pinned).await {
        Ok(()) => {
            pins.insert(model.clone(), pinned);
            HttpResponse::Ok().json(json!({"model": model, "pinned": pinned}))
        }
        Err(e) => vram_error(&e),
    }
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn list_models(shared: web::Data<Shared>) -> HttpResponse {
    let status = match shared.vram.status().await {
        Ok(status) => status,
        Err(e) => return vram_error(&e),
    };
    let data: Vec<Value> = shared
        .models
        .iter()
        .map(|(id, (kind, _))| {
            let state = status
                .models
                .iter()
                .find(|m| &m.id == id)
                .map_or("unloaded", |m| match m.state {
                    ModelState::Loading => "loading",
                    ModelState::Resident => "resident",
                    ModelState::Unloading => "unloading",
                    ModelState::Parked => "parked",
                });
            json!({"id": id, "object": "model", "owned_by": "vram-manager", "kind": kind, "state": state})
        })
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// The ledger's snapshot, with every configured model listed: those not
/// on the card as `unloaded`, at their declared size.
async fn status(shared: web::Data<Shared>) -> HttpResponse {
    let status = match shared.vram.status().await {
        Ok(status) => status,
        Err(e) => return vram_error(&e),
    };
    let pins = shared.pins.lock().await.clone();
    let models: Vec<Value> = shared
        .specs
        .values()
        .map(
            |spec| match status.models.iter().find(|m| m.id == spec.id) {
                Some(entry) => json!({
                    "id": entry.id,
                    "kind": entry.kind,
                    "gpu": entry.gpu,
                    "state": entry.state,
                    "bytes": entry.bytes,
                    "declared": entry.declared,
                    "measured": entry.measured,
                    "pinned": entry.pinned,
                    "leases": entry.leases,
                    "idle_s": status.idle_ms.get(entry.id.as_str()).map(|ms| *ms as f64 / 1000.0),
                }),
                None => json!({
                    "id": spec.id,
                    "kind": spec.kind,
                    "gpu": null,
                    "state": "unloaded",
                    "bytes": spec.bytes,
                    "declared": spec.bytes,
                    "measured": null,
                    "pinned": pins.get(spec.id.as_str()).copied().unwrap_or(spec.pinned),
                    "leases": 0,
                    "idle_s": null,
                }),
            },
        )
        .map(|mut model| {
            if let Some((priority, protected, ttl)) = model["id"]
                .as_str()
                .and_then(|id| shared.about.models.get(id))
            {
                model["priority"] = json!(priority);
                model["protected"] = json!(protected);
                model["ttl_s"] = json!(ttl);
            }
            // Under the adaptive order: why a resident model would leave
            // (cheaper value first).
            if let Some(score) = status
                .scores
                .iter()
                .find(|s| model["id"].as_str() == Some(s.id.as_str()))
            {
                model["p_soon"] = json!(score.p_soon);
                model["value"] = json!(score.value);
            }
            model
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "capacity": status.capacity,
        "used": status.used,
        "free": status.free,
        "card": status.card,
        "queued": status.queued,
        "running": status.running,
        "models": models,
        "idle_ms": status.idle_ms,
        "device": shared.about.device,
        "reserve": shared.about.reserve,
        "order": status.order,
        "gpus": status.gpus,
    }))
}

async fn load(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    match shared.vram.load(id.into_inner()).await {
        Ok(loaded) => HttpResponse::Ok().json(json!({
            "model": loaded.model,
            "evicted": loaded.evicted,
            "already_resident": loaded.already_resident,
        })),
        Err(e) => vram_error(&e),
    }
}

async fn unload(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    match shared.vram.unload(id.into_inner()).await {
        Ok(unloaded) => HttpResponse::Ok().json(json!({
            "model": unloaded.model,
            "was_resident": unloaded.was_resident,
        })),
        Err(e) => vram_error(&e),
    }
}

/// Forwards every [`VramEvent`] into a channel; stops when the channel's
/// reader (the HTTP client) is gone.
struct EventForward(tokio::sync::mpsc::UnboundedSender<VramEvent>);

impl actix::Actor for EventForward {
    type Context = actix::Context<Self>;
}

impl actix::Handler<VramEvent> for EventForward {
    type Result = ();

    fn handle(&mut self, event: VramEvent, ctx: &mut actix::Context<Self>) {
        if self.0.send(event).is_err() {
            actix::ActorContext::stop(ctx);
        }
    }
}

/// `GET /api/events`: server-sent events, `event: <name>` and the event's
/// JSON, from now on.
async fn events(shared: web::Data<Shared>) -> HttpResponse {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = actix::Actor::start(EventForward(tx));
    if let Err(e) = shared.vram.subscribe(forward.recipient()).await {
        return vram_error(&e);
    }
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|event| {
            event.map(|event| {
                let json = serde_json::to_value(&event).unwrap_or(Value::Null);
                let name = json["event"].as_str().unwrap_or("event").to_string();
                Ok::<_, std::convert::Infallible>(web::Bytes::from(format!(
                    "event: {name}\ndata: {json}\n\n"
                )))
            })
        })
    });
    let mut closing = shared.closing.clone();
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    // A comment first, so the headers go out at once: a client knows the
    // stream is open before the first event (which may be long in coming).
    let hello = futures::stream::once(async {
        Ok::<_, std::convert::Infallible>(web::Bytes::from_static(b": connected\n\n"))
    });
    let body = futures::StreamExt::chain(hello, body);
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(futures::StreamExt::take_until(body, Box::pin(closed)))
}

/// A lease request of the HTTP API.
#[derive(serde::Deserialize)]
struct LeaseRequest {
    model: String,
    ttl: String,
}

/// `POST /api/leases {"model","ttl"}`: loads the model if needed and holds
/// it until the lease is deleted or not renewed within `ttl`.
async fn take_lease(shared: web::Data<Shared>, body: web::Bytes) -> HttpResponse {
    let asked: LeaseRequest = match serde_json::from_slice(&body) {
        Ok(asked) => asked,
        Err(e) => {
            return bad_request(&format!(
                "expected {{\"model\": ID, \"ttl\": \"30s\"}}: {e}"
            ));
        }
    };
    let ttl = match humantime::parse_duration(&asked.ttl) {
        Ok(ttl) if !ttl.is_zero() && ttl <= shared.max_lease_ttl => ttl,
        Ok(_) => {
            return bad_request(&format!(
                "\"ttl\" must be more than 0s and at most server.max_lease_ttl ({})",
                humantime::format_duration(shared.max_lease_ttl)
            ));
        }
        Err(e) => return bad_request(&format!("\"ttl\" is not a duration such as \"30s\": {e}")),
    };
    let lease = match shared.vram.acquire(asked.model.clone()).await {
        Ok(lease) => lease,
        Err(e) => return vram_error(&e),
    };
    let id = format!("{:016x}", fastrand::u64(..));
    if let Ok(mut leases) = shared.leases.lock() {
        leases.insert(id.clone(), (lease, ttl, Instant::now() + ttl));
    }
    HttpResponse::Created().json(json!({
        "lease": id,
        "model": asked.model,
        "expires_in_s": ttl.as_secs_f64(),
    }))
}

/// `POST /api/leases/{id}/renew`: another `ttl` from now.
async fn renew_lease(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let renewed = shared.leases.lock().ok().and_then(|mut leases| {
        let (lease, ttl, expiry) = leases.get_mut(id.as_str())?;
        // A lease whose model left the card (its server exited or its
        // backend crashed) protects nothing: it is gone, not renewed.
        if !lease.is_valid() {
            let model = lease.model().to_string();
            leases.remove(id.as_str());
            return Some(Err(model));
        }
        *expiry = Instant::now() + *ttl;
        Some(Ok((lease.model().to_string(), *ttl)))
    });
    match renewed {
        Some(Ok((model, ttl))) => HttpResponse::Ok().json(json!({
            "lease": id.into_inner(),
            "model": model,
            "expires_in_s": ttl.as_secs_f64(),
        })),
        Some(Err(model)) => error_body(
            StatusCode::NOT_FOUND,
            "unknown_lease",
            &format!(
                "lease {:?} ended when {model:?} left the card (its server exited or its backend restarted); take a new one",
                id.as_str()
            ),
        ),
        None => unknown_lease(&id),
    }
}

/// `DELETE /api/leases/{id}`: releases the model now.
async fn drop_lease(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let removed = shared
        .leases
        .lock()
        .ok()
        .and_then(|mut leases| leases.remove(id.as_str()));
    match removed {
        Some(_) => HttpResponse::NoContent().finish(),
        None => unknown_lease(&id),
    }
}

fn unknown_lease(id: &str) -> HttpResponse {
    error_body(
        StatusCode::NOT_FOUND,
        "unknown_lease",
        &format!("no lease {id:?} (released, expired or never given)"),
    )
}

/// `POST /v1/audio/transcriptions`: the model is the multipart field
/// `model`.
async fn forward_multipart(
    request: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(model) = multipart_field(content_type, &body, "model") else {
        return bad_request("the multipart body needs a field \"model\"");
    };
    let path = request.uri().path().to_string();
    forward(&request, body, &shared, &client, &model, &path).await
}

/// The text of field `name` of a `multipart/form-data` body.
fn multipart_field(content_type: &str, body: &[u8], name: &str) -> Option<String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let text = String::from_utf8_lossy(body);
    text.split(delimiter.as_str()).find_map(|part| {
        let (head, value) = part.split_once("\r\n\r\n")?;
        let wanted = format!("name=\"{name}\"");
        head.lines()
            .any(|l| {
                l.to_ascii_lowercase().starts_with("content-disposition") && l.contains(&wanted)
            })
            .then(|| value.trim_end_matches("\r\n").trim().to_string())
    })
}

/// An OpenAI-style request: its JSON body names the model.
async fn forward_json(
    request: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let model = match serde_json::from_slice::<Value>(&body) {
        Ok(value) => match value.get("model").and_then(Value::as_str) {
            Some(model) => model.to_string(),
            None => return bad_request("the JSON body needs a string field \"model\""),
        },
        Err(e) => return bad_request(&format!("the body is not JSON: {e}")),
    };
    let path = request.uri().path().to_string();
    forward(&request, body, &shared, &client, &model, &path).await
}

/// `ANY /upstream/{model}/{path...}`: any request to that model's server.
async fn forward_any(
    request: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
    client: web::Data<awc::Client>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (model, tail) = path.into_inner();
    forward(
        &request,
        body,
        &shared,
        &client,
        &model,
        &format!("/{tail}"),
    )
    .await
}

/// Whether an upstream answer's body ends only when its server closes the
/// connection (HTTP/1.1 with no length and no chunked encoding, RFC 9112
/// 6.3). The HTTP client reads no body for such an answer: forwarded, it
/// would reach the caller empty, so it is refused instead.
fn ends_at_close(
    method: &actix_web::http::Method,
    version: actix_web::http::Version,
    status: StatusCode,
    headers: &header::HeaderMap,
) -> bool {
    let bodiless = method == actix_web::http::Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // Chunked when the last coding says so (`identity` delimits nothing).
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
    version == actix_web::http::Version::HTTP_11
        && !bodiless
        && !chunked
        && !headers.contains_key(header::CONTENT_LENGTH)
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            // The proxy has read the whole body already (and answered the
            // client's 100 Continue): passed on, it would make the client
            // wait for a 100 that a server may never send.
            | "expect"
    )
}

/// Acquires `model`, sends the request to its server, and streams the
/// answer back holding the lease until the answer's body ends.
async fn forward(
    request: &HttpRequest,
    body: web::Bytes,
    shared: &Shared,
    client: &awc::Client,
    model: &str,
    path: &str,
) -> HttpResponse {
    let Some((_, proxy)) = shared.models.get(model) else {
        let e = VramError::UnknownModel {
            model: model.to_string(),
        };
        return vram_error(&e);
    };
    let Some(proxy) = proxy else {
        return error_body(
            StatusCode::NOT_FOUND,
            "no_upstream",
            &format!("model {model:?} has no `proxy` URL to forward to"),
        );
    };
    let lease = match shared.vram.acquire(model).await {
        Ok(lease) => lease,
        Err(e) => return vram_error(&e),
    };
    let query = request
        .uri()
        .query()
        .map_or(String::new(), |q| format!("?{q}"));
    let mut upstream = client.request(request.method().clone(), format!("{proxy}{path}{query}"));
    for (name, value) in request.headers() {
        if !hop_by_hop(name) {
            upstream = upstream.insert_header((name.clone(), value.clone()));
        }
    }
    let answer = match upstream.send_body(body).await {
        Ok(answer) => answer,
        Err(e) => {
            // The lease goes with this scope.
            return error_body(
                StatusCode::BAD_GATEWAY,
                "backend_failed",
                &format!("{model}: its server did not answer: {e}"),
            );
        }
    };
    if ends_at_close(
        request.method(),
        answer.version(),
        answer.status(),
        answer.headers(),
    ) {
        // The lease goes with this scope.
        return error_body(
            StatusCode::BAD_GATEWAY,
            "backend_failed",
            &format!(
                "{model}: its server answered {} over HTTP/1.1 with neither Content-Length nor \
                 chunked Transfer-Encoding (a body that ends when it closes the connection), \
                 which this proxy cannot forward; have the server send one of them",
                answer.status()
            ),
        );
    }
    let mut response = HttpResponse::build(answer.status());
    for (name, value) in answer.headers() {
        if !hop_by_hop(name) {
            response.insert_header((name.clone(), value.clone()));
        }
    }
    response.streaming(Leased {
        inner: answer,
        lease: Some(lease),
    })
}

/// Connects to upstreams with `TCP_NODELAY`: a request goes out as its head
/// and then its body, and with Nagle's algorithm the body would wait for
/// the upstream's delayed ACK of the head (40 ms on Linux).
#[derive(Clone, Default)]
struct NoDelay(actix_tls::connect::ConnectorService);

impl actix_service::Service<actix_tls::connect::ConnectInfo<awc::http::Uri>> for NoDelay {
    type Response = actix_tls::connect::Connection<awc::http::Uri, actix_web::rt::net::TcpStream>;
    type Error = actix_tls::connect::ConnectError;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        actix_service::Service::<actix_tls::connect::ConnectInfo<awc::http::Uri>>::poll_ready(
            &self.0, cx,
        )
    }

    fn call(&self, request: actix_tls::connect::ConnectInfo<awc::http::Uri>) -> Self::Future {
        let connecting = self.0.call(request);
        Box::pin(async move {
            let connection = connecting.await?;
            let _ = connection.io_ref().set_nodelay(true);
            Ok(connection)
        })
    }
}

/// An answer's body that holds the model's lease until it ends (or is
/// dropped, when the client goes away).
struct Leased<S> {
    inner: S,
    lease: Option<Lease>,
}

impl<S, E> Stream for Leased<S>
where
    S: Stream<Item = Result<web::Bytes, E>> + Unpin,
{
    type Item = Result<web::Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(None | Some(Err(_))) = &next {
            self.lease = None;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::{Method, Version};

    fn headers(pairs: &[(&'static str, &'static str)]) -> header::HeaderMap {
        let mut map = header::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_static(name),
                header::HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn only_answers_that_end_at_close_are_caught() {
        let ok = StatusCode::OK;
        let get = &Method::GET;
        let v11 = Version::HTTP_11;
        let ends =
            |m, v, s, h: &[(&'static str, &'static str)]| ends_at_close(m, v, s, &headers(h));
        // Ends at close: no length, no chunked coding.
        assert!(ends(get, v11, ok, &[]));
        assert!(ends(get, v11, ok, &[("transfer-encoding", "identity")]));
        assert!(ends(
            get,
            v11,
            StatusCode::NOT_FOUND,
            &[("connection", "close")]
        ));
        // Delimited, or bodiless.
        assert!(!ends(get, v11, ok, &[("content-length", "0")]));
        assert!(!ends(get, v11, ok, &[("transfer-encoding", "chunked")]));
        assert!(!ends(
            get,
            v11,
            ok,
            &[("transfer-encoding", "gzip, Chunked")]
        ));
        assert!(!ends(&Method::HEAD, v11, ok, &[]));
        assert!(!ends(get, v11, StatusCode::NO_CONTENT, &[]));
        assert!(!ends(get, v11, StatusCode::NOT_MODIFIED, &[]));
        assert!(!ends(get, v11, StatusCode::SWITCHING_PROTOCOLS, &[]));
        // HTTP/1.0 answers are read to the end.
        assert!(!ends(get, Version::HTTP_10, ok, &[]));
    }
}
