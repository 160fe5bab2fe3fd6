//! Warming a model's weight files: as soon as a load is planned, the files
//! the model lists (`files = [...]`) are read into the page cache on a
//! blocking thread, while the victims leave and the card gives their memory
//! back, so the server reads its weights from memory instead of disk.
//!
//! `posix_fadvise(WILLNEED)` asks the kernel to start reading the whole file
//! ahead, then the file is read through (the kernel may cap what WILLNEED
//! alone reads: half of a 16 MiB file, in a test here). The kernel decides
//! how much it keeps: a file larger than free RAM cannot all stay. A file
//! that cannot be read is a warning, never a failure: the server will say
//! what it thinks of it.

use std::path::PathBuf;

/// Starts reading `files` (of `model`) into the page cache in the
/// background; returns at once.
pub fn warm(model: &str, files: &[PathBuf]) {
    if files.is_empty() {
        return;
    }
    let (model, files) = (model.to_string(), files.to_vec());
    // A blocking thread of the runtime: never the manager's arbiter.
    drop(actix_rt::task::spawn_blocking(move || {
        for file in &files {
            if let Err(e) = warm_file(file) {
                tracing::warn!(model = %model, file = %file.display(), error = %e, "cannot warm a weight file");
            }
        }
        tracing::debug!(model = %model, files = files.len(), "weight files warmed");
    }));
}

/// Reads all of `path` into the page cache.
fn warm_file(path: &PathBuf) -> Result<(), String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    for advice in [
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    ] {
        nix::fcntl::posix_fadvise(&file, 0, 0, advice).map_err(|e| e.to_string())?;
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
