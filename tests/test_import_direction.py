"""ARCHITECTURE.md: imports go one way (pipeline -> manifests, training -> manifests, inference ->
training, manifests), so that training and inference import on the GPU machine, which has no Ray and no
scenedetect. Imports inside functions count too: they run there all the same."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "manifests", "training", "inference")
ALLOWED = {
    "manifests": {"manifests"},
    "pipeline": {"pipeline", "manifests"},
    "training": {"training", "manifests"},
    "inference": {"inference", "training", "manifests"},
}
# The known exceptions, each imported inside the one function that needs it (the package imports
# without them); a new one fails this test until it is added here with its reason.
EXCEPTIONS = {
    # a benchmark run from the command line: it draws its footage with curate's sample generator
    ("training/bench_data.py", "pipeline"),
    # `inbetweener models list` lists every job's weights, which those jobs define
    ("pipeline/models_cli.py", "training"),
    ("pipeline/models_cli.py", "inference"),
    # the aesthetic stage's CUDA graph capture on a GPU (the class inference's sampler uses too)
    ("pipeline/stages/aesthetic.py", "inference"),
    ("pipeline/stages/alignment.py", "inference"),  # the same, for the text tower
    # the GPU benchmark of curate's model stages: the same CUDA graph class and kernel table as training's
    ("pipeline/bench_models_gpu.py", "training"),
    ("pipeline/bench_models_gpu.py", "inference"),
}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & {*PACKAGES, "inbetweener_cli"}


def test_packages_import_only_in_the_documented_direction():
    wrong, seen = [], set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for imported in sorted(_imported_packages(path) - ALLOWED[package]):
                seen.add((name, imported))
                if (name, imported) not in EXCEPTIONS:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)
    assert not EXCEPTIONS - seen, f"exceptions no longer needed: {sorted(EXCEPTIONS - seen)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.models import x\n    import training.engine\n")
    assert _imported_packages(module) == {"pipeline", "training"}
