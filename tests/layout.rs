//! The module layout: the dependency picture of `src/` has no circle, and no module below the broker imports it.
//! Each file is parsed with `syn`; a path starting with `crate::` (or `super::`, which is the crate root in a
//! top-level file), in a `use`, an expression, a type or a macro's tokens, outside `#[cfg(test)]` items, is an
//! edge to the module it names, or, for a name the crate root re-exports (`crate::Broker`), to the module that
//! defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// The modules allowed to import `broker`: those above it (they build it or wrap it).
const ABOVE_BROKER: &[&str] = &["builder", "asynchronous"];

/// Module (file stem) to the set of modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_graph() -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("src/{name}: {e}"))
    };
    let root = Root::parse(&read("lib.rs"));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if let (Some(stem), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) {
            if stem != "lib" {
                files.insert(stem.to_owned(), read(&format!("{stem}.rs")));
            }
        }
    }
    files
        .iter()
        .map(|(module, text)| {
            let deps = crate_names(text)
                .into_iter()
                .filter_map(|name| root.resolve(&name))
                .filter(|dep| dep != module && files.contains_key(dep))
                .collect();
            (module.clone(), deps)
        })
        .collect()
}

/// What the crate root declares: its modules (by name, to their file stems) and the names it re-exports.
#[derive(Default)]
struct Root {
    modules: BTreeMap<String, String>,
    reexports: BTreeMap<String, String>,
}

impl Root {
    fn parse(lib: &str) -> Root {
        let file = syn::parse_file(lib).expect("src/lib.rs parses");
        let mut root = Root::default();
        for item in &file.items {
            match item {
                syn::Item::Mod(m) => {
                    let name = m.ident.to_string();
                    let file = m
                        .attrs
                        .iter()
                        .find(|a| a.path().is_ident("path"))
                        .and_then(|a| match &a.meta {
                            syn::Meta::NameValue(nv) => match &nv.value {
                                syn::Expr::Lit(syn::ExprLit {
                                    lit: syn::Lit::Str(s),
                                    ..
                                }) => Some(s.value().trim_end_matches(".rs").to_owned()),
                                _ => None,
                            },
                            _ => None,
                        })
                        .unwrap_or_else(|| name.clone());
                    root.modules.insert(name, file);
                }
                syn::Item::Use(u) => {
                    let mut found = Vec::new();
                    leaves(&u.tree, &mut Vec::new(), &mut found);
                    for (path, name) in found {
                        if let Some(module) = path.first() {
                            root.reexports.insert(name, module.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        root
    }

    /// The file of the module that `crate::<name>` refers to, if `name` is one of the crate's modules or items.
    fn resolve(&self, name: &str) -> Option<String> {
        let module = self.reexports.get(name).map_or(name, |m| m.as_str());
        self.modules.get(module).cloned()
    }
}

/// Every `(path, name)` a use tree brings in, `path` being the segments before the name.
fn leaves(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push((prefix.clone(), n.ident.to_string())),
        syn::UseTree::Rename(r) => out.push((prefix.clone(), r.rename.to_string())),
        syn::UseTree::Glob(_) => {}
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| leaves(t, prefix, out)),
    }
}

/// The names that follow `crate::` (or `super::`) at the start of a path anywhere in `source`, outside items
/// marked `#[cfg(test)]`.
fn crate_names(source: &str) -> BTreeSet<String> {
    let file = syn::parse_file(source).expect("a source file of the crate parses");
    let mut visitor = CratePaths::default();
    visitor.visit_file(&file);
    visitor.names
}

#[derive(Default)]
struct CratePaths {
    names: BTreeSet<String>,
}

fn is_root(segment: &str) -> bool {
    segment == "crate" || segment == "super"
}

fn cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Ident>()
                .is_ok_and(|ident| ident == "test")
    })
}

impl<'ast> Visit<'ast> for CratePaths {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            _ => &[],
        };
        if !cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let mut found = Vec::new();
        leaves(&item.tree, &mut Vec::new(), &mut found);
        for (path, name) in found {
            match path.as_slice() {
                [root, module, ..] if is_root(root) => {
                    self.names.insert(module.clone());
                }
                [root] if is_root(root) => {
                    self.names.insert(name);
                }
                _ => {}
            }
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter().map(|s| s.ident.to_string());
        if let (Some(root), Some(next)) = (segments.next(), segments.next()) {
            if is_root(&root) {
                self.names.insert(next);
            }
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

impl CratePaths {
    /// `crate :: name` in a macro's tokens, which `syn` leaves unparsed (`log::warn!("{}", crate::x::f())`).
    fn tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, token) in tokens.iter().enumerate() {
            match token {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) if is_root(&ident.to_string()) => {
                    if let [TokenTree::Punct(a), TokenTree::Punct(b), TokenTree::Ident(name), ..] =
                        &tokens[i + 1..]
                    {
                        if a.as_char() == ':' && b.as_char() == ':' {
                            self.names.insert(name.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// A circle in `graph`, as the modules along it (the first repeated at the end), if it has one.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    // Depth-first search with colours: 1 on the stack, 2 done.
    fn visit(
        node: &str,
        graph: &Graph,
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
fn the_checker_sees_every_kind_of_path() {
    let names = crate_names(
        r#"
        use crate::{a, b::{C, D}, c::E};
        use crate::Reexported;
        use super::s::T;
        // crate::commented
        const Q: &str = "crate::quoted \
            crate::continued";
        fn f() -> crate::ty::Type {
            crate::d::f();
            log::warn!("{}", crate::in_macro::g());
            let c = '"'; crate::after_char::h();
        }
        #[cfg(test)]
        mod tests {
            use crate::only_tests;
        }
        #[cfg(test)]
        fn helper() { crate::test_helper::x(); }
        "#,
    );
    let expected = [
        "Reexported",
        "a",
        "after_char",
        "b",
        "c",
        "d",
        "in_macro",
        "s",
        "ty",
    ];
    assert_eq!(
        names,
        expected.iter().map(|s| s.to_string()).collect(),
        "comments, strings and #[cfg(test)] items are skipped; everything else is seen"
    );
    let root = Root::parse(
        "mod broker;\n#[path = \"x_impl.rs\"]\npub mod x;\npub use broker::{Broker, Other as Renamed};",
    );
    assert_eq!(root.resolve("Broker").as_deref(), Some("broker"));
    assert_eq!(root.resolve("Renamed").as_deref(), Some("broker"));
    assert_eq!(root.resolve("x").as_deref(), Some("x_impl"));
    assert_eq!(root.resolve("nothing"), None);
    let graph: Graph = [("x", "y"), ("y", "z"), ("z", "x")]
        .iter()
        .map(|(a, b)| (a.to_string(), [b.to_string()].into_iter().collect()))
        .collect();
    assert_eq!(
        circle(&graph).map(|c| c.len()),
        Some(4),
        "x -> y -> z -> x is found"
    );
}
