"""Old module paths of the flat layout (cellvae <= the redesign) as aliases of the modules that now hold them.

``import cellvae.model`` or ``from cellvae.distributions import NegativeBinomial`` keep working: a meta path
finder answers each old name with the new module object itself (the same object, so attributes set on one are seen
through the other). Paths that are now packages of the same name (``cellvae.data``, ``cellvae.train``,
``cellvae.native``) re-export their public names instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED", "install"]

MOVED = {
    "cellvae.model": "cellvae.models.count_vae",
    "cellvae.image": "cellvae.models.image_vae",
    "cellvae.autoencoder": "cellvae.models.autoencoder",
    "cellvae.module": "cellvae.vae.module",
    "cellvae.distributions": "cellvae.vae.distributions",
    "cellvae.nn": "cellvae.vae.nn",
    "cellvae.cvae": "cellvae.vae.cvae",
    "cellvae.backed": "cellvae.data.backed",
    "cellvae.fileio": "cellvae.data.fileio",
    "cellvae.optim": "cellvae.train.optim",
    "cellvae.distributed": "cellvae.train.distributed",
    "cellvae.metrics.likelihood": "cellvae.train.evaluate",
    "cellvae.de": "cellvae.analysis.de",
    "cellvae.anomaly": "cellvae.analysis.anomaly",
    "cellvae.generate": "cellvae.analysis.generate",
    "cellvae.perturb": "cellvae.analysis.perturb",
    "cellvae.latent": "cellvae.analysis.latent",
    "cellvae.job": "cellvae.jobs.fit",
    "cellvae.image_job": "cellvae.jobs.fit_images",
    "cellvae.evaluate": "cellvae.jobs.evaluate",
    "cellvae.commands": "cellvae.jobs.analyses",
    "cellvae.report": "cellvae.jobs.report",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of :data:`MOVED` and loads each as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # the target module is already executed
        pass


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
