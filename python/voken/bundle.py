"""Bundles: the tiny random-weight bundle for demos and tests."""

import os

from . import _voken

__all__ = ["write_random_bundle"]


def write_random_bundle(directory, shape="tiny", seed=0, progress=None):
    """Writes a MiniGPT-5 bundle with RANDOM weights (in the real file formats: HF LLaMA dir,
    tokenizer, EVA/BLIP-2/MiniGPT-4 .pth files, Lightning .ckpt, diffusers dir) into
    `directory` and returns the path of its bundle.json. Its output is noise; it exists to run
    the whole pipeline quickly without downloading anything.

    shape: "tiny" (a few MB, loads in well under a second) or "minigpt5" (the real shapes:
    Vicuna-7B, EVA ViT-g, BERT-base Q-Former, SD 2.1-base; about 18 GB of bfloat16 on disk).
    Same (shape, seed), same files. progress: None or a callable(file, bytes) called after
    each file is written (an exception raised in it stops the writing and propagates)."""
    return _voken._write_random_bundle(os.fspath(directory), shape, int(seed), progress)
