#!/usr/bin/env bash
# The control plane's floors, checked: each rule must find nothing, or this fails naming
# every offending file and line. Run by scripts/test.sh; run it alone after moving code.
#
#   api → session → fleet → identity → store   (a floor names only floors below it)
#   timing, labels, metrics                    (leaves: they name nothing of the crate)
#   server.rs, admin.rs, cli.rs, main.rs, lib.rs (wiring: they may name every floor)
#
# Rules:
#   1. no floor names a floor above it; leaves name nothing of the crate;
#   2. no module imports another in a circle (a floor's root, e.g. fleet.rs, may name its
#      own children: it declares them and holds their handles);
#   3. `sqlx::query` only under store/;
#   4. `tonic::` only in api/, session/ and server.rs;
#   5. the Fleet API's messages (proto/flotilla/v1/fleet.proto) only in api/, session/
#      (it forwards live reads to other replicas) and the wiring;
#   6. the agent protocol's messages (agent.proto) only in session/, api/ (Fleet messages embed
#      some: HostFacts, HostLoad) and server.rs, but for
#      the files in scripts/layers.allow, each of which must still need its allowance;
#   7. the agent and the control plane never depend on each other, and the root crate's
#      normal dependencies include neither.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 - "$@" <<'PY'
import json, os, re, subprocess, sys
from collections import defaultdict

SRC = "control-plane/src"
FLOORS = {"api": 5, "session": 4, "fleet": 3, "identity": 2, "store": 1}
LEAVES = {"timing", "labels", "metrics"}
WIRING = {"server", "admin", "cli", "main", "lib"}
problems = []

def module_of(path):
    """control-plane/src/fleet/provisioning/local.rs -> ['fleet', 'provisioning', 'local']"""
    rel = os.path.relpath(path, SRC)[:-3]
    return rel.split(os.sep)

files = []
for root, _, names in os.walk(SRC):
    for name in names:
        if name.endswith(".rs"):
            files.append(os.path.join(root, name))
files.sort()

def code_lines(path):
    """Lines without comments (line comments and doc comments), numbered from 1."""
    out = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        stripped = line.split("//", 1)[0] if "//" in line and '"' not in line.split("//", 1)[0] else line
        if line.lstrip().startswith("//"):
            stripped = ""
        out.append((n, stripped))
    return out

def flatten_use(tree, prefix=""):
    tree = tree.strip()
    if not tree:
        return []
    i = tree.find("{")
    if i == -1:
        path = prefix + tree
        return [path[:-6] if path.endswith("::self") else path]
    head, inner = tree[:i], tree[i + 1:tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{": depth += 1
        if ch == "}": depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur); cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        p = p.strip().split(" as ")[0]
        if p == "self":
            out.append((prefix + head).rstrip(":"))
        elif p:
            out += flatten_use(p, prefix + head)
    return out

def crate_paths(path):
    """Every crate::a::b path a file names, with its line number."""
    text_lines = code_lines(path)
    text = "".join(l for _, l in text_lines)
    starts, offset = [], 0
    for n, l in text_lines:
        starts.append((offset, n)); offset += len(l)
    def line_at(pos):
        n = 1
        for off, num in starts:
            if off > pos: break
            n = num
        return n
    found = []
    for m in re.finditer(r"\buse\s+(crate|super)::([^;]*);", text, re.S):
        base = module_of(path)[:-1] if m.group(1) == "super" else []
        for p in flatten_use(re.sub(r"\s+", " ", m.group(2))):
            found.append((line_at(m.start()), base + p.split("::") if base else p.split("::")))
    for m in re.finditer(r"\bcrate::((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)", text):
        # inline paths outside `use` (the use statements were read above)
        prefix = text[max(0, m.start() - 200):m.start()]
        if re.search(r"\buse\s+[^;]*$", prefix):
            continue
        found.append((line_at(m.start()), m.group(1).split("::")))
    return found

modules = {tuple(module_of(f)): f for f in files}

def target_module(segments):
    """The longest module prefix of a path that is a file of the crate."""
    for k in range(len(segments), 0, -1):
        if tuple(segments[:k]) in modules:
            return tuple(segments[:k])
    return None

edges = defaultdict(set)
for f in files:
    me = tuple(module_of(f))
    top = me[0]
    for line, segs in crate_paths(f):
        if not segs or segs[0] in ("self",):
            continue
        target = target_module(segs)
        if target is None or target == me:
            continue
        other = target[0]
        # Rule 1: floors point down.
        if top in LEAVES:
            problems.append(f"{f}:{line}: a leaf names crate::{'::'.join(segs)}")
        elif top in FLOORS and other in FLOORS and FLOORS[other] > FLOORS[top]:
            problems.append(f"{f}:{line}: {top}/ names the floor above it: crate::{'::'.join(segs)}")
        elif top in FLOORS and other in WIRING:
            problems.append(f"{f}:{line}: {top}/ names the wiring: crate::{'::'.join(segs)}")
        # Rule 2's graph: a floor's root naming its own children is declaration, not import.
        if len(me) == 1 and target[0] == me[0]:
            continue
        edges[me].add(target)

# Rule 2: no circles (Tarjan's strongly connected components).
index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]
def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1:
            sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in list(modules):
    if v not in index:
        strong(v)
for comp in sccs:
    problems.append("modules import each other in a circle: " + ", ".join("::".join(c) for c in comp))

def grep(pattern, allowed):
    for f in files:
        me = module_of(f)
        if allowed(me):
            continue
        for n, line in code_lines(f):
            if re.search(pattern, line):
                yield f, n, line.strip()

# Rule 3.
for f, n, line in grep(r"\bsqlx::query", lambda m: m[0] == "store"):
    problems.append(f"{f}:{n}: SQL outside store/: {line}")
# Rule 4.
for f, n, line in grep(r"\btonic::", lambda m: m[0] in ("api", "session", "server")):
    problems.append(f"{f}:{n}: tonic outside api/, session/ and server.rs: {line}")

def messages(proto):
    return set(re.findall(r"^message (\w+)", open(f"proto/flotilla/v1/{proto}", encoding="utf-8").read(), re.M))

def proto_names(path):
    """(line, name) of every prost type a file names: imported from flotilla::proto or
    written proto::Name."""
    text_lines = code_lines(path)
    out = []
    joined = "".join(l for _, l in text_lines)
    for m in re.finditer(r"\buse\s+flotilla::((?:[^;])*);", joined, re.S):
        line = joined[:m.start()].count("\n") + 1
        for p in flatten_use(re.sub(r"\s+", " ", m.group(1))):
            segs = p.split("::")
            if segs[0] == "proto" and len(segs) > 1:
                out.append((line, segs[1]))
    for n, l in text_lines:
        for m in re.finditer(r"\bproto::([A-Z]\w*)", l):
            out.append((n, m.group(1)))
    return out

fleet_messages = messages("fleet.proto")
agent_messages = messages("agent.proto")
allow_file = "scripts/layers.allow"
allowed = {}
for line in open(allow_file, encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line:
        allowed[line] = False
for f in files:
    me = module_of(f)
    rel = os.path.relpath(f, SRC)
    for n, name in proto_names(f):
        # Rule 5.
        if name in fleet_messages and me[0] not in ("api", "session") and me[0] not in WIRING:
            problems.append(f"{f}:{n}: a Fleet API message outside api/ and session/: {name}")
        # Rule 6.
        if name in agent_messages and me[0] not in ("api", "session", "server"):
            if rel in allowed:
                allowed[rel] = True
            else:
                problems.append(f"{f}:{n}: an agent protocol message outside session/: {name}")
for rel, used in allowed.items():
    if not used:
        problems.append(f"{allow_file}: {rel} no longer needs its allowance: take it off the list")

# Rule 7.
meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
                                 check=True, capture_output=True, text=True).stdout)
packages = {p["name"]: p for p in meta["packages"]}
def normal_deps(name):
    return {d["name"] for d in packages[name]["dependencies"] if d.get("kind") in (None, "normal")}
if "flotilla-control-plane" in normal_deps("flotilla-agent") | {d["name"] for d in packages["flotilla-agent"]["dependencies"]}:
    problems.append("the agent depends on the control plane")
if "flotilla-agent" in {d["name"] for d in packages["flotilla-control-plane"]["dependencies"]}:
    problems.append("the control plane depends on the agent")
for side in ("flotilla-agent", "flotilla-control-plane"):
    if side in normal_deps("flotilla"):
        problems.append(f"the root crate's normal dependencies include {side}")

if problems:
    print("layers: the floors' rules are broken:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print(f"layers: {len(files)} control-plane files, {sum(len(v) for v in edges.values())} imports between modules: every rule holds")
PY

if [ -x scripts/layers-agent.sh ]; then
  scripts/layers-agent.sh
fi
