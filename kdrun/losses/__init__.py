"""Loss terms: typed specs (specs.py: settings, the tasks a term fits, what it reads; no torch), pure tensor math
(functional.py: fp32 softmax, masks) and the term modules that wire one to the other, summed with weights
(terms.py: `WeightedLoss`).

`from kdrun.losses import WeightedLoss` (or any name of terms.py) loads the torch side on first use, so importing
the specs for config checks stays light.
"""
import importlib

_SUBMODULES = ("specs", "functional", "terms")


def __getattr__(name: str):
    if name in _SUBMODULES or name.startswith("__"):
        raise AttributeError(name)  # submodules are imported by their own name, not through here
    return getattr(importlib.import_module("kdrun.losses.terms"), name)
