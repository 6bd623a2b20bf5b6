"""voken: MiniGPT-5 interleaved text-and-image inference (C++/libtorch) for Python.

    import voken, pathlib
    pipe = voken.Pipeline.load("minigpt5/bundle.json")
    result = pipe.generate_interleaved(["A cat on a sofa.", pathlib.Path("sofa.jpg"), "What next?"])
    print(result.text); result.images[0].save("next.png")

The heavy lifting happens in the compiled module ``voken._voken``, without the GIL. Arrays cross
the boundary as numpy arrays, so Python torch is not needed (nor imported). The components are
classes of their own for users who need one part: Tokenizer, Llama, ImageEncoder, VokenMapper,
UNet, VAE, Scheduler, StableDiffusion (arrays in and out are numpy).

Errors: FileNotFoundError for missing files; ValueError for bad arguments (voken.ConfigError,
voken.WeightsError and voken.FormatError are ValueErrors too, and voken.Error, the base of
voken's own errors, is a RuntimeError); voken.Cancelled when a progress callback stops work.
"""
import os as _os


from . import _openblas  # noqa: E402

# Debian's libtorch does float32 products in OpenBLAS, which misdetects some recent Intel CPUs
# as a Pentium 4; ask for the right kernels before the native module loads it (_openblas.py).
_openblas.apply()

from ._voken import (  # noqa: F401,E402
    AddedToken,
    Cancelled,
    ConfigError,
    Error,
    FormatError,
    GenerateOptions,
    Generator,
    ImageEncoder,
    Llama,
    ProgressEvent,
    Scheduler,
    StableDiffusion,
    Tokenizer,
    UNet,
    VAE,
    VaePosterior,
    VokenMapper,
    WeightsError,
    __version__,
    build_info,
    encode_image,
    io,
    load_image,
    minigpt5_added_tokens,
    preprocess,
    save_image,
    set_num_threads,
)
from ._images import ImageFile, Text  # noqa: F401
from .pipeline import GenerationResult, Pipeline  # noqa: F401
from .progress import ProgressBar  # noqa: F401
from .bundle import write_random_bundle  # noqa: F401

__all__ = [
    "__version__",
    "build_info",
    "set_num_threads",
    "io",
    # Errors.
    "Error",
    "FormatError",
    "ConfigError",
    "WeightsError",
    "Cancelled",
    # The pipeline.
    "Pipeline",
    "GenerationResult",
    "GenerateOptions",
    "ProgressEvent",
    "ProgressBar",
    "Text",
    "ImageFile",
    "write_random_bundle",
    # Components.
    "Tokenizer",
    "AddedToken",
    "minigpt5_added_tokens",
    "Llama",
    "ImageEncoder",
    "VokenMapper",
    "UNet",
    "VAE",
    "VaePosterior",
    "Scheduler",
    "StableDiffusion",
    "Generator",
    # Images.
    "load_image",
    "save_image",
    "encode_image",
    "preprocess",
]
