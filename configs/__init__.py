"""Package data: model layouts, DeepSpeed/accelerate configs and recipes (YAML/JSON)."""

from __future__ import annotations

from importlib import resources

import yaml


def load_config(name: str) -> dict:
    """Load a bundled YAML config by file name (e.g. "smollm2_135m.yaml") with yaml.safe_load."""
    files = resources.files(__name__)
    path = files / name
    if not path.is_file():
        known = sorted(p.name for p in files.iterdir() if p.name.endswith((".yaml", ".json")))
        raise FileNotFoundError(f"no bundled config {name!r}; bundled: {known}")
    return yaml.safe_load(path.read_text())
