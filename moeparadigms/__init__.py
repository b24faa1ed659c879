"""moeparadigms: one fast Mixture-of-Experts core under four learning paradigms."""
from .core import MoE, MoEOutput

__version__ = "0.1.0"
__all__ = ["MoE", "MoEOutput", "__version__"]
