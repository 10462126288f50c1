"""sdstack: a local-first Stable Diffusion stack.

Importing this package is cheap and has no side effects; heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "generate", "__version__"]


def __getattr__(name):  # lazy public API (PEP 562)
    if name == "load_model":
        from .models.loader import load_model

        return load_model
    if name == "generate":
        from .engine.generate import generate

        return generate
    raise AttributeError(name)
