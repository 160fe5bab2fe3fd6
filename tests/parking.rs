//! Parking with real processes: a parked server keeps its pid and wakes
//! without a restart; it is stopped when the host budget or the card needs
//! its room, when its sleep fails, and on an explicit unload; nothing is
//! left running.

mod common;

use std::time::Duration;

use common::{GIB, free_port, settings};
use vram_manager::{Backend, Manager, ModelState};

const STAND_IN: &str = env!("CARGO_BIN_EXE_vram-stand-in");

fn alive(pid: i32) -> bool {
    // Zombies count as gone: only a running process holds memory.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
    })
}

fn gone(pid: i32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A stand-in server `id` of `gib` GiB on `port`; `park` adds its
/// `[models.park]` (1 GiB kept, 10 GiB of host RAM).
fn server(id: &str, gib: u64, port: u16, args: &str, park: bool) -> String {
    let mut text = format!(
        "[[models]]\nid = \"{id}\"\nkind = \"llm\"\nvram = \"{gib}GiB\"\nbackend = \"process\"\n\
         command = [\"{STAND_IN}\", \"--port\", \"{port}\", \"--sleep-ms\", \"50\", \"--wake-ms\", \"50\"{args}]\n\
         ready = \"http://127.0.0.1:{port}/health\"\n"
    );
    if park {
        text.push_str(&format!(
            "[models.park]\nsleep = \"http://127.0.0.1:{port}/sleep?level=1\"\n\
             wake = \"http://127.0.0.1:{port}/wake_up\"\nvram = \"1GiB\"\nhost = \"10GiB\"\n"
        ));
    }
    text
}

fn manager(budget: &str, models: &str) -> Manager {
    Manager::start(&settings(&format!(
        "[gpu]\nprobe = \"none\"\ntotal = \"16GiB\"\n[host]\nbudget = \"{budget}\"\n{models}"
    )))
    .unwrap()
}

/// Whether the stand-in on `port` says it sleeps.
async fn is_sleeping(port: u16) -> bool {
    let mut answer = awc::Client::default()
        .get(format!("http://127.0.0.1:{port}/is_sleeping"))
        .send()
        .await
        .unwrap();
    let body = answer.body().await.unwrap();
    String::from_utf8_lossy(&body).contains("true")
}

async fn state(m: &Manager, id: &str) -> Option<ModelState> {
    let status = m.handle().status().await.unwrap();
    status.models.iter().find(|e| e.id == id).map(|e| e.state)
}

#[actix_rt::test]
async fn a_parked_server_keeps_its_pid_and_wakes_without_a_restart() {
    let (a, b) = (free_port(), free_port());
    let m = manager(
        "32GiB",
        &[
            server("llm-a", 10, a, "", true),
            server("llm-b", 10, b, "", false),
        ]
        .concat(),
    );
    let vram = m.handle();
    vram.load("llm-a").await.unwrap();
    let pid_a = m.processes["llm"].pids()["llm-a"];
    // llm-b needs the room: llm-a parks (its server stays up, asleep).
    assert_eq!(vram.load("llm-b").await.unwrap().evicted, ["llm-a"]);
    assert_eq!(state(&m, "llm-a").await, Some(ModelState::Parked));
    assert!(alive(pid_a), "a parked server keeps running");
    assert!(is_sleeping(a).await);
    // The backend says which of its servers sleep (a manager rebuilding
    // its ledger asks).
    let asleep = || Backend::parked(&m.processes["llm"]);
    assert_eq!(asleep().await.unwrap(), ["llm-a"]);
    let status = vram.status().await.unwrap();
    assert_eq!(status.used, 11 * GIB, "llm-b and llm-a's parked 1 GiB");
    // Its next request wakes the same process; llm-b (cannot park) stops.
    let pid_b = m.processes["llm"].pids()["llm-b"];
    let lease = vram.acquire("llm-a").await.unwrap();
    assert_eq!(lease.evicted(), ["llm-b"]);
    assert_eq!(
        m.processes["llm"].pids()["llm-a"],
        pid_a,
        "woken, not restarted"
    );
    assert!(!is_sleeping(a).await);
    assert!(asleep().await.unwrap().is_empty(), "woken");
    assert!(gone(pid_b), "llm-b was stopped");
    drop(lease);
    // An explicit unload of a parked model stops its server.
    vram.load("llm-b").await.unwrap();
    assert_eq!(state(&m, "llm-a").await, Some(ModelState::Parked));
    assert_eq!(asleep().await.unwrap(), ["llm-a"]);
    vram.unload("llm-a").await.unwrap();
    assert!(gone(pid_a), "unloading a parked model stops it");
    assert!(asleep().await.unwrap().is_empty(), "stopped");
    let pid_b = m.processes["llm"].pids()["llm-b"];
    m.shutdown().await;
    assert!(gone(pid_b), "nothing is left running");
}

#[actix_rt::test]
async fn a_spent_budget_or_a_failed_sleep_stops_the_server() {
    let (a, b, c) = (free_port(), free_port(), free_port());
    // The budget holds no 10 GiB parked model.
    let m = manager(
        "4GiB",
        &[
            server("llm-a", 10, a, "", true),
            server("llm-b", 10, b, "", false),
        ]
        .concat(),
    );
    let vram = m.handle();
    vram.load("llm-a").await.unwrap();
    let pid_a = m.processes["llm"].pids()["llm-a"];
    vram.load("llm-b").await.unwrap();
    assert_eq!(state(&m, "llm-a").await, None);
    assert!(gone(pid_a), "over the host budget: stopped");
    m.shutdown().await;

    // A server whose sleep fails is stopped instead.
    let m = manager(
        "32GiB",
        &[
            server("llm-c", 10, c, ", \"--fail-sleep\"", true),
            server("llm-b", 10, b, "", false),
        ]
        .concat(),
    );
    let vram = m.handle();
    vram.load("llm-c").await.unwrap();
    let pid_c = m.processes["llm"].pids()["llm-c"];
    assert_eq!(vram.load("llm-b").await.unwrap().evicted, ["llm-c"]);
    assert_eq!(state(&m, "llm-c").await, None);
    assert!(gone(pid_c), "a failed sleep falls back to a stop");
    m.shutdown().await;
}

#[actix_rt::test]
async fn a_parked_server_is_stopped_when_the_card_needs_its_room() {
    let (a, b, c) = (free_port(), free_port(), free_port());
    let m = manager(
        "32GiB",
        &[
            server("llm-a", 10, a, "", true),
            server("llm-b", 10, b, "", false),
            server("llm-c", 6, c, "", false),
        ]
        .concat(),
    );
    let vram = m.handle();
    vram.load("llm-a").await.unwrap();
    let pid_a = m.processes["llm"].pids()["llm-a"];
    vram.load("llm-b").await.unwrap();
    assert_eq!(state(&m, "llm-a").await, Some(ModelState::Parked));
    // 5 GiB free; llm-c needs 6: the parked llm-a's 1 GiB is the cheapest
    // room (parked before resident in a tier), so its server stops.
    assert_eq!(vram.load("llm-c").await.unwrap().evicted, ["llm-a"]);
    assert_eq!(state(&m, "llm-a").await, None);
    assert!(gone(pid_a), "the parked server was stopped");
    assert!(alive(m.processes["llm"].pids()["llm-b"]));
    m.shutdown().await;
}

#[actix_rt::test]
async fn a_parked_server_that_exits_leaves_the_ledger() {
    let (a, b) = (free_port(), free_port());
    let m = manager(
        "32GiB",
        &[
            server("llm-a", 10, a, "", true),
            server("llm-b", 10, b, "", false),
        ]
        .concat(),
    );
    let vram = m.handle();
    vram.load("llm-a").await.unwrap();
    vram.load("llm-b").await.unwrap();
    assert_eq!(state(&m, "llm-a").await, Some(ModelState::Parked));
    // The sleeping server dies: its residual is free again.
    let _ = awc::Client::default()
        .get(format!("http://127.0.0.1:{a}/exit"))
        .send()
        .await;
    for _ in 0..250 {
        if state(&m, "llm-a").await.is_none() {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&m, "llm-a").await, None);
    assert_eq!(vram.status().await.unwrap().used, 10 * GIB);
    m.shutdown().await;
}
