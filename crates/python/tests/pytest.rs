//! Runs the Python package's tests (`python/tests`, pytest) against the library cargo built for
//! this very test run, so that `cargo nextest run` reports them with the Rust tests.
//!
//! Why from here rather than from `scripts/test.sh`: cargo builds this crate's library (the
//! `cdylib`, `rlib` beside it) as part of the same invocation that builds every other test, with
//! the same features, so nothing (rdkafka's bundled librdkafka above all) is compiled twice, and
//! the module Python imports can never be older than the Rust code under test.
//!
//! Installing: the package's Python files and the built library (as `_native.abi3.so`) are
//! linked into `target/python-pkg/trickle_relay/`, and a `.pth` file in the test venv
//! (`target/python-venv`, made by `scripts/python-env.sh`, run here if missing) puts that folder
//! on the venv's path: `import trickle_relay` then works in the venv and in every subprocess
//! it starts. Every step is idempotent and atomic (written aside, then renamed), so the tests
//! below can run at once. One test per file, so a failure names its file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Egress settings a developer's shell may have; the tests set what they need themselves.
const CLEARED_ENV: &[&str] = &[
    "SCOPE_TELEMETRY_LOG_SINK",
    "SCOPE_TELEMETRY_DISABLED",
    "DO_NOT_TRACK",
    "SCOPE_CLOUD_API_KEY",
    "SCOPE_METRICS_ENABLED",
    "DAYDREAM_METRICS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPIC",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "PYTHONPATH",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `target/` of this build: the test runs from `target/<profile>/deps/`.
fn target_dir() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let target = deps
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    (deps, target)
}

/// Replaces `link` with a symlink to `to`, atomically.
fn symlink(to: &Path, link: &Path) {
    let tmp = link.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename symlink into place");
}

/// Writes `text` to `path` unless it already holds it, atomically.
fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// The venv's interpreter, with the package installed (once per test binary).
fn python() -> &'static PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = repo_root();
        let venv = std::env::var_os("TRICKLE_RELAY_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/python-venv"));
        let venv = if venv.is_absolute() {
            venv
        } else {
            root.join(venv)
        };
        let python = venv.join("bin/python");
        if !python.exists() {
            let status = Command::new(root.join("scripts/python-env.sh"))
                .status()
                .expect("run scripts/python-env.sh");
            assert!(status.success(), "scripts/python-env.sh failed");
        }
        let (deps, target) = target_dir();
        let lib = deps.join("libtrickle_relay_native.so");
        assert!(
            lib.exists(),
            "{} is missing: cargo builds it with this test",
            lib.display()
        );
        let pkg_root = target.join("python-pkg");
        let pkg = pkg_root.join("trickle_relay");
        std::fs::create_dir_all(&pkg).expect("create target/python-pkg");
        let src = root
            .join("python/trickle_relay")
            .canonicalize()
            .expect("python/trickle_relay");
        for entry in std::fs::read_dir(&src).expect("read python/trickle_relay") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().expect("file name").to_owned();
            if path.is_file() {
                symlink(&path, &pkg.join(name));
            }
        }
        symlink(&lib, &pkg.join("_native.abi3.so"));
        let purelib = Command::new(&python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ])
            .output()
            .expect("ask the venv for its site-packages");
        assert!(purelib.status.success(), "{purelib:?}");
        let site = PathBuf::from(String::from_utf8_lossy(&purelib.stdout).trim());
        write_if_changed(
            &site.join("trickle_relay_dev.pth"),
            &format!("{}\n", pkg_root.display()),
        );
        python
    })
}

/// Runs pytest on one file of `python/tests`; fails with pytest's output.
fn pytest(file: &str) {
    let python = python();
    let mut cmd = Command::new(python);
    // From the repository root: `python -m` puts the working directory on `sys.path`, and
    // `python/` there would shadow the installed package with its sources (no native module).
    cmd.current_dir(repo_root())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"])
        .arg(format!("python/tests/{file}"))
        .env("TRICKLE_RELAY_LOG", "info");
    for var in CLEARED_ENV {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "pytest python/tests/{file} failed:\n{text}"
    );
}

#[test]
fn python_envelope() {
    pytest("test_envelope.py");
}

#[test]
fn python_sinks() {
    pytest("test_sinks.py");
}

#[test]
fn python_relay() {
    pytest("test_relay.py");
}

#[test]
fn python_fresh_venv() {
    pytest("test_fresh_venv.py");
}
