//! What an embedding application uses: the cloneable handle with one
//! `Result` per call, and its own backend plugged in for a kind.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use common::{model, settings, start};
use vram_manager::{Backend, BackendFuture, Manager, ModelSpec, VramHandle};

#[actix_rt::test]
async fn the_handle_answers_one_result_per_call() {
    let m = start(&format!(
        "{}{}{}",
        model("whisper", "asr", 3, ""),
        model("tts", "tts", 2, ""),
        model("llm", "llm", 12, "")
    ));
    let handle: VramHandle = m.handle();
    let copy = handle.clone();
    copy.load("whisper").await.unwrap();
    let lease = copy.acquire("tts").await.unwrap();
    assert_eq!(lease.model(), "tts");
    // The TTS is leased: the LLM cannot get its 12 GiB.
    let err = handle.load("llm").await.unwrap_err();
    assert_eq!(err.code(), "insufficient_vram");
    assert_eq!(
        handle.load("nope").await.unwrap_err().code(),
        "unknown_model"
    );
    drop(lease);
    assert_eq!(m.load("llm").await.unwrap().evicted, ["tts"]);
    assert_eq!(
        handle.status().await.unwrap().resident(),
        ["llm", "whisper"]
    );
    handle.shutdown().await;
    assert_eq!(handle.load("llm").await.unwrap_err().code(), "unavailable");
    assert!(handle.status().await.unwrap().models.is_empty());
}

/// An application's own backend: records what it is asked.
#[derive(Default)]
struct Recorder(RefCell<Vec<String>>);

impl Backend for Recorder {
    fn load(&self, model: &ModelSpec) -> BackendFuture<()> {
        self.0.borrow_mut().push(format!("load {}", model.id));
        Box::pin(async { Ok(()) })
    }
    fn unload(&self, id: &str) -> BackendFuture<()> {
        self.0.borrow_mut().push(format!("unload {id}"));
        Box::pin(async { Ok(()) })
    }
    fn loaded(&self) -> BackendFuture<Vec<String>> {
        Box::pin(async { Ok(vec![]) })
    }
}

#[actix_rt::test]
async fn a_custom_backend_serves_its_kind_and_the_rest_stay_simulated() {
    let s = settings(&format!(
        "[gpu]\nprobe = \"none\"\n{}{}",
        model("llm", "llm", 8, ""),
        model("tts", "tts", 1, "")
    ));
    let recorder = Rc::new(Recorder::default());
    let custom: BTreeMap<String, Rc<dyn Backend>> =
        [("llm".to_string(), recorder.clone() as Rc<dyn Backend>)].into();
    let m = Manager::start_with(&s, custom).unwrap();
    m.load("llm").await.unwrap();
    m.load("tts").await.unwrap();
    m.handle().unload("llm").await.unwrap();
    assert_eq!(*recorder.0.borrow(), ["load llm", "unload llm"]);
    assert_eq!(m.sims["tts"].holding(), ["tts"], "tts stayed simulated");
    assert!(m.sims["llm"].holding().is_empty());
}

#[test]
fn a_custom_backend_for_an_unknown_kind_is_refused() {
    let s = settings("");
    let custom: BTreeMap<String, Rc<dyn Backend>> = [(
        "vision".to_string(),
        Rc::new(Recorder::default()) as Rc<dyn Backend>,
    )]
    .into();
    let err = actix::System::new()
        .block_on(async { Manager::start_with(&s, custom).map(drop) })
        .unwrap_err();
    assert!(err.to_string().contains("kinds.vision"), "{err}");
}
