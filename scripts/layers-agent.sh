#!/usr/bin/env bash
# The agent's layering, checked from its source: exits non-zero, saying why, when
#
# - the modules of agent/src import each other in a circle. A module's edges are every
#   `crate::…` path it names (in `use` trees and inline), resolved to the longest module
#   path that exists, plus one edge from each module to the file submodules it declares
#   (so a submodule naming its own parent is a circle too). Inline `#[cfg(test)] mod tests`
#   blocks and comments are not counted;
# - a module other than `link` starts the executor, the health monitor or the event
#   follower (`Executor::start`, `Runner::start`, `Monitor::start`, `Follower::start`);
# - a `dev.flotilla` label key is spelled outside `labels.rs`.
#
# Usage: scripts/layers-agent.sh [SRC_DIR]   (default: agent/src)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-agent/src}"
[ -d "$src" ] || { echo "layers-agent: no directory $src" >&2; exit 2; }
command -v python3 >/dev/null || { echo "layers-agent: python3 is needed" >&2; exit 2; }

python3 - "$src" <<'PY'
import os
import re
import sys

src = sys.argv[1]
ROOTS = {"lib.rs", "main.rs"}


def module_of(rel):
    """agent/src/runtime/probe.rs -> runtime::probe"""
    return rel[:-3].replace(os.sep, "::")


def strip(text):
    """Source without comments, string/char literals or inline test modules."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or (c == "'" and re.match(r"'\\u\{[0-9a-fA-F]+\}'", text[i:i + 12])):
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    # Inline test modules: `#[cfg(test)] mod name { … }`, removed by brace matching.
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", code)
        if not m:
            return code
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        code = code[:m.start()] + code[j:]


TOKEN = re.compile(r"\s*(::|[A-Za-z_][A-Za-z0-9_]*|.)", re.S)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokens(code, at, limit=4000):
    """The tokens after `at` (enough for any use tree)."""
    return [m.group(1) for m in TOKEN.finditer(code[at:at + limit])]


def use_paths(toks, i, prefix):
    """Expands the use tree (or plain path) at toks[i] into its leaf paths; returns
    (paths, next index)."""
    path = list(prefix)
    while i < len(toks) and IDENT.fullmatch(toks[i]) and toks[i] != "as":
        path.append(toks[i])
        i += 1
        if i < len(toks) and toks[i] == "::":
            i += 1
        else:
            return [path], i
    if i < len(toks) and toks[i] == "{":
        i += 1
        paths = []
        while i < len(toks) and toks[i] != "}":
            sub, i = use_paths(toks, i, path)
            paths.extend(sub)
            # Skip `as name`, then the comma.
            while i < len(toks) and toks[i] not in (",", "}", "{"):
                i += 1
            if i < len(toks) and toks[i] == ",":
                i += 1
        return paths, i + 1
    if i < len(toks) and toks[i] == "*":
        i += 1
    return [path], i


files = {}
for dirpath, _, names in os.walk(src):
    for name in names:
        if name.endswith(".rs"):
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            if rel not in ROOTS:
                if name == "mod.rs":
                    print(f"layers-agent: {rel}: use `foo.rs` + `foo/`, not mod.rs", file=sys.stderr)
                    sys.exit(1)
                files[module_of(rel)] = os.path.join(dirpath, name)

modules = set(files)


def resolve(path):
    for k in range(len(path), 0, -1):
        candidate = "::".join(path[:k])
        if candidate in modules:
            return candidate
    return None


edges = {m: set() for m in modules}
codes = {}
for module, file in sorted(files.items()):
    with open(file, encoding="utf-8") as f:
        code = strip(f.read())
    codes[module] = code
    parent = module.split("::")[:-1]
    for m in re.finditer(r"(?<![\w:])mod\s+(\w+)\s*;", code):
        child = "::".join(module.split("::") + [m.group(1)])
        if child in modules:
            edges[module].add(child)
    for m in re.finditer(r"(?<![\w:])(crate|super)::", code):
        base = [] if m.group(1) == "crate" else parent
        for path in use_paths(tokens(code, m.end()), 0, base)[0]:
            target = resolve([p for p in path if p not in ("self",)])
            if target and target != module:
                edges[module].add(target)

# A circle, if any: depth-first search, reporting the first back edge's loop.
WHITE, GREY, BLACK = 0, 1, 2
colour = {m: WHITE for m in modules}
stack = []


def visit(m):
    colour[m] = GREY
    stack.append(m)
    for t in sorted(edges[m]):
        if colour[t] == GREY:
            return stack[stack.index(t):] + [t]
        if colour[t] == WHITE:
            found = visit(t)
            if found:
                return found
    stack.pop()
    colour[m] = BLACK
    return None


failed = False
for m in sorted(modules):
    if colour[m] == WHITE:
        circle = visit(m)
        if circle:
            print("layers-agent: an import circle in the agent: " + " -> ".join(circle), file=sys.stderr)
            failed = True
            break

for module, code in sorted(codes.items()):
    if module == "link" or module.startswith("link::"):
        pass
    else:
        for m in re.finditer(r"\b(Executor|Runner|Monitor|Follower)::start\b", code):
            print(f"layers-agent: {module} calls {m.group(0)}: only link starts the executor, "
                  "the health monitor and the event follower", file=sys.stderr)
            failed = True

for module, file in sorted(files.items()):
    if module == "labels":
        continue
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if '"dev.flotilla' in line and not line.lstrip().startswith("//"):
                print(f"layers-agent: {os.path.relpath(file)}:{number}: a dev.flotilla label key outside labels.rs",
                      file=sys.stderr)
                failed = True

order = []
colour = {m: WHITE for m in modules}


def post(m):
    colour[m] = GREY
    for t in sorted(edges[m]):
        if colour[t] == WHITE:
            post(t)
    order.append(m)


for m in sorted(modules):
    if colour[m] == WHITE:
        post(m)
for m in order:
    print(f"  {m:<16} -> {', '.join(sorted(edges[m])) or '(leaf)'}")
if failed:
    sys.exit(1)
print(f"layers-agent: {len(modules)} agent modules, no import circle; only link starts the executor, "
      "the monitor and the follower; every dev.flotilla label key is in labels.rs")
PY
