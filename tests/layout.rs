//! The module layout: each module of `src/` imports only modules below it, so the dependency picture has no
//! circle, and no module below the broker imports it. Reads the sources: a `crate::<module>` path (in a `use`,
//! a grouped `use crate::{…}` or an expression) outside comments and `#[cfg(test)]` modules is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules allowed to import `broker`: those above it (they build it or wrap it).
const ABOVE_BROKER: &[&str] = &["builder", "asynchronous"];

/// Module name to the set of modules it imports.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        let (Some(stem), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        if stem == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a readable source file");
        sources.insert(stem.to_owned(), code_only(&text));
    }
    let names: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(module, code)| {
            let deps = crate_paths(code)
                .into_iter()
                .filter(|dep| dep != module && names.contains(dep))
                .collect();
            (module.clone(), deps)
        })
        .collect()
}

/// `text` without comments, string literals' contents and the `#[cfg(test)] mod tests` block (tests may use
/// anything).
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_string && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The first path segment after every `crate::` in `code`, including each item of a grouped
/// `crate::{a, b::c}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items only, up to the matching brace: nested groups name items of the same module.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// A circle in `graph`, as the modules along it (the first repeated at the end), if it has one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search with colours: 1 on the stack, 2 done.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match colour.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut found = stack[from..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                0 => {
                    if let Some(found) = visit(next, graph, colour, stack) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(node.to_owned(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for node in graph.keys() {
        if colour.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(found) = visit(node, graph, &mut colour, &mut Vec::new()) {
                return Some(found);
            }
        }
    }
    None
}

#[test]
fn the_module_picture_has_no_circle() {
    let graph = module_graph();
    assert!(graph.len() > 20, "read too few modules: {:?}", graph.keys());
    if let Some(found) = circle(&graph) {
        panic!("module circle: {}", found.join(" -> "));
    }
}

#[test]
fn no_module_below_the_broker_imports_it() {
    let importers: Vec<String> = module_graph()
        .into_iter()
        .filter(|(module, deps)| {
            deps.contains("broker") && !ABOVE_BROKER.contains(&module.as_str())
        })
        .map(|(module, _)| module)
        .collect();
    assert!(
        importers.is_empty(),
        "modules below the broker import it: {importers:?}; give them the `shared::Shared` they need instead"
    );
}

#[test]
fn the_checker_sees_a_circle_and_grouped_imports() {
    let code = code_only(
        "use crate::{a, b::{C, D}, c::E};\n// crate::commented\nlet s = \"crate::quoted\";\ncrate::d::f();\n",
    );
    let paths = crate_paths(&code);
    assert_eq!(
        paths,
        ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [("x", "y"), ("y", "z"), ("z", "x")]
        .iter()
        .map(|(a, b)| (a.to_string(), [b.to_string()].into_iter().collect()))
        .collect();
    assert_eq!(
        circle(&graph).map(|c| c.len()),
        Some(4),
        "x -> y -> z -> x is found"
    );
}
