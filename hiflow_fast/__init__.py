"""hiflow_fast: fast, faithful HiFlow for Flux."""

from . import _source_tree
from .config import HiFlowConfig, HiResStage
from .errors import HiFlowInputError, HiFlowModelError, NonFiniteLatentsError, StageOutOfMemoryError

# From a source tree (Python started in the repository root), map hiflow_fast.kernels and
# hiflow_fast.bench to the top-level kernels/ and bench/ folders, as setup.py does on install.
_source_tree.install(__name__, __file__)

__version__ = "0.1.0"

__all__ = [
    "HiFlowConfig",
    "HiFlowInputError",
    "HiFlowModelError",
    "HiFlowPipeline",
    "HiResStage",
    "NonFiniteLatentsError",
    "StageOutOfMemoryError",
    "__version__",
]


def __getattr__(name):
    # The pipeline imports diffusers (slow); load it on first use only.
    if name == "HiFlowPipeline":
        from .pipeline import HiFlowPipeline

        return HiFlowPipeline
    raise AttributeError(f"module 'hiflow_fast' has no attribute {name!r}")
