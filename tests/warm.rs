//! Warming weight files: a planned load reads the model's `files` into the
//! page cache in the background (checked with `mincore`), and a missing
//! file is a warning, not a failed load.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{load, start};

const SIZE: usize = 16 << 20;

/// How long a background read may take before a test gives up on it. A
/// bound, not a timing check: each wait ends as soon as the pages are in.
/// 16 MiB takes milliseconds on an idle disk, but a machine busy writing and
/// syncing other tests' files can take seconds; a bound that generous only
/// delays the failure of a read that never happens.
const READ_BOUND: Duration = Duration::from_secs(60);

/// The share of `path`'s pages in the page cache now.
fn resident_share(path: &Path) -> f64 {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096usize;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file we opened, unmapped
    // below; mincore writes one byte per page into `vec`.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        let done = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(done, 0);
        vec.iter().filter(|b| **b & 1 == 1).count() as f64 / pages as f64
    }
}

/// A file of SIZE bytes written to disk and dropped from the page cache;
/// `None` when this file system keeps it in memory regardless (tmpfs).
fn cold_file(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 31 % 251) as u8).collect();
    for _ in 0..SIZE / block.len() {
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    (resident_share(&path) < 0.1).then_some(path)
}

#[actix_rt::test]
async fn a_planned_load_reads_the_weights_into_the_page_cache() {
    let Some(path) = cold_file("weights.gguf") else {
        println!("skipped: this file system keeps files in memory; nothing to warm");
        return;
    };
    let m = start(&format!(
        "[[models]]\nid = \"llm\"\nkind = \"llm\"\nvram = \"4GiB\"\nload_ms = 50\nfiles = [\"{}\"]\n",
        path.display()
    ));
    load(&m, "llm").await.unwrap();
    // The reading runs in the background: wait for it (READ_BOUND at most).
    let deadline = Instant::now() + READ_BOUND;
    while resident_share(&path) < 0.9 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let share = resident_share(&path);
    assert!(
        share >= 0.9,
        "only {:.0}% of the file was read",
        share * 100.0
    );
}

#[actix_rt::test]
async fn a_missing_weight_file_does_not_fail_the_load() {
    let m = start(
        "[[models]]\nid = \"llm\"\nkind = \"llm\"\nvram = \"4GiB\"\nfiles = [\"/no/such/weights.gguf\"]\n",
    );
    assert_eq!(load(&m, "llm").await, Ok(vec![]));
}

/// Drops `path` from the page cache (as memory pressure would).
fn drop_from_cache(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

#[actix_rt::test]
async fn keep_warm_reads_an_evicted_models_weights_back_into_the_page_cache() {
    let Some(path) = cold_file("evicted.gguf") else {
        println!("skipped: this file system keeps files in memory; nothing to warm");
        return;
    };
    let models = |keep_warm: &str| {
        format!(
            "[gpu]\ntotal = \"8GiB\"\n[host]\nkeep_warm = \"{keep_warm}\"\n\
             [[models]]\nid = \"a\"\nkind = \"llm\"\nvram = \"6GiB\"\nfiles = [\"{}\"]\n\
             [[models]]\nid = \"b\"\nkind = \"llm\"\nvram = \"6GiB\"\n",
            path.display()
        )
    };
    // Without keep_warm: a's files, dropped while it was resident, stay
    // cold after its eviction.
    let m = start(&models("0B"));
    load(&m, "a").await.unwrap();
    let deadline = Instant::now() + READ_BOUND;
    while resident_share(&path) < 0.9 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    drop_from_cache(&path);
    assert_eq!(load(&m, "b").await, Ok(vec!["a".to_string()]));
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let cold = resident_share(&path);
    assert!(cold < 0.5, "nothing re-read them: {:.0}%", cold * 100.0);
    m.shutdown().await;
    // With keep_warm: the eviction reads them back.
    let m = start(&models("8GiB"));
    load(&m, "a").await.unwrap();
    let deadline = Instant::now() + READ_BOUND;
    while resident_share(&path) < 0.9 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    drop_from_cache(&path);
    assert!(resident_share(&path) < 0.5, "the cache was dropped");
    assert_eq!(load(&m, "b").await, Ok(vec!["a".to_string()]));
    let deadline = Instant::now() + READ_BOUND;
    while resident_share(&path) < 0.9 && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let share = resident_share(&path);
    assert!(share >= 0.9, "only {:.0}% read back", share * 100.0);
    m.shutdown().await;
}
