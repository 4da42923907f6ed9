"""hiflow_fast: fast, faithful HiFlow for Flux."""

from .config import HiFlowConfig, HiResStage
from .errors import HiFlowInputError, HiFlowModelError, NonFiniteLatentsError

__version__ = "0.1.0"

__all__ = [
    "HiFlowConfig",
    "HiFlowInputError",
    "HiFlowModelError",
    "HiFlowPipeline",
    "HiResStage",
    "NonFiniteLatentsError",
    "__version__",
]


def __getattr__(name):
    # The pipeline imports diffusers (slow); load it on first use only.
    if name == "HiFlowPipeline":
        from .pipeline import HiFlowPipeline

        return HiFlowPipeline
    raise AttributeError(f"module 'hiflow_fast' has no attribute {name!r}")
