"""hf_permerge: permutation-aware model merging for the Hugging Face ecosystem.

Importing the package registers our model classes with `AutoConfig`,
`AutoModelForImageClassification` and `AutoImageProcessor` (no `trust_remote_code`): at once when
transformers is already imported, otherwise the moment it is. So `import hf_permerge` itself stays light
(torch and transformers load only when used), which keeps the command line instant.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .metrics import load_metric

__version__ = "0.1.0"

_LAZY = {
    "PermMLPConfig": "models",
    "PermCNNConfig": "models",
    "PermMLPForImageClassification": "models",
    "PermCNNForImageClassification": "models",
    "PermMerger": "merging",
}


def __getattr__(name):
    """The model classes and `PermMerger`, imported when first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_permerge' has no attribute {name!r}")


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports our `models` (which registers them with the Auto classes) right after transformers is imported,
    so that `import hf_permerge` then `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=False)` works without
    `import hf_permerge` having to import transformers."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            importlib.import_module(".models", __name__)

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".models", __name__)
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())

__all__ = [
    "PermMLPConfig",
    "PermCNNConfig",
    "PermMLPForImageClassification",
    "PermCNNForImageClassification",
    "PermMerger",
    "load_metric",
]
