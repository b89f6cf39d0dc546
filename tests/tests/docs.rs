//! The docs name code that exists: every `Type::function`, `module::function` and file path
//! that `docs/architecture.md` walks a profile through is found in the source tree, so the map
//! cannot silently drift from the code it describes.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Every `.rs` file of the workspace crates (not target/, not fetched fuzz corpora).
fn sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = [
        "apm-agent",
        "apm-common",
        "apm-ebpf",
        "apm-listener",
        "proto",
        "xtask",
        "tests",
    ]
    .iter()
    .map(|d| root().join(d))
    .collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap_or_default()));
            }
        }
    }
    out
}

fn defines(src: &[(PathBuf, String)], kind: &[&str], name: &str) -> bool {
    src.iter().any(|(_, s)| {
        kind.iter().any(|k| {
            s.contains(&format!("{k} {name}("))
                || s.contains(&format!("{k} {name}<"))
                || s.contains(&format!("{k} {name} "))
                || s.contains(&format!("{k} {name};"))
        })
    })
}

#[test]
fn architecture_doc_names_only_code_that_exists() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).expect("the doc");
    let src = sources();
    let mut missing = Vec::new();
    let mut checked = 0;
    for (i, tok) in doc.split('`').enumerate() {
        if i % 2 == 0 {
            continue; // outside backticks
        }
        // Paths of the repository.
        if Path::new(tok).extension().is_some_and(|e| e == "rs") || tok.ends_with('/') {
            let found = [
                root().join(tok),
                root().join("apm-agent/src").join(tok),
                root().join("apm-listener/src").join(tok),
            ]
            .iter()
            .any(|p| p.exists())
                // A bare file name in a folder's row: some source file has that name.
                || (!tok.contains('/')
                    && src
                        .iter()
                        .any(|(p, _)| p.file_name().is_some_and(|n| n == tok)));
            checked += 1;
            if !found {
                missing.push(format!("path {tok}"));
            }
            continue;
        }
        // Code paths: a::b::C::f, C::f, or a bare function name followed by nothing else.
        if !tok.contains("::") || tok.contains(' ') || tok.contains('{') {
            continue;
        }
        // Functions of other crates (`libc::recvmmsg`) are not this project's to check.
        if ["libc::", "std::", "tokio::", "tonic::"]
            .iter()
            .any(|c| tok.starts_with(c))
        {
            continue;
        }
        let parts: Vec<&str> = tok.split("::").collect();
        let last = parts[parts.len() - 1];
        let last_is_type = last.chars().next().is_some_and(char::is_uppercase);
        checked += 1;
        let ok = if last_is_type {
            defines(&src, &["struct", "enum", "trait", "type"], last)
                || src.iter().any(|(_, s)| {
                    s.contains(&format!("    {last} {{"))
                        || s.contains(&format!("    {last},"))
                        || s.contains(&format!("    {last}("))
                })
        } else {
            defines(&src, &["fn"], last)
        };
        // The type segment before a method must exist too.
        let owner_ok = parts.len() < 2 || {
            let owner = parts[parts.len() - 2];
            !owner.chars().next().is_some_and(char::is_uppercase)
                || defines(&src, &["struct", "enum", "trait"], owner)
        };
        if !(ok && owner_ok) {
            missing.push(tok.to_string());
        }
    }
    assert!(
        checked > 30,
        "only {checked} names checked: did the doc lose its walk?"
    );
    assert!(
        missing.is_empty(),
        "docs/architecture.md names what the code does not have: {missing:?}"
    );
}

#[test]
fn architecture_doc_names_the_functions_of_the_walk() {
    // The walk names functions one by one; each of these must stay in it.
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).expect("the doc");
    for f in [
        "DgramReceiver::recv",
        "validate_profile",
        "Batcher::push",
        "SeqAllocator::allocate",
        "Router::accept",
        "Router::dispatch",
        "Transport::session",
        "Router::settle_ok",
    ] {
        assert!(doc.contains(f), "the walk lost {f}");
    }
}
