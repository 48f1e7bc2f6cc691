"""The package layout holds: arrows point one way, and nothing below the Ray launchers imports Ray."""

import ast
import subprocess
import sys

from tests.helpers import REPO

PACKAGES = ("common", "pipelines", "gpt2", "training", "evals")
# Each module belongs to a layer: a package, or for training/ the engine (its top level) and two roles in
# sub-folders. The user's entry files at training/'s top level (run.py, monitor.py) belong to the role they start.
ENTRY_FILES = {"training.run": "training.launcher", "training.monitor": "training.ops"}
# What each layer may import from the others: common <- pipelines <- gpt2 <- evals <- the training engine <-
# operations <- the Ray launcher (run.py -h 1 sits on top of evals, and publishes the ops gauges).
ALLOWED = {"common": set(), "pipelines": {"common"}, "gpt2": {"common", "pipelines"},
           "evals": {"common", "pipelines", "gpt2"}, "training": {"common", "pipelines", "gpt2", "evals"},
           "training.ops": {"common", "pipelines", "gpt2", "evals", "training"},
           "training.launcher": {"common", "pipelines", "gpt2", "evals", "training", "training.ops"}}
# Modules that connect to Ray; everything else runs where Ray is not installed (the GPU box has none).
LAUNCHERS = {"pipelines.tokenize", "common.cluster", "pipelines.dataset", "training.run", "training.launcher.launch",
             "training.launcher.worker", "training.launcher.hub", "training.launcher.reports",
             "training.launcher.beside_training", "training.launcher.placement", "training.launcher.flags",
             "training.ops.spot_watch", "evals.parallel", "evals.hellaswag", "evals.core"}


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for package in PACKAGES
                  for p in (REPO / package).rglob("*.py") if p.stem != "__init__")


def _layer(module: str) -> str:
    """The layer of a module or of a name it imports (`training.launcher.elastic` -> training.launcher)."""
    if module in ENTRY_FILES:
        return ENTRY_FILES[module]
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "training" and parts[1:2] in (["launcher"], ["ops"]) else parts[0]


def _imported_layers(module: str) -> set[str]:
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    names += [f"{node.module}.{alias.name}" for node in ast.walk(tree)  # `from training import run`
              if isinstance(node, ast.ImportFrom) and node.module for alias in node.names]
    return {_layer(name) for name in names if name.split(".")[0] in PACKAGES}


def test_package_imports_point_one_way():
    wrong = [(module, imported) for module in _modules() for imported in _imported_layers(module)
             if imported != _layer(module) and imported not in ALLOWED[_layer(module)]]
    assert wrong == []


def test_the_layout_test_sees_every_layer():
    assert {_layer(module) for module in _modules()} == set(ALLOWED)


def test_only_the_launchers_import_ray():
    below = [m for m in _modules() if m not in LAUNCHERS]
    assert "training.train" in below and "evals.scoring" in below and "gpt2.model" in below
    code = (f"import sys; import {', '.join(below)}; "
            "sys.exit(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')) or 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
