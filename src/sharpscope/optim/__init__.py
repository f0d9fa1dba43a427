"""Optimizers that build their gradient from several passes: the SAM family and Nexus.

Each wraps a base optimizer (AdamW by default) and is stepped with ``step(closure)``, the
closure running a forward pass and returning ``(outputs, loss)``, or through the explicit
``passes()`` / ``backward()`` / ``step()`` protocol; see ``docs/optimizers.md``.
"""

from .nexus import Nexus
from .sam import SAM, AngleSAM, FunctionalSAM

__all__ = ["SAM", "FunctionalSAM", "AngleSAM", "Nexus"]
