"""The package layout holds: arrows point one way, and nothing below the Ray launchers imports Ray."""

import ast
import subprocess
import sys

from tests.helpers import REPO

PACKAGES = ("pipelines", "gpt2", "training", "evals")
# What each package may import from the others: data flows pipelines -> gpt2 -> training / evals, and the
# training launcher (run.py -h 1) sits on top of evals.
ALLOWED = {"pipelines": set(), "gpt2": {"pipelines"}, "evals": {"pipelines", "gpt2"},
           "training": {"pipelines", "gpt2", "evals"}}
# Modules that connect to Ray; everything else runs where Ray is not installed (the GPU box has none).
LAUNCHERS = {"pipelines.tokenize", "pipelines.cluster", "pipelines.dataset", "training.run", "training.run_hellaswag",
             "training.spot_watch", "evals.parallel", "evals.hellaswag",
             "evals.core"}


def _modules() -> list[str]:
    return sorted(f"{p.parent.name}.{p.stem}" for package in PACKAGES for p in (REPO / package).glob("*.py")
                  if p.stem != "__init__")


def _imported_packages(module: str) -> set[str]:
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    return {name.split(".")[0] for name in names} & set(PACKAGES)


def test_package_imports_point_one_way():
    wrong = [(module, imported) for module in _modules() for imported in _imported_packages(module)
             if imported != module.split(".")[0] and imported not in ALLOWED[module.split(".")[0]]]
    assert wrong == []


def test_only_the_launchers_import_ray():
    below = [m for m in _modules() if m not in LAUNCHERS]
    assert "training.train" in below and "evals.scoring" in below and "gpt2.model" in below
    code = (f"import sys; import {', '.join(below)}; "
            "sys.exit(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')) or 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
