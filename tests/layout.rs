//! The layout rule of `src/lib.rs`: the top-level modules (folders and files) depend on each
//! other without a cycle, so the tree reads bottom-up. A dependency is any `crate::name` path
//! outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `code` names through `crate::…`, including `use crate::{a, b::c}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item at the group's own depth: `{a::{b, c}, d}` names a, d.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        names.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| n.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    names
}

/// The graph of top-level modules, from the sources themselves.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let top = relative
            .components()
            .next()
            .expect("a first component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let before_tests = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String = before_tests
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(top.clone()).or_default();
        deps.extend(named_modules(&code).into_iter().filter(|m| *m != top));
    }
    graph
}

/// A cycle reachable from the last module on `path` (modules in `done` have none), if any.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    let here = path.last().expect("a path").clone();
    for next in graph.get(&here).into_iter().flatten() {
        if let Some(at) = path.iter().position(|p| p == next) {
            let mut cycle = path[at..].to_vec();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(cycle) = cycle_from(graph, path, done) {
            return Some(cycle);
        }
        path.pop();
    }
    done.insert(here);
    None
}

#[test]
fn top_level_modules_depend_on_each_other_without_a_cycle() {
    let graph = module_graph();
    assert!(
        graph.len() >= 10 && graph["layers"].contains("gateway"),
        "the scan found the modules and their imports: {graph:?}"
    );
    let mut done = BTreeSet::new();
    for start in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, &mut vec![start.clone()], &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_scan_sees_a_cycle_where_there_is_one() {
    let mut graph = module_graph();
    graph
        .entry("http1".into())
        .or_default()
        .insert("layers".into());
    let cycle = cycle_from(&graph, &mut vec!["http1".into()], &mut BTreeSet::new());
    assert!(cycle.is_some(), "http1 -> layers -> … -> http1 is a cycle");
}

#[test]
fn grouped_imports_are_read_module_by_module() {
    let names = named_modules(
        "use crate::{body::{ProxyBody, full}, error};\nlet x = crate::ErrorChain(e);",
    );
    assert_eq!(
        names,
        BTreeSet::from(["body".to_owned(), "error".to_owned()])
    );
}
