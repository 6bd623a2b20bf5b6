"""Bundles: the tiny random-weight bundle for demos and tests."""

import os

from . import _voken

__all__ = ["write_random_bundle"]


def write_random_bundle(directory, shape="tiny", seed=0):
    """Writes a MiniGPT-5 bundle with RANDOM weights (in the real file formats: HF LLaMA dir,
    tokenizer, EVA/BLIP-2/MiniGPT-4 .pth files, Lightning .ckpt, diffusers dir) into
    `directory` and returns the path of its bundle.json. Its output is noise; it exists to run
    the whole pipeline quickly without downloading anything. shape: "tiny"."""
    writer = getattr(_voken, "_write_random_bundle", None)
    if writer is None:
        raise RuntimeError("this build of voken has no random-bundle writer")
    if shape != "tiny":
        raise ValueError(f"shape: only 'tiny' is available, got {shape!r}")
    return writer(os.fspath(directory), shape, int(seed))
