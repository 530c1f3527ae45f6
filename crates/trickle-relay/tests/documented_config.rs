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

/// Whether the code before a string literal reads it as a variable name: `env = "X"`, or a reader
/// call `get("X")` / `number(&get, "X")` / `std::env::var("X")`...
fn reads_env(before: &str) -> bool {
    let b = before.trim_end();
    if b.ends_with("env =") {
        return true;
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

/// Every environment variable the sources read, with a file that reads it.
fn variables_read() -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for (file, code) in sources() {
        for line in code.lines() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            let mut rest = line;
            let mut offset = 0;
            while let Some(open) = rest.find('"') {
                let after = &rest[open + 1..];
                let Some(close) = after.find('"') else { break };
                let literal = &after[..close];
                if is_var_name(literal) && reads_env(&line[..offset + open]) {
                    found.push((literal.to_string(), file.clone()));
                }
                offset += open + 1 + close + 1;
                rest = &after[close + 1..];
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
        if !table.contains(&format!("`{name}")) && !table.contains(&format!("{name}`")) {
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
