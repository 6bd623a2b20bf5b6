"""voken: MiniGPT-5 interleaved text-and-image inference (C++/libtorch) for Python.

The heavy lifting happens in the compiled module ``voken._voken``; this package re-exports it.
Tensors cross the boundary as numpy arrays, so Python torch is not needed.
"""
from ._voken import (  # noqa: F401
    Cancelled,
    ConfigError,
    Error,
    FormatError,
    WeightsError,
    __version__,
    build_info,
    io,
)

__all__ = [
    "__version__",
    "build_info",
    "io",
    "Error",
    "FormatError",
    "ConfigError",
    "WeightsError",
    "Cancelled",
]
