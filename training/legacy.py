"""Names of release 0.1, for models logged then.

Release 0.1 installed `training` as a top-level package and pickled its image pyfuncs
by reference to `training.serving.ImageEmbedder`. While such a model loads, those names
point at the namespaced modules, so the model keeps loading with today's code (the
copy of the old code inside the model folder is never imported)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from embcompat.training import methods, pyfunc


@contextmanager
def release_0_1_names() -> Iterator[None]:
    """Within the block, `training`, `training.serving` and `training.methods` resolve
    to their embcompat modules; whatever those names meant before is restored after."""
    aliases = {
        "training": sys.modules["embcompat.training"],
        "training.serving": pyfunc,
        "training.methods": methods,
    }
    saved = {name: sys.modules.get(name) for name in aliases}
    sys.modules.update(aliases)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
