"""Genesis: small Llama-style models on the Bible, trained with GPU-side dynamic masking of logical connectives.

Public entry points: `python -m genesis.train`, `python -m genesis.evaluate`, and the plug-in
`genesis.masking.ConnectiveMasker`.
"""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_checkout_kernels() -> None:
    """Installed, `kernels/` lives at genesis/kernels. Run from a source checkout without installing, it sits
    beside genesis/: register it as `genesis.kernels` so the same imports work (never as a top-level `kernels`)."""
    if "genesis.kernels" in _sys.modules or _util.find_spec("genesis.kernels") is not None:
        return
    kernels = _Path(__file__).resolve().parent.parent / "kernels"
    if not (kernels / "__init__.py").is_file():
        return
    spec = _util.spec_from_file_location("genesis.kernels", kernels / "__init__.py",
                                         submodule_search_locations=[str(kernels)])
    module = _util.module_from_spec(spec)
    _sys.modules["genesis.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for any submodule


_map_checkout_kernels()
