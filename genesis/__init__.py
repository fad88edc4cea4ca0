"""Genesis: small Llama-style models on the Bible, trained with GPU-side dynamic masking of logical connectives.

Public entry points: `python -m genesis.train`, `genesis.evaluate`, `genesis.compare`, `genesis.export`,
`genesis.sample` and `genesis.plot` (also console scripts, genesis-train ...), and the plug-in
`genesis.masking.ConnectiveMasker`, which logs to the "genesis.masking" logger (`logging`) by default.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import logging as _logging
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# a library's loggers get no handler but this one: the application decides where "genesis.*" records go
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def _map_checkout_kernels() -> None:
    """Installed, `kernels/` lives at genesis/kernels. In a source checkout it sits beside genesis/ with no
    `__init__.py` (so it can never shadow another distribution's top-level `kernels`, such as the one transformers
    imports): register it here as `genesis.kernels`, so the same imports work from a checkout."""
    here = _Path(__file__).resolve().parent
    checkout = here.parent
    if "genesis.kernels" in _sys.modules or (here / "kernels").is_dir():
        return
    if not ((checkout / "kernels" / "mask.py").is_file() and (checkout / "pyproject.toml").is_file()):
        return
    spec = _machinery.ModuleSpec("genesis.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(checkout / "kernels")]
    module = _util.module_from_spec(spec)
    module.__doc__ = "Triton kernels (one op per file; the pure-torch twin lives in genesis/)."
    _sys.modules["genesis.kernels"] = module
    globals()["kernels"] = module  # what the import system does for any submodule


_map_checkout_kernels()
