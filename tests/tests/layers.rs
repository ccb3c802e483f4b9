//! The module structure stays as `docs/design.md` describes it: in every crate of the workspace
//! no two files import each other, directly or through others, and spin-core's top-level modules
//! only import from layers below their own. Imports are read from the sources (`crate::…`,
//! `super::…` and `use` trees, outside comments), tests included; a `mod.rs` or crate root
//! declaring and re-exporting its own children is structure, not a dependency.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// spin-core's layers, lowest first; a module may import from its own layer and those before it.
const SPIN_CORE_LAYERS: &[&[&str]] = &[
    &["base", "error"],
    &["kernels"],
    &["device"],
    &["nn"],
    &["models"],
    &["data"],
    &["checkpoint"],
    &["sharing"],
    &["fusion"],
    &["train"],
    &["fips"],
];

/// A crate's files by module path (`["models", "vit"]`; the root is `[]`).
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if name != "mod" && name != "lib" && name != "main" {
                    p.push(name);
                }
                out.insert(p, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// Every path a source names after `crate::` or `super::`, with `use` trees expanded; `super`
/// paths come back already resolved against `module` (a `mod.rs` or root is `is_dir`).
fn references(text: &str, module: &[String], is_dir: bool) -> Vec<Vec<String>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let (base, skip): (Vec<String>, usize) = if rest.starts_with("crate::") {
            (vec![], "crate::".len())
        } else if rest.starts_with("super::") {
            // A file's module is its path; a mod.rs or root is the folder's module itself.
            let mut parent = module.to_vec();
            let _ = is_dir;
            parent.pop();
            (parent, "super::".len())
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let preceded_by_ident = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        i += skip;
        if preceded_by_ident {
            continue;
        }
        let (paths, used) = use_tree(&text[i..]);
        for p in paths {
            let mut full = base.clone();
            full.extend(p);
            out.push(full);
        }
        i += used.max(1);
    }
    out
}

/// Parses `a::b::{c, d::e}` at the start of `s` into paths; returns them and the bytes read.
fn use_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let mut segs = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            segs.push(s[start..i].to_string());
        }
        if s[i..].starts_with("::{") {
            i += 3;
            let mut out = Vec::new();
            loop {
                while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    i += 1;
                    return (out, i);
                }
                let (inner, used) = use_tree(&s[i..]);
                for p in inner {
                    let mut full = segs.clone();
                    full.extend(p);
                    out.push(full);
                }
                i += used.max(1);
                // Skip an `as alias` or anything else up to the next separator.
                while i < b.len() && b[i] != b',' && b[i] != b'}' {
                    i += 1;
                }
            }
        } else if s[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![segs], i);
        }
    }
}

/// The file a path refers to: its longest prefix that is a module.
fn resolve<'a>(path: &[String], mods: &'a BTreeMap<Vec<String>, PathBuf>) -> Option<&'a Vec<String>> {
    (0..=path.len())
        .rev()
        .find_map(|n| mods.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// Edges between a crate's files; a module's edges to its own descendants are structure.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules(src);
    let mut g = BTreeMap::new();
    for (m, path) in &mods {
        let is_dir = matches!(
            path.file_name().and_then(|n| n.to_str()),
            Some("mod.rs" | "lib.rs" | "main.rs")
        );
        // Comments (doc links included) are not imports.
        let text: String = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        // `super` in a file's `#[cfg(test)] mod tests` is the file's own module.
        let (code, tests) = text.split_at(text.find("#[cfg(test)]").unwrap_or(text.len()));
        let mut as_child = m.clone();
        as_child.push("tests".into());
        let mut refs = references(code, m, is_dir);
        refs.extend(references(tests, &as_child, false));
        let mut targets = BTreeSet::new();
        for r in refs {
            if let Some(t) = resolve(&r, &mods) {
                if t != m && !t.starts_with(m) {
                    targets.insert(t.clone());
                }
            }
        }
        g.insert(m.clone(), targets);
    }
    g
}

/// A cycle in the graph, if there is one.
fn find_cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for t in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(t, g, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    g.keys().find_map(|n| visit(n, g, &mut state, &mut Vec::new()))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn show(path: &[Vec<String>]) -> String {
    let names: Vec<String> = path.iter().map(|m| format!("crate::{}", m.join("::"))).collect();
    names.join(" → ")
}

#[test]
fn no_file_imports_itself_through_others() {
    for krate in [
        "spin-core/src",
        "spin-core/rules/src",
        "spin-macros/src",
        "zoo/src",
    ] {
        let g = graph(&root().join(krate));
        assert!(g.len() > 3, "{krate}: too few files found");
        if let Some(c) = find_cycle(&g) {
            panic!("{krate}: import cycle {}", show(&c));
        }
    }
}

#[test]
fn spin_core_layers_only_import_downwards() {
    let rank = |m: &[String]| {
        let top = m.first()?;
        SPIN_CORE_LAYERS
            .iter()
            .position(|layer| layer.contains(&top.as_str()))
    };
    let g = graph(&root().join("spin-core/src"));
    let mut bad = Vec::new();
    for (from, targets) in &g {
        let Some(rf) = rank(from) else { continue }; // the crate root wires the layers up
        for to in targets {
            // The crate root only declares the layers and re-exports; importing through it would
            // hide where a name comes from.
            let rt = rank(to).unwrap_or_else(|| {
                panic!(
                    "{} imports {}: name the module instead",
                    show(std::slice::from_ref(from)),
                    show(std::slice::from_ref(to))
                )
            });
            let same_module = from.first() == to.first();
            if rt > rf || (rt == rf && !same_module) {
                bad.push(show(&[from.clone(), to.clone()]));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
    // The checker itself sees imports: models use nn, and a cycle is found when there is one.
    assert!(g[&vec!["models".to_string(), "vit".to_string()]].contains(&vec!["nn".into(), "layers".into()]));
    let mut cyclic = g.clone();
    cyclic
        .entry(vec!["base".into()])
        .or_default()
        .insert(vec!["models".into(), "vit".into()]);
    assert!(find_cycle(&cyclic).is_some());
}

#[test]
fn use_trees_expand_to_every_path() {
    let refs = references(
        "use crate::a::{b, c::{d, e as f}};\nlet x = super::g::h(crate::i);",
        &["m".into(), "n".into()],
        false,
    );
    let want: Vec<Vec<String>> = [
        &["a", "b"][..],
        &["a", "c", "d"],
        &["a", "c", "e"],
        &["m", "g", "h"],
        &["i"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(refs, want);
}

#[test]
fn source_files_stay_short() {
    let mut long = Vec::new();
    for krate in [
        "spin-core/src",
        "spin-core/rules/src",
        "spin-macros/src",
        "zoo/src",
    ] {
        for path in modules(&root().join(krate)).values() {
            let lines = std::fs::read_to_string(path).unwrap().lines().count();
            if lines > 500 {
                long.push(format!("{}: {lines} lines", path.display()));
            }
        }
    }
    assert!(long.is_empty(), "files over 500 lines:\n{}", long.join("\n"));
}
