#!/usr/bin/env python3
"""The host crate's import graph, and the circles in it.

    python3 tools/import_graph.py            # check: exit 1 and print each circle if any
    python3 tools/import_graph.py --edges    # also print every file-to-file edge
    python3 tools/import_graph.py --floors   # the top-level modules, lowest floor first

Reads host/src/**/*.rs (comments and string literals stripped) and resolves every path that
names something in the crate -- `use crate::..`, `use super::..`, inline `crate::a::b::f()`,
and paths through a module name bound by `use` or `mod` -- to the file that *defines* the item,
following `pub use` re-exports (a re-export is a facade, not a dependency of its own). Two
graphs are checked:

- files: an edge A -> B when A uses an item defined in B, except where B is the mod.rs of a
  folder A is in (a folder's mod.rs holds what the files under it share, such as its error
  type: Rust's ordinary module pattern). Every circle is reported.
- top-level modules (data, model, train, ...): an edge when a file of one uses an item defined
  in another. A circle here means a lower floor reaches up.

Unit tests (`#[cfg(test)]` blocks) are code too and are included. Written instead of
`cargo modules dependencies` because that builds rust-analyzer (long, on a small machine);
this needs only Python 3.

KNOWN lists circles left open on purpose, each with its reason; they are printed but do not
fail the check. A circle that is not listed fails it, and so does a listed one whose members
changed (update or remove the entry).
"""
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host", "src")
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"

# Circles among files left open, with why. Members as module paths.
KNOWN = {
    frozenset({"plugins::exporter", "plugins::judge", "plugins::loss", "plugins::manifest",
               "plugins::native_host", "plugins::permissions", "plugins::sandbox"}):
        "inside plugins/: the sandbox's State and native_host hold the judge's Llm and the "
        "exporter's ExportCtx, which use the sandbox; manifest inspection loads a LossPlugin, and "
        "manifest and permissions use each other. Left for after the sandbox work in plugins/ "
        "(move Llm, ExportCtx and loss::MAX_LIVE into a module below the kinds, and inspection "
        "above them).",
}


def strip(src):
    """Source without comments, string and char literals (kept as empty quotes)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', src[i:]).group(1)
            end = src.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", src[i:i + 12]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(rel):
    """host/src-relative file path -> module path tuple ('train', 'trainer')."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def parse_use_tree(text, i, prefix, out):
    """Parses a `use` tree starting at text[i]; appends (path tuple, alias) to out; returns end."""
    path = list(prefix)
    while True:
        m = re.compile(r"\s*(" + IDENT + r"|\*|\{)").match(text, i)
        if not m:
            return i
        tok = m.group(1)
        i = m.end()
        if tok == "{":
            while True:
                i = parse_use_tree(text, i, path, out)
                m = re.compile(r"\s*([,}])").match(text, i)
                if not m:
                    return i
                i = m.end()
                if m.group(1) == "}":
                    return i
                if re.compile(r"\s*\}").match(text, i):
                    i = re.compile(r"\s*\}").match(text, i).end()
                    return i
        if tok == "*":
            out.append((tuple(path) + ("*",), None))
            return i
        path.append(tok)
        m = re.compile(r"\s*::").match(text, i)
        if m:
            i = m.end()
            continue
        m = re.compile(r"\s+as\s+(" + IDENT + ")").match(text, i)
        alias = None
        if m:
            alias, i = m.group(1), m.end()
        out.append((tuple(path), alias))
        return i


class File:
    def __init__(self, rel, text):
        self.rel = rel
        self.module = module_of(rel)
        self.text = strip(text)
        self.children = set(re.findall(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", self.text))
        self.defines = set(re.findall(
            r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+(?=fn))*"
            r"(?:fn|struct|enum|trait|type|const|static|union|macro_rules!)\s+(" + IDENT + ")", self.text))
        self.uses = []  # (absolute path, alias, is_pub, offset)
        for m in re.finditer(r"(?m)^\s*(pub(?:\([^)]*\))?\s+)?use\s+", self.text):
            items = []
            parse_use_tree(self.text, m.end(), [], items)
            for path, alias in items:
                self.uses.append((path, alias, bool(m.group(1)), m.start()))

    def inline_mod_depth(self, offset):
        """How many inline `mod x {` blocks enclose offset (for `super::` inside `mod tests`)."""
        depth = 0
        for m in re.finditer(r"\bmod\s+" + IDENT + r"\s*\{", self.text[:offset]):
            level, j = 1, m.end()
            while j < offset and level:
                level += {"{": 1, "}": -1}.get(self.text[j], 0)
                j += 1
            if level:
                depth += 1
        return depth


def load():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in sorted(names):
            if name.endswith(".rs") and name != "main.rs":
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, ROOT)
                with open(full, encoding="utf-8") as fh:
                    f = File(rel, fh.read())
                files[f.module] = f
    return files


class Graph:
    def __init__(self, files):
        self.files = files

    def absolute(self, f, path, offset):
        """A path as written in file f -> absolute module path, or None if not the crate's."""
        if not path:
            return None
        head = path[0]
        if head == "crate":
            return path[1:]
        if head in ("super", "self"):
            base = list(f.module) + ["<inline>"] * f.inline_mod_depth(offset)
            rest = list(path)
            while rest and rest[0] in ("super", "self"):
                if rest.pop(0) == "super":
                    base.pop()
            base = [b for b in base if b != "<inline>"]
            return tuple(base) + tuple(rest)
        if head in f.children:
            return f.module + path
        for upath, alias, _, _ in f.uses:
            name = alias or (upath[-1] if upath[-1] != "self" else upath[-2] if len(upath) > 1 else None)
            if name == head and upath[-1] != "*":
                base = self.absolute(f, tuple(p for p in upath if p != "self"), 0)
                if base is not None and self.is_module(base):
                    return base + path[1:]
        return None

    def is_module(self, path):
        return tuple(path) in self.files

    def resolve(self, path, seen=None):
        """Absolute path -> module path of the file that defines its first non-module item."""
        seen = seen or set()
        if path in seen:
            return None
        seen.add(path)
        mod = ()
        for k, seg in enumerate(path):
            if self.is_module(mod + (seg,)):
                mod = mod + (seg,)
                continue
            f = self.files.get(mod)
            if f is None:
                return None
            if seg == "*" or seg in f.defines:
                return mod
            for upath, alias, is_pub, off in f.uses:
                name = alias or upath[-1]
                if is_pub and (name == seg or upath[-1] == "*"):
                    target = self.absolute(f, upath if name != seg or upath[-1] != "*" else upath, off)
                    if target is None:
                        continue
                    if upath[-1] == "*":
                        target = target[:-1] + (seg,)
                    elif alias:
                        target = target[:-1] + (upath[-1],)
                    hit = self.resolve(target + tuple(path[k + 1:]), seen)
                    if hit is not None:
                        return hit
            return mod
        return mod

    def edges(self):
        """{(from module, to module)}: every use of an item defined in another file."""
        out = set()
        for f in self.files.values():
            refs = [(p, off) for p, _, is_pub, off in f.uses if not is_pub]
            for m in re.finditer(r"(?<![A-Za-z0-9_:])(" + IDENT + r"(?:\s*::\s*" + IDENT + r")+)", f.text):
                line_start = f.text.rfind("\n", 0, m.start()) + 1
                if re.match(r"\s*(pub(\([^)]*\))?\s+)?use\b", f.text[line_start:m.start()]):
                    continue  # handled through f.uses (with groups)
                refs.append((tuple(s.strip() for s in m.group(1).split("::")), m.start()))
            for path, off in refs:
                if path and path[-1] == "self":
                    continue  # binds a module name; its uses are resolved where they occur
                target = self.absolute(f, path, off)
                if target is None:
                    continue
                to = self.resolve(target)
                if to is not None and to != f.module:
                    out.add((f.module, to))
        return out


def circles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan)."""
    adj = defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.remove(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def name(module):
    return "::".join(module) or "crate"


def main():
    files = load()
    graph = Graph(files)
    edges = graph.edges()
    # A folder's mod.rs holds what the files under it share: their uses of it are not edges.
    file_edges = {(a, b) for a, b in edges if a[:len(b)] != b}
    top_edges = {(a[:1], b[:1]) for a, b in edges if a[:1] != b[:1] and a and b}
    if "--edges" in sys.argv:
        for a, b in sorted(edges):
            print(f"{name(a)} -> {name(b)}")
    bad = False
    for comp in circles(files.keys(), file_edges):
        known = KNOWN.get(frozenset(name(c) for c in comp))
        bad = bad or known is None
        label = "known circle" if known else "circle"
        print(f"{label} among files ({len(comp)}): " + ", ".join(name(c) for c in comp))
        if known:
            print(f"    (left open: {known})")
            if "--edges" not in sys.argv:
                continue
        inside = set(comp)
        for a, b in sorted(file_edges):
            if a in inside and b in inside:
                print(f"    {name(a)} -> {name(b)}")
    tops = {m[:1] for m in files if m}
    for comp in circles(tops, top_edges):
        bad = True
        print(f"circle among top-level modules: " + ", ".join(name(c) for c in comp))
        inside = set(comp)
        for a, b in sorted(edges):
            if a[:1] in inside and b[:1] in inside and a[:1] != b[:1]:
                print(f"    {name(a)} -> {name(b)}")
    if "--floors" in sys.argv:
        # Longest-path layering: a module's floor is one above the highest floor it uses.
        floor = {}
        def level(m, path=()):
            if m in floor:
                return floor[m]
            if m in path:
                return 0
            deps = [b for a, b in top_edges if a == m]
            floor[m] = 1 + max((level(d, path + (m,)) for d in deps), default=-1)
            return floor[m]
        for m in tops:
            level(m)
        for f in sorted(set(floor.values())):
            uses = lambda m: sorted(name(b) for a, b in top_edges if a == m)
            print(f"floor {f}: " + "; ".join(f"{name(m)} (uses {', '.join(uses(m)) or 'nothing'})"
                                            for m in sorted(tops) if floor[m] == f))
    if bad:
        sys.exit(1)
    rest = " apart from the known ones above" if any(
        KNOWN.get(frozenset(name(c) for c in comp)) for comp in circles(files.keys(), file_edges)) else ""
    print(f"no circles{rest}: {len(files)} files, {len(edges)} edges")


if __name__ == "__main__":
    main()
