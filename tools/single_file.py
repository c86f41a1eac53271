"""Generate datastore.py, the file people copy in, from the package in src/datastore.

    python tools/single_file.py           # write datastore.py
    python tools/single_file.py --check   # exit 1 if datastore.py is stale

The modules are joined in MODULES' order, which must follow their imports.
Each module's docstring becomes a comment that heads its section; imports
of the standard library and fasteners are gathered at the top, and the
package's own imports dropped, since every name now lives in one namespace.
So two modules may not define the same name (checked here), and no module
but `store` may use the name `set`, which store's module-level set() takes
over in the one file (checked too).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "datastore"
OUTPUT = ROOT / "datastore.py"
MODULES = ["errors", "codec", "format", "space", "index", "locks", "snapshot", "recovery",
           "legacy", "compaction", "opening", "engine", "store", "cli"]

THIRD_PARTY = {"fasteners"}
WIDTH = 79


def is_type_checking_block(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING")


def split_module(name: str, text: str) -> tuple[str, list[ast.stmt], list[str], set[str]]:
    """(docstring, hoisted imports, the rest of the source as lines, the
    package modules it imports at run time)."""
    tree = ast.parse(text)
    lines = text.splitlines()
    doc = ast.get_docstring(tree, clean=True) or ""
    drop: set[int] = set()  # line numbers (0-based) left out of the body
    hoisted: list[ast.stmt] = []
    uses: set[str] = set()
    for node in tree.body:
        span = range(node.lineno - 1, (node.end_lineno or node.lineno))
        if node is tree.body[0] and doc:
            drop.update(span)
        elif isinstance(node, ast.ImportFrom) and node.level:
            drop.update(span)
            uses.add(node.module or "__init__")
        elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
            drop.update(span)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(span)
            hoisted.append(node)
        elif isinstance(node, ast.If) and is_type_checking_block(node):
            assert all(isinstance(inner, ast.ImportFrom) and inner.level for inner in node.body), name
            drop.update(span)
    body = [line for number, line in enumerate(lines) if number not in drop]
    return doc, hoisted, body, uses


def defined_names(text: str) -> set[str]:
    """Every name a module binds at its top level, however (def, class, any
    assignment or loop target, also inside if and try), but its imports."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)  # and not what is bound inside
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, (ast.Lambda, ast.comprehension, ast.Import, ast.ImportFrom)):
            for child in ast.iter_child_nodes(node):
                visit(child)

    for node in ast.parse(text).body:
        visit(node)
    return names


def imported_names(nodes: list[ast.stmt]) -> dict[str, str]:
    """What each hoisted import binds: name -> where from."""
    bound = {}
    for node in nodes:
        assert isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names:
            source = alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
            bound[alias.asname or alias.name.split(".")[0]] = source
    return bound


def import_lines(nodes: list[ast.stmt], texts: dict[int, str]) -> list[str]:
    """The imports, merged: `import x` lines as written (with their comments),
    `from x import ...` names joined per module; the standard library first."""
    plain: dict[str, str] = {}
    froms: dict[str, set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            plain[node.names[0].name] = texts[id(node)]
        else:
            assert isinstance(node, ast.ImportFrom) and node.module
            froms.setdefault(node.module, set()).update(
                alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                for alias in node.names
                if alias.name != "TYPE_CHECKING")  # its blocks are left out
    groups: list[list[str]] = [[], []]
    for module in sorted(set(plain) | set(froms)):
        group = groups[module.split(".")[0] in THIRD_PARTY]
        if module in plain:
            group.append(plain[module])
        if module in froms:
            group.append(wrap(f"from {module} import ", sorted(froms[module])))
    return groups[0] + ([""] + groups[1] if groups[1] else [])


def wrap(start: str, names: list[str]) -> str:
    line = start + ", ".join(names)
    if len(line) <= WIDTH:
        return line
    rows, row = [], "   "
    for name in names:
        if len(row) + len(name) + 2 > WIDTH:
            rows.append(row.rstrip())
            row = "   "
        row += f" {name},"
    rows.append(row)
    return start + "(\n" + "\n".join(rows) + "\n)"


def source_of(node: ast.stmt, text: str) -> str:
    lines = text.splitlines()[node.lineno - 1:node.end_lineno]
    return "\n".join(lines)


def as_comment(doc: str) -> list[str]:
    return [f"# {line}".rstrip() for line in doc.splitlines()]


def generate() -> str:
    texts = {name: (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
             for name in ["__init__", *MODULES, "__main__"]}
    seen: dict[str, str] = {}
    for name in MODULES:
        for defined in defined_names(texts[name]):
            if defined in seen:
                raise SystemExit(f"{defined} is defined in both {seen[defined]} and {name}")
            seen[defined] = name
        if name != "store" and any(isinstance(node, ast.Name) and node.id == "set"
                                   for node in ast.walk(ast.parse(texts[name]))):
            raise SystemExit(f"{name} uses set, which is store's set() in the one file; "
                             "use builtins.set")
    hoisted: list[ast.stmt] = []
    node_texts: dict[int, str] = {}
    sections: list[str] = []
    done: set[str] = {"__init__"}
    imported: dict[str, str] = {}
    init_doc, init_imports, init_body, _ = split_module("__init__", texts["__init__"])
    for name in [*MODULES, "__main__"]:
        doc, imports, body, uses = split_module(name, texts[name])
        if not uses <= done:
            raise SystemExit(f"{name} imports {sorted(uses - done)}, which come after it")
        done.add(name)
        for bound, source in imported_names(imports).items():
            if bound in seen or imported.setdefault(bound, source) != source:
                raise SystemExit(f"{name} imports {bound} from {source}, which the one "
                                 f"file binds otherwise ({seen.get(bound) or imported[bound]})")
        for node in imports:
            node_texts[id(node)] = source_of(node, texts[name])
        hoisted += imports
        header = f"# --- {name}.py "
        text = "\n".join(body).strip("\n")
        if name == "__main__":
            sections.append(text)
        else:
            sections.append("\n".join([header + "-" * (WIDTH - len(header)),
                                       *as_comment(doc), "", text]))
    for node in init_imports:
        node_texts[id(node)] = source_of(node, texts["__init__"])
    hoisted += init_imports
    init_text = "\n".join(init_body).strip("\n")
    generated = ("Generated from the package src/datastore by tools/single_file.py: "
                 "edit those\nmodules, not this file, then run the script.")
    raw_doc = source_of(ast.parse(texts["__init__"]).body[0], texts["__init__"])
    assert raw_doc.endswith('\n"""') and raw_doc == '"""' + init_doc + '\n"""', "plain text only"
    parts = [raw_doc[:-3] + "\n" + generated + '\n"""',
             "from __future__ import annotations",
             "\n".join(import_lines(hoisted, node_texts)),
             init_text, *sections]
    return "\n\n\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if datastore.py differs from what would be generated")
    args = parser.parse_args()
    text = generate()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python tools/single_file.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
