//! Replays every committed fuzz corpus input (`fuzz/corpus/<target>/*`) through the same checks
//! the cargo-fuzz targets run, on stable, so `cargo test` guards every input a fuzzer ever found.

#[path = "../../../fuzz/src/checks.rs"]
mod checks;

use std::path::PathBuf;

fn corpus_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Runs `check` on every file of `fuzz/corpus/<target>/`; returns how many it ran.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("read corpus file");
        // A panic names the input that caused it.
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(
            result.is_ok(),
            "{target}: input {} panicked",
            file.display()
        );
    }
    files.len()
}

fn run(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("known target");
    let n = replay(target, *check);
    assert!(n > 0, "corpus of {target} is empty");
    eprintln!("{target}: {n} inputs replayed");
}

#[test]
fn corpus_jsonl_lines() {
    run("jsonl_lines");
}

#[test]
fn corpus_messages() {
    run("messages");
}

#[test]
fn corpus_envelope() {
    run("envelope");
}

#[test]
fn corpus_collector_validate() {
    run("collector_validate");
}

#[test]
fn corpus_server_request() {
    run("server_request");
}

#[test]
fn every_target_has_a_corpus_directory() {
    for (name, _) in checks::TARGETS {
        assert!(
            corpus_root().join(name).is_dir(),
            "fuzz/corpus/{name} missing"
        );
    }
}
