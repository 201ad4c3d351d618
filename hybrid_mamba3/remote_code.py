"""Remote-code stubs written beside a saved hybrid: they import the installed package's classes."""

from __future__ import annotations

import os

REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_mamba3.HybridMamba3Config",
    "AutoModel": "modeling_hybrid_mamba3.HybridMamba3Model",
    "AutoModelForCausalLM": "modeling_hybrid_mamba3.HybridMamba3ForCausalLM",
}

_STUBS = {
    "configuration_hybrid_mamba3.py":
        "# Written by hybrid-mamba3: the classes live in the installed package (pip install hybrid-mamba3).\n"
        "from hybrid_mamba3.configuration_hybrid_mamba3 import HybridMamba3Config  # noqa: F401\n",
    "modeling_hybrid_mamba3.py":
        "# Written by hybrid-mamba3: the classes live in the installed package (pip install hybrid-mamba3).\n"
        "from hybrid_mamba3.modeling_hybrid_mamba3 import HybridMamba3ForCausalLM, HybridMamba3Model  # noqa: F401\n",
}


def write_remote_code(directory: str | os.PathLike) -> None:
    for name, text in _STUBS.items():
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
