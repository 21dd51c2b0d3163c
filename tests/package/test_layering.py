"""The package's shape, checked by walking its source (docs/design.md, "Layers"):

* imports point down the layers (or stay inside one unit); units of one level do not import
  each other, and no module imports the package root ``moeops`` (it is the top);
* no module imports or reads another module's ``_private`` name (the extension ``moeops._C``
  excepted);
* no module but ``moeops._timing`` runs a clock inside a loop (one timer);
* a file over 600 lines says at its top why it is one file.

Each rule is also run on a planted violation, so the checker itself is tested.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "python" / "moeops"

# unit -> level. A module's unit is ``moeops.<first component>`` (``moeops.ops.gating`` ->
# ``moeops.ops``); imports may go to a lower level or stay inside the unit.
LEVELS = {
    "moeops._C": 0, "moeops._load": 0, "moeops._version": 0, "moeops.reference": 0,
    "moeops._dispatch": 1, "moeops._timing": 1, "moeops.models": 1,
    "moeops.ops": 2,
    "moeops._triton": 3,
    "moeops.integrations": 4,
    "moeops.interventions": 5, "moeops.distributed": 5, "moeops.moex": 5,
    "moeops.bench": 6, "moeops.tools": 6, "moeops.info": 6,
    "moeops.cli": 7, "moeops.__main__": 8,
    "moeops": 9,  # the package root: public API, imports anything, imported by nobody inside
}
ALLOWED_PRIVATE = {"_C"}
LONG_FILE = 600
LONG_FILE_MARK = "one file because"
CLOCKS = {("time", "perf_counter"), ("time", "time"), ("time", "monotonic"),
          ("time", "process_time"), ("cuda", "Event")}


def module_name(path: pathlib.Path, root: pathlib.Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _is_module(name: str, root: pathlib.Path) -> bool:
    base = root.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or \
        name == "moeops._C"


def _resolve_from(node: ast.ImportFrom, module: str, is_pkg: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def check_source(source: str, module: str, is_pkg: bool = False,
                 root: pathlib.Path = PKG) -> list[str]:
    """The rule violations of one module's source."""
    tree = ast.parse(source)
    unit, problems = unit_of(module), []
    level = LEVELS.get(unit)
    if level is None:
        return [f"{module}: unit {unit} has no level in LEVELS (add it, and to docs/design.md)"]
    imported_modules: dict[str, str] = {}  # local name -> moeops module

    def target(mod: str, what: str) -> None:
        t_unit = unit_of(mod)
        if t_unit == unit:
            return
        t_level = LEVELS.get(t_unit)
        if t_level is None:
            problems.append(f"{module}: imports {mod} ({what}), whose unit has no level")
        elif t_unit == "moeops" and unit != "moeops":
            problems.append(f"{module}: imports the package root ({what}); import the "
                            "module that defines it")
        elif t_level > level:
            problems.append(f"{module} (level {level}): imports {mod} (level {t_level}) "
                            f"upward ({what})")
        elif t_level == level:
            problems.append(f"{module}: imports {mod}, another unit of the same level {level}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "moeops" or a.name.startswith("moeops."):
                    target(a.name, f"import {a.name}")
                    if a.asname:
                        imported_modules[a.asname] = a.name
                    elif a.name == "moeops":
                        imported_modules["moeops"] = "moeops"
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_from(node, module, is_pkg)
            if not src or not (src == "moeops" or src.startswith("moeops.")):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if _is_module(sub, root):
                    target(sub, f"from {src} import {a.name}")
                    imported_modules[a.asname or a.name] = sub
                    continue
                target(src, f"from {src} import {a.name}")
                if a.name.startswith("_") and not a.name.startswith("__") and \
                        a.name not in ALLOWED_PRIVATE:
                    problems.append(f"{module}: imports the private name {a.name} from {src}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in imported_modules and node.attr.startswith("_") and \
                not node.attr.startswith("__") and node.attr not in ALLOWED_PRIVATE:
            problems.append(f"{module}: reads the private name {node.attr} of "
                            f"{imported_modules[node.value.id]}")
    if module != "moeops._timing":
        problems += _clock_loops(tree, module)
    n_lines = len(source.splitlines())
    doc = ast.get_docstring(tree) or ""
    if n_lines > LONG_FILE and LONG_FILE_MARK not in " ".join(doc.split()):
        problems.append(f"{module}: {n_lines} lines; split it, or say at its top why it is "
                        f"{LONG_FILE_MARK} ...")
    return problems


def _clock_loops(tree: ast.AST, module: str) -> list[str]:
    out = []
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While, ast.AsyncFor)):
            continue
        for node in ast.walk(loop):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, (ast.Name, ast.Attribute)):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) \
                    else node.func.value.attr
                if (owner, node.func.attr) in CLOCKS:
                    out.append(f"{module}:{node.lineno}: reads a clock ({owner}."
                               f"{node.func.attr}) inside a loop; time through moeops._timing")
                    break
    return out


def package_modules():
    for path in sorted(PKG.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        yield path, module_name(path)


def test_every_module_follows_the_layering_rules():
    problems = []
    for path, mod in package_modules():
        problems += check_source(path.read_text(), mod, path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_every_unit_is_in_the_design_doc():
    design = (PKG.parents[1] / "docs" / "design.md").read_text()
    units = {unit_of(mod) for _, mod in package_modules()}
    missing = [u for u in sorted(units) if f"`{u.split('.', 1)[-1] if u != 'moeops' else u}`"
               not in design and f"`{u}`" not in design]
    assert not missing, f"units not named in docs/design.md: {missing}"


# ----------------------------------------------------------------------------- the checker


@pytest.mark.parametrize("module,source,expect", [
    pytest.param("moeops.ops.gating", "from moeops.integrations import hf\n", "upward",
                 id="upward-from-import"),
    pytest.param("moeops.ops.gating", "def f():\n    from moeops.interventions import stats\n",
                 "upward", id="upward-import-inside-a-function"),
    pytest.param("moeops.ops.gating", "import moeops.bench.experts\n", "upward",
                 id="upward-plain-import"),
    pytest.param("moeops.interventions.stats",
                 "from moeops.distributed import ExpertPlacement\n", "same level",
                 id="same-level-unit"),
    pytest.param("moeops.bench.experts", "import moeops\nmoeops.fused_experts\n",
                 "package root", id="import-the-root"),
    pytest.param("moeops.bench.experts", "from moeops import fused_experts\n", "package root",
                 id="name-from-the-root"),
    pytest.param("moeops.distributed", "from moeops.integrations.hf import _classes\n",
                 "private name", id="import-a-private-name"),
    pytest.param("moeops.distributed", "from moeops.integrations import hf\nhf._classes('x')\n",
                 "private name", id="read-a-private-attribute"),
    pytest.param("moeops.bench.gemm",
                 "import time\nfor _ in range(3):\n    t0 = time.perf_counter()\n", "clock",
                 id="clock-in-a-loop"),
    pytest.param("moeops.bench.gemm", "x = 1\n" * 601, "601 lines; split it",
                 id="long-file-without-a-reason"),
])
def test_the_checker_catches_a_planted_violation(module, source, expect):
    problems = check_source(source, module)
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("module,source", [
    pytest.param("moeops.integrations.hf", "from moeops.ops import fused_experts, topk_gating\n",
                 id="downward"),
    pytest.param("moeops.ops.gating",
                 "from moeops import _C, reference\nfrom moeops._dispatch import resolve\n",
                 id="the-extension-and-level-0-1"),
    pytest.param("moeops.ops.experts", "from moeops.ops._autograd import save_fused_experts\n",
                 id="same-unit-private-module"),
    pytest.param("moeops.interventions.stats",
                 "from moeops.interventions._state import states\n", id="same-unit"),
    pytest.param("moeops.bench.experts", "from moeops import _C\n_C.cpu_isa()\n",
                 id="the-extension-attribute"),
    pytest.param("moeops", "from moeops.cli import main\nfrom moeops import interventions\n",
                 id="the-root-imports-anything"),
    pytest.param("moeops.bench.gemm",
                 '"""Long: one file because it is one table."""\n' + "x = 1\n" * 601,
                 id="long-file-with-a-reason"),
])
def test_the_checker_accepts_allowed_imports(module, source):
    assert check_source(source, module) == []
