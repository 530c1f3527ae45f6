//! The README documents what the code reads: every environment variable the sources read (clap
//! `env = "..."` attributes and the config readers' `get("...")`, `env("...")`, `var("...")`...)
//! is in the README's configuration table, every variable the table names is read somewhere, and
//! every HTTP route the commands serve is in its endpoint table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// System variables read only to find a home directory or a program: not settings of ours.
const SYSTEM: &[&str] = &["HOME", "PATH"];

/// Calls that read an environment variable by name, as the sources write them.
const READERS: &[&str] = &[
    "get",
    "env",
    "set",
    "ms",
    "number",
    "var",
    "var_os",
    "try_from_env",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The non-test source of every crate: each file up to its `#[cfg(test)]` module.
fn sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let src = krate.path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
            (f, code)
        })
        .collect()
}

fn is_var_name(s: &str) -> bool {
    s.len() >= 3
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Whether the code before a string literal reads it as a variable name: `env = "X"`, a reader
/// call `get("X")` / `number(&get, "X")` / `std::env::var("X")` (also split over lines by
/// rustfmt), or a constant named for it, `const FORMAT_ENV: &str = "X"` (used as `env = FORMAT_ENV`).
fn reads_env(before: &str) -> bool {
    let b = before.trim_end();
    if b.ends_with("env =") {
        return true;
    }
    if let Some(decl) = b.strip_suffix(": &str =") {
        let name = decl
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        if name.ends_with("_ENV") && decl.trim_end_matches(name).trim_end().ends_with("const") {
            return true;
        }
    }
    // `number(&get, ` -> `number(`; `set(&env, ` -> `set(`.
    let b = match b.strip_suffix(',') {
        Some(rest) => match rest.rfind('(') {
            Some(open) if rest[open + 1..].trim().starts_with('&') => &rest[..=open],
            _ => return false,
        },
        None => b,
    };
    let Some(call) = b.strip_suffix('(') else {
        return false;
    };
    let name = call
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    READERS.contains(&name)
}

/// The string literals of Rust source (comment lines left out), each with the code before it:
/// a small lexer that knows escapes, raw strings and the char literal `'"'`.
fn literals(code: &str) -> Vec<(String, String)> {
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' if bytes.get(i + 1) == Some(&b'"') && bytes.get(i + 2) == Some(&b'\'') => i += 3,
            b'r' if bytes.get(i + 1).is_some_and(|&c| c == b'#' || c == b'"')
                && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) =>
            {
                let hashes = bytes[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if bytes.get(open) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let end = code[open + 1..]
                    .find(&close)
                    .map_or(code.len(), |e| open + 1 + e);
                found.push((before(&code, i), code[open + 1..end].to_string()));
                i = end + close.len();
            }
            b'"' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != b'"' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                let end = j.min(bytes.len());
                found.push((before(&code, i), code[i + 1..end].to_string()));
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// Up to 200 bytes of code before byte `at` (enough for `number(&get, ` or `env = `).
fn before(code: &str, at: usize) -> String {
    let mut from = at.saturating_sub(200);
    while !code.is_char_boundary(from) {
        from -= 1;
    }
    code[from..at].to_string()
}

/// Every environment variable the sources read, with a file that reads it.
fn variables_read() -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for (file, code) in sources() {
        for (before, literal) in literals(&code) {
            if is_var_name(&literal) && reads_env(&before) {
                found.push((literal, file.clone()));
            }
        }
    }
    found
}

/// The README's section `## Configuration`, split into its variable table and the rest.
fn configuration() -> (String, String) {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("\n## Configuration\n")
        .expect("the README has a section \"## Configuration\"");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let table_start = section.find("| variable |").expect("the variable table");
    let table_end = section[table_start..]
        .find("\n\n")
        .map_or(section.len(), |i| table_start + i);
    (
        section[table_start..table_end].to_string(),
        section[table_end..].to_string(),
    )
}

#[test]
fn every_variable_the_code_reads_is_in_the_readme_table_and_the_table_names_only_those() {
    let read = variables_read();
    let names: BTreeSet<&str> = read.iter().map(|(n, _)| n.as_str()).collect();
    // Sanity: the scan sees the kinds of reads the code has.
    for expected in [
        "RUNNER_JOB_ID",
        "SCOPE_METRICS_GZIP",
        "SCOPE_KAFKA_FLUSH_TIMEOUT_MS",
        "COLLECTOR_API_KEYS",
        "DO_NOT_TRACK",
        "TRICKLE_RELAY_LOG",
        "TRICKLE_RELAY_LOG_FORMAT",
        "SCOPE_METRICS_MAX_BATCH",
    ] {
        assert!(
            names.contains(expected),
            "the scan misses {expected}: {names:?}"
        );
    }
    let (table, _) = configuration();
    let mut missing = Vec::new();
    for (name, file) in &read {
        if SYSTEM.contains(&name.as_str()) {
            continue;
        }
        if !table.contains(&format!("`{name}`")) && !table.contains(&format!("`{name}=")) {
            missing.push(format!("{name} (read in {})", file.display()));
        }
    }
    missing.dedup();
    assert!(
        missing.is_empty(),
        "read by the code, missing from the README's configuration table: {missing:?}"
    );
    // The other way: each variable the table's first column names is read.
    let mut stale = Vec::new();
    for row in table.lines().skip(2) {
        let first = row.split('|').nth(1).unwrap_or("");
        for quoted in first.split('`').skip(1).step_by(2) {
            let name = quoted.split('=').next().unwrap_or("");
            if is_var_name(name) && !names.contains(name) {
                stale.push(name.to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "in the README's table, read nowhere: {stale:?}"
    );
}

#[test]
fn every_http_route_the_commands_serve_is_in_the_readme() {
    let (_, rest) = configuration();
    let mut routes = BTreeSet::new();
    for (_, code) in sources() {
        let mut text = code.as_str();
        while let Some(at) = text.find(".route(") {
            let after = text[at + ".route(".len()..].trim_start();
            if let Some(path) = after.strip_prefix('"').and_then(|p| p.split('"').next()) {
                routes.insert(path.to_string());
            }
            text = &text[at + 1..];
        }
    }
    assert!(
        routes.contains("/egress") && routes.contains("/v1/metrics"),
        "the scan sees the routes: {routes:?}"
    );
    // ` /path` followed by what ends a path (a backtick, `?`, a space...), not a longer path.
    let mentions = |path: &str| {
        rest.match_indices(&format!(" {path}")).any(|(at, m)| {
            rest[at + m.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || "_-/".contains(c)))
        })
    };
    let missing: Vec<&String> = routes.iter().filter(|r| !mentions(r)).collect();
    assert!(
        missing.is_empty(),
        "served, missing from the README's endpoint table: {missing:?}"
    );
}
