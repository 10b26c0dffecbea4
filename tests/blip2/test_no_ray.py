"""``blip2/`` is the library: plain PyTorch + transformers, never Ray (arrows point pipelines -> blip2)."""

import ast
import subprocess
import sys
from pathlib import Path

import blip2

ROOT = Path(blip2.__file__).parent


def test_no_source_file_in_blip2_imports_ray():
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] in ("ray", "pipelines")]
    assert not offenders


def test_importing_every_blip2_module_loads_no_ray():
    modules = sorted(".".join(p.relative_to(ROOT.parent).with_suffix("").parts) for p in ROOT.rglob("*.py"))
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
