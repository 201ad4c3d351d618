"""Keeps this repo's kernels/ folder from shadowing Hugging Face's `kernels` package.

The folder is installed as `hybrid_mamba3.kernels`. Run from the repo root (`python -m ...` and `python -c` put the
working directory on sys.path) it would also be importable as a top-level `kernels`, which transformers (>= 5.25)
imports for its hub kernels: the import then fails. Imported first by the package, this takes the root off sys.path
before transformers is loaded; a process that imports transformers before hybrid_mamba3 from the repo root is beyond
its reach (run it from elsewhere, or through the console scripts).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "kernels" not in sys.modules and os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py")):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
