#!/usr/bin/env python3
"""Fails when the library's modules import each other in a circle.

Every path counts, not only `use` lines: `crate::a::b`, `super::x`, `self::x`, grouped
imports (`crate::{a, b::c}`) and a bare path into a child module (`real::residency` in
kernel/mod.rs), in expressions, types and attributes alike. Comments and string literals do
not count.

Two levels are checked:
- top-level modules (src/image.rs, src/kernel/, ...): an edge A -> B for every path from a file
  of A into B; any cycle is an error;
- inside a folder module (src/kernel/), its files (real.rs, sim.rs, ...): an edge between two
  siblings for every path from one into the other; any cycle is an error. The folder's mod.rs
  declares the seam its children implement, so paths between mod.rs and a child are not
  counted at this level.

    tools/check-imports.py [SRC_DIR]

Prints each cycle with one path that makes each of its edges, and exits 1 if there is any.
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """The text with comments, string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not text[i - 1].isalnum()):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i:j + 1]))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4] + "    ") and \
                re.match(r"'(\\[^']*|[^\\'])'", text[i:]):
            m = re.match(r"'(\\[^']*|[^\\'])'", text[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path tuple -> file
        for f in sorted(src.rglob("*.rs")):
            rel = f.relative_to(src)
            if rel.parts[0] == "bin" or rel == Path("lib.rs"):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "mod":
                parts.pop()
            self.files[tuple(parts)] = f

    def module_of(self, path):
        """The longest prefix of `path` that is a module file."""
        for k in range(len(path), 0, -1):
            if tuple(path[:k]) in self.files:
                return tuple(path[:k])
        return None


def group_heads(code, start):
    """The first segment of each item of the `{...}` group opening at `start`, with the rest
    of its path (`{a, b::c}` -> [a], [b, c])."""
    depth, j, item, items = 0, start, "", []
    while j < len(code):
        c = code[j]
        if c == "{":
            depth += 1
            if depth > 1:
                item += c
        elif c == "}":
            depth -= 1
            if depth == 0:
                items.append(item)
                break
            item += c
        elif c == "," and depth == 1:
            items.append(item)
            item = ""
        else:
            item += c
        j += 1
    heads = []
    for it in items:
        segs = re.findall(IDENT, it.split("{")[0])
        if segs:
            heads.append([s for s in segs if s not in ("as",)][:3])
    return heads


def references(crate, module, code):
    """(target module, line, text) for every path in `code` of `module` into another module."""
    # Inline `mod NAME {` blocks change what `super`/`self` mean inside them.
    inline = []  # (brace depth at open, name)
    depth = 0
    children = set(re.findall(r"\bmod\s+(" + IDENT + r")\s*;", code))
    out = []
    token = re.compile(r"\bmod\s+(" + IDENT + r")\s*\{|[{}]|\b(crate|super|self|" + IDENT +
                       r")((?:\s*::\s*(?:super|" + IDENT + r"))*)\s*::\s*(\{)?")
    for m in token.finditer(code):
        if m.group(1):
            depth += 1
            inline.append((depth, m.group(1)))
            continue
        if m.group(0) == "{":
            depth += 1
            continue
        if m.group(0) == "}":
            if inline and inline[-1][0] == depth:
                inline.pop()
            depth -= 1
            continue
        head = m.group(2)
        rest = re.findall(r"super|" + IDENT, m.group(3) or "")
        here = list(module) + [name for _, name in inline]
        if head == "crate":
            base = []
        elif head in ("super", "self"):
            base = list(here)
            segs = [head] + rest
            while segs and segs[0] in ("super", "self"):
                if segs.pop(0) == "super":
                    base.pop()
            rest = segs
        elif not inline and head in children:
            base, rest = list(module), [head] + rest
        else:
            continue
        tails = [rest]
        if m.group(4) and not rest:
            tails = group_heads(code, m.end() - 1)
        elif m.group(4):
            tails = [rest + h for h in group_heads(code, m.end() - 1)]
        for tail in tails:
            target = crate.module_of(base + tail)
            if target and target != module:
                line = code.count("\n", 0, m.start()) + 1
                out.append((target, line, m.group(0).strip() + "..."))
    return out


def cycles(edges):
    """Every elementary cycle's nodes, found by depth-first search (small graphs)."""
    found, seen = [], set()

    def walk(start, node, path):
        for nxt in sorted(edges.get(node, {})):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(list(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return found


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src")
    crate = Crate(src)
    top, inner = {}, {}
    for module, f in crate.files.items():
        code = strip_code(f.read_text())
        for target, line, text in references(crate, module, code):
            where = f"{f.relative_to(src.parent)}:{line}: {text}"
            if target[0] != module[0]:
                top.setdefault(module[0], {}).setdefault(target[0], where)
            elif len(module) > 1 and len(target) > 1 and module[:2] != target[:2]:
                # siblings inside one folder module (not via its mod.rs)
                a, b = "::".join(module[:2]), "::".join(target[:2])
                inner.setdefault(a, {}).setdefault(b, where)
    bad = 0
    for level, edges in (("module", top), ("file", inner)):
        for cycle in cycles(edges):
            bad += 1
            print(f"import circle between {level}s: {' -> '.join(cycle + [cycle[0]])}")
            for a, b in zip(cycle, cycle[1:] + cycle[:1]):
                print(f"  {a} -> {b}: {edges[a][b]}")
    edges_n = sum(len(v) for v in top.values())
    if bad:
        sys.exit(1)
    print(f"no import circle ({len(crate.files)} module files, {edges_n} edges between "
          f"top-level modules)")


if __name__ == "__main__":
    main()
