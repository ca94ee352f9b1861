"""Fixtures of the training tests: the reference parity fixtures (shared/reference/parity/<name>.*)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def load_fixture(shared_reference: Path, name: str) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """-> (json spec, state_dict, inputs, outputs); fails clearly when the fixture is missing."""
    folder = shared_reference / "parity"
    spec_path, tensors_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (spec_path, tensors_path):
        if not path.is_file():
            pytest.fail(f"parity fixture missing: {path}")
    spec = json.loads(spec_path.read_text())
    tensors = load_file(str(tensors_path))
    groups: dict[str, dict[str, torch.Tensor]] = {"state_dict": {}, "input": {}, "output": {}}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        groups[group][rest] = value
    return spec, groups["state_dict"], groups["input"], groups["output"]


@pytest.fixture(scope="session")
def parity(shared_reference: Path):
    """`parity("unet")` -> (json spec, state_dict, inputs, outputs) of that fixture."""
    cache: dict[str, tuple] = {}

    def load(name: str) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
        if name not in cache:
            cache[name] = load_fixture(shared_reference, name)
        return cache[name]

    return load
