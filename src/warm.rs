//! Warming a model's weight files: as soon as a load is planned, the files
//! the model lists (`files = [...]`) are read into the page cache on a
//! thread of their own, while the victims leave and the card gives their
//! memory back, so the server reads its weights from memory instead of disk.
//!
//! `posix_fadvise(WILLNEED)` asks the kernel to start reading the whole file
//! ahead, then the file is read through (the kernel may cap what WILLNEED
//! alone reads: half of a 16 MiB file, in a test here). The kernel decides
//! how much it keeps: a file larger than free RAM cannot all stay. A file
//! that cannot be read, or is not a regular file, is a warning, never a
//! failure: the server will say what it thinks of it.
//!
//! The reading runs on a plain thread, not the runtime's blocking pool: a
//! runtime waits for its blocking tasks when it stops, and a manager that
//! is told to stop must not wait for gigabytes to be read. A model whose
//! files are being read already is not read twice at once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The models whose files are being read now.
fn warming() -> &'static Mutex<HashSet<String>> {
    static WARMING: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    WARMING.get_or_init(Mutex::default)
}

/// Starts reading `files` (of `model`) into the page cache in the
/// background; returns at once.
pub fn warm(model: &str, files: &[PathBuf]) {
    if files.is_empty() {
        return;
    }
    let newly = warming()
        .lock()
        .map(|mut set| set.insert(model.to_string()))
        .unwrap_or(false);
    if !newly {
        return; // being read already
    }
    let (model, files) = (model.to_string(), files.to_vec());
    let reader = std::thread::Builder::new()
        .name("vram-warm".to_string())
        .spawn({
            let model = model.clone();
            move || {
                for file in &files {
                    if let Err(e) = warm_file(file) {
                        tracing::warn!(model = %model, file = %file.display(), error = %e, "cannot warm a weight file");
                    }
                }
                tracing::debug!(model = %model, files = files.len(), "weight files warmed");
                if let Ok(mut set) = warming().lock() {
                    set.remove(&model);
                }
            }
        });
    if let Err(e) = reader {
        tracing::warn!(model = %model, error = %e, "cannot start reading the weight files");
        if let Ok(mut set) = warming().lock() {
            set.remove(&model);
        }
    }
}

/// Reads all of `path` into the page cache.
fn warm_file(path: &PathBuf) -> Result<(), String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // A device or a pipe could be read for ever.
    if !file.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".to_string());
    }
    // Advice only: a file system that ignores it is still read through.
    for advice in [
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    ] {
        let _ = nix::fcntl::posix_fadvise(&file, 0, 0, advice);
    }
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
