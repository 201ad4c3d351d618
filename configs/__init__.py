"""Package data: model layouts, DeepSpeed/accelerate configs, recipes (YAML/JSON) and chat templates (Jinja)."""

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


def load_chat_template(name_or_path: str) -> str:
    """A chat template: a .jinja file's path, or the name of one shipped in chat_templates/ ("smollm2_assistant").
    The file's final newline is not part of the template (it would end every rendered conversation)."""
    from pathlib import Path

    path = Path(name_or_path)
    if path.is_file():
        return path.read_text().rstrip("\n")
    folder = resources.files(__name__) / "chat_templates"
    shipped = folder / (name_or_path if name_or_path.endswith(".jinja") else name_or_path + ".jinja")
    if not shipped.is_file():
        known = sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))
        raise FileNotFoundError(f"no chat template file {name_or_path!r} and none shipped by that name; shipped: "
                                f"{known}")
    return shipped.read_text().rstrip("\n")
