//! The shape of `src/`: no top-level module imports one that imports it back (directly or
//! around a longer circle), and no function is longer than a reader can hold.
//!
//! Read from the source text, outside `#[cfg(test)]` modules: a `crate::<module>` path in
//! module A is an edge A → module. `src/lib.rs` and `src/main.rs` sit above everything and are
//! not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest function `src/` may hold, in lines.
const LONGEST: usize = 120;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text without its `#[cfg(test)] mod tests { ... }` (always last in this codebase).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests")
        .map_or(text, |at| &text[..at])
}

/// The top-level module a file belongs to: `src/proxy/body.rs` → `proxy`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src/");
    let first = rel.components().next().expect("a path component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// Edges between top-level modules, from `crate::x` paths and `use crate::{x, ...}` lists.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let from = module_of(&src, &file);
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let code: String = without_tests(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut targets = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                for item in list[..end].split(',') {
                    targets.insert(ident(item.trim()));
                }
            } else {
                targets.insert(ident(rest));
            }
        }
        targets.retain(|t| {
            !t.is_empty() && *t != from && t.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
        graph.entry(from).or_default().extend(targets);
    }
    graph
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// A circle through `start`, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut found = path.clone();
                found.push(start.to_owned());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = edges();
    assert!(
        graph.len() > 10,
        "too few modules read from src/: {:?}",
        graph.keys()
    );
    let circles: BTreeSet<String> = graph
        .keys()
        .filter_map(|m| circle(&graph, m))
        .map(|c| c.join(" → "))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles between top-level modules (move the shared piece to a lower room):\n{}",
        circles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        circle(&graph, "a").map(|c| c.join(" ")),
        Some("a b c a".to_owned())
    );
    graph.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(circle(&graph, "a"), None);
}

/// Each `fn` in `src/` outside tests, with its length in lines (from its line to the line
/// where its braces close).
fn function_lengths() -> Vec<(String, usize)> {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let lines: Vec<&str> = without_tests(&text).lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "pub(super) async fn ",
                "const fn ",
                "pub const fn ",
            ]
            .iter()
            .any(|p| t.starts_with(p));
            if !is_fn || t.ends_with(';') {
                continue;
            }
            let mut depth = 0i64;
            let mut opened = false;
            for (j, l) in lines.iter().enumerate().skip(i) {
                for c in l.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if opened && depth <= 0 {
                    let name = t.split('(').next().unwrap_or(t).to_owned();
                    out.push((format!("{}: {name}", file.display()), j - i + 1));
                    break;
                }
                if !opened && l.trim_end().ends_with(';') {
                    break;
                }
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_a_screenful_or_two() {
    let lengths = function_lengths();
    assert!(
        lengths.len() > 200,
        "too few functions read: {}",
        lengths.len()
    );
    let long: Vec<String> = lengths
        .into_iter()
        .filter(|(_, n)| *n > LONGEST)
        .map(|(name, n)| format!("{n} lines: {name}"))
        .collect();
    assert!(
        long.is_empty(),
        "functions longer than {LONGEST} lines (split them into their phases):\n{}",
        long.join("\n")
    );
}

#[test]
fn run_reads_in_one_screen() {
    let lengths = function_lengths();
    let run = lengths
        .iter()
        .find(|(name, _)| name.ends_with("src/lib.rs: pub async fn run"))
        .expect("src/lib.rs has `pub async fn run`");
    assert!(run.1 <= 60, "run is {} lines", run.1);
}
