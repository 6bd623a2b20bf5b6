"""voken.Pipeline: MiniGPT-5 behind one call (text and images in, text and images out)."""

import base64
import html
import os

import numpy as np

from . import _voken
from ._images import ImageFile, Text, to_output_image
from .progress import ProgressBar

__all__ = ["Pipeline", "GenerationResult"]

_SEGMENT_TYPES_HINT = ("str / voken.Text (text), pathlib.Path / voken.ImageFile (image file), bytes "
                       "(encoded image), PIL.Image.Image, numpy uint8 [H, W, 3] array")


def _as_segment_list(segments):
    """A list of segments; a single segment (a str, an image) is taken as a one-item list."""
    if isinstance(segments, (str, bytes, bytearray, memoryview, Text, ImageFile, os.PathLike, np.ndarray)):
        return [segments]
    if hasattr(segments, "mode") and hasattr(segments, "size") and hasattr(segments, "convert"):
        return [segments]  # a PIL image
    try:
        return list(segments)
    except TypeError:
        raise TypeError(f"segments: expected a list of segments ({_SEGMENT_TYPES_HINT}), "
                        f"got {type(segments).__name__}") from None


def _options(seed=0, max_new_tokens=256, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=2.0,
             min_new_tokens=1, do_sample=True, steps=50, guidance_scale=7.5, height=512, width=512,
             scheduler=None, force_image=False, max_images=4, raw_prompt=False, system_prompt=None,
             draw_images=True, keep_conditions=False):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2 ** 64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    options = _voken.GenerateOptions()
    options.seed = int(seed)
    options.do_sample = bool(do_sample)
    options.temperature = float(temperature)
    options.top_k = int(top_k)
    options.top_p = float(top_p)
    options.repetition_penalty = float(repetition_penalty)
    options.min_new_tokens = int(min_new_tokens)
    options.max_new_tokens = int(max_new_tokens)
    options.steps = int(steps)
    options.guidance_scale = float(guidance_scale)
    options.height = int(height)
    options.width = int(width)
    options.scheduler = "" if scheduler is None else str(scheduler)
    options.force_image = bool(force_image)
    options.max_images = int(max_images)
    options.raw_prompt = bool(raw_prompt)
    if system_prompt is not None:
        options.system_prompt = str(system_prompt)
    options.draw_images = bool(draw_images)
    options.keep_conditions = bool(keep_conditions)
    return options


class GenerationResult:
    """What generate_interleaved() returns.

    segments          the response in order: ``str`` and images (``PIL.Image.Image``, or uint8
                      numpy arrays [H, W, 3] when PIL is not installed or numpy was asked for)
    text              the text segments joined by newlines (images left out)
    images            the images, in order
    raw_text          the response as the LLM wrote it, voken markers included
    prompt            the prompt as tokenized (<ImageHere> where image rows went)
    prompt_tokens     prompt positions (text tokens + image rows + BOS)
    generated_tokens  tokens sampled (the forced vokens not counted)
    stop_reason       "eos", "stop_sequence", "max_new_tokens" or "context_full"
    timings           seconds per stage: encode_images, prefill, decode, mapping, diffusion, total
    conditions        with keep_conditions=True: per image, (positive, negative) float32 [77, d]
    random_weights    True when the bundle is labelled as random weights (output is noise)
    """

    def __init__(self, native, use_pil=True, random_weights=False):
        self.segments = [s if isinstance(s, str) else to_output_image(s, use_pil) for s in native["segments"]]
        self.raw_text = native["raw_text"]
        self.prompt = native["prompt"]
        self.prompt_tokens = native["prompt_tokens"]
        self.generated_tokens = native["generated_tokens"]
        self.stop_reason = native["stop_reason"]
        self.timings = dict(native["timings"])
        self.conditions = list(native["conditions"])
        self.random_weights = bool(random_weights)

    @property
    def text(self):
        return "\n".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self):
        return [s for s in self.segments if not isinstance(s, str)]

    def __iter__(self):
        return iter(self.segments)

    def __len__(self):
        return len(self.segments)

    def __repr__(self):
        label = ", random weights" if self.random_weights else ""
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (f"GenerationResult({len(self.images)} image(s), {self.generated_tokens} tokens, "
                f"stop={self.stop_reason!r}{label}, text={text!r})")

    def _repr_html_(self):
        """Text and images inline (Jupyter shows this when the result is a cell's value)."""
        parts = []
        if self.random_weights:
            parts.append("<p><em>random weights: the text and images are noise</em></p>")
        for segment in self.segments:
            if isinstance(segment, str):
                parts.append(f"<p style='white-space: pre-wrap'>{html.escape(segment)}</p>")
            else:
                array = np.asarray(segment)
                encoded = base64.b64encode(_voken.encode_image(array, "png")).decode("ascii")
                parts.append(f"<img src='data:image/png;base64,{encoded}' "
                             f"width='{array.shape[1]}' height='{array.shape[0]}'/>")
        return "\n".join(parts)


class Pipeline:
    """MiniGPT-5 (LLM + image encoder + voken mapper + Stable Diffusion) loaded from a bundle.

    >>> pipe = voken.Pipeline.load("minigpt5/bundle.json")
    >>> result = pipe.generate_interleaved(["A cat on a sofa.", pathlib.Path("sofa.jpg"),
    ...                                     "What happens next?"])
    >>> result.text, result.images

    A Pipeline is immutable after loading; concurrent generate_interleaved() calls (from
    several Python threads) are allowed: the work runs without the GIL.
    """

    def __init__(self, native, manifest=None):
        if not isinstance(native, _voken._Pipeline):
            raise TypeError("use voken.Pipeline.load(manifest) to make a Pipeline")
        self._native = native
        self.manifest = manifest

    @classmethod
    def load(cls, manifest, device=None, dtype=None, num_threads=None, load_diffusion=True):
        """Loads the bundle a manifest (bundle.json, see docs/bundle.md) describes.

        device: None (the manifest's, default "cpu"), "cpu", "cuda", "cuda:N".
        dtype: None (the manifest's, default "bfloat16"), "float32" or "bfloat16", for every part.
        num_threads: None keeps the process's libtorch intra-op thread count (importing voken
                set one per core unless $OMP_NUM_THREADS; see voken.set_num_threads); an int sets
                it, process-wide (0: $OMP_NUM_THREADS when set, else one per core).
        load_diffusion: False loads a text-only pipeline (images are read, not drawn).
        Every part is checked before any weight is loaded; the problems come in one exception
        (FileNotFoundError, or voken.ConfigError / voken.WeightsError, both ValueErrors).
        """
        threads = None if num_threads is None else int(num_threads)
        native = _voken._Pipeline.load(os.fspath(manifest), dtype or "", device or "", threads, bool(load_diffusion))
        return cls(native, os.path.abspath(os.fspath(manifest)))

    def generate_interleaved(self, segments, *, seed=0, max_new_tokens=256, temperature=1.0, top_p=0.9,
                             top_k=50, repetition_penalty=2.0, min_new_tokens=1, do_sample=True, steps=50,
                             guidance_scale=7.5, height=512, width=512, scheduler=None, force_image=False,
                             max_images=4, raw_prompt=False, system_prompt=None, draw_images=True,
                             keep_conditions=False, progress=True, numpy_images=False):
        """Continues a conversation of text and images with text and images.

        segments: a list of
          - ``str`` or ``voken.Text``: text. A ``str`` is ALWAYS text, even if it names a file;
          - ``pathlib.Path`` / ``voken.ImageFile(path)``: an image file;
          - ``bytes``: an encoded image (JPEG, PNG, WebP, BMP);
          - ``PIL.Image.Image`` (any mode; converted to RGB);
          - numpy uint8 arrays: [H, W, 3] RGB, [H, W] gray or [H, W, 4] RGBA (alpha dropped).
        Text options (upstream MiniGPT-5's defaults): do_sample, temperature, top_p, top_k,
        repetition_penalty, min_new_tokens, max_new_tokens. Image options: steps, guidance_scale,
        height, width, scheduler (None: the bundle's; "pndm", "ddim", "euler",
        "euler_ancestral", "dpm_solver"). seed: everything random derives from it (same seed,
        same output). force_image: boost [IMG0] until an image exists (upstream
        force_generation); max_images bounds the images; draw_images=False maps the vokens but
        draws nothing; keep_conditions keeps each image's prompt embeddings. raw_prompt: the
        text segments are the whole prompt (no system prompt or ###Human/###Assistant);
        system_prompt replaces upstream's.
        progress: True (a progress bar: notebook, terminal or plain text), False, or a callable
        taking a voken.ProgressEvent; returning False from it cancels (voken.Cancelled), and an
        exception raised in it cancels and propagates (so does Ctrl-C).
        numpy_images: return images as uint8 numpy arrays even when PIL is installed.

        Raises ValueError for bad options or an empty segment list, FileNotFoundError for
        image files that do not exist, voken.FormatError for undecodable images.
        """
        items = _as_segment_list(segments)
        options = _options(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                           do_sample=do_sample, steps=steps, guidance_scale=guidance_scale, height=height,
                           width=width, scheduler=scheduler, force_image=force_image, max_images=max_images,
                           raw_prompt=raw_prompt, system_prompt=system_prompt, draw_images=draw_images,
                           keep_conditions=keep_conditions)
        bar = None
        if progress is True:
            bar = ProgressBar()
            callback = bar
        elif progress is False or progress is None:
            callback = None
        elif callable(progress):
            callback = progress
        else:
            raise TypeError(f"progress: expected True, False or a callable, got {type(progress).__name__}")
        try:
            native = self._native.generate(items, options, callback)
        except BaseException:
            if bar is not None:
                bar.close("stopped")
            raise
        result = GenerationResult(native, use_pil=not numpy_images, random_weights=self.random_weights)
        if bar is not None:
            images = len(result.images)
            bar.close(f"{result.generated_tokens} tokens, {images} image{'s' * (images != 1)}")
        return result

    def build_prompt(self, segments, *, raw_prompt=False, system_prompt=None):
        """The prompt generate_interleaved() would build (with <ImageHere> where images go)."""
        options = _options(raw_prompt=raw_prompt, system_prompt=system_prompt)
        return self._native.build_prompt(_as_segment_list(segments), options)

    def describe(self):
        """One line per part: paths, dtypes, parameter counts."""
        return self._native.describe()

    @property
    def random_weights(self):
        """Whether the bundle says its weights are random (a demo/test bundle)."""
        getter = getattr(self._native, "random_weights", None)
        return bool(getter) if getter is not None else False

    def __repr__(self):
        where = f"{self.manifest!r}" if self.manifest else "?"
        label = ", random weights" if self.random_weights else ""
        return f"voken.Pipeline({where}{label})"


def _component(name, doc):
    def get(self):
        return getattr(self._native, name)

    get.__doc__ = doc
    return property(get)


# The loaded components (shared with the pipeline, not copies), for users who need one part.
for _name, _doc in (("tokenizer", "The voken.Tokenizer."), ("llm", "The voken.Llama (adapters applied)."),
                    ("image_encoder", "The voken.ImageEncoder."), ("mapper", "The voken.VokenMapper."),
                    ("diffusion", "The voken.StableDiffusion (None when loaded without diffusion).")):
    setattr(Pipeline, _name, _component(_name, _doc))
del _name, _doc
