"""A progress display for generate_interleaved(): tokens and denoising steps, without tqdm.

Three ways of showing it, chosen by where Python runs:
  notebook  (an IPython kernel: Jupyter, VS Code, nbclient): one HTML <progress> line updated in
            place through an IPython display handle;
  terminal  (stderr is a tty): one line redrawn with carriage returns;
  plain     (anything else: logs, CI, captured output): a line per phase, no redrawing.

A ProgressBar is a callback: pass it (or ``progress=True``) to generate_interleaved(). It sees
voken.ProgressEvent objects: ``stage`` ("encode_images", "prefill", "token", "denoise",
"image_done"), ``current``, ``total``, ``image``, ``text``.
"""

import html
import sys
import time

__all__ = ["ProgressBar", "in_notebook"]


def in_notebook():
    """Whether this Python runs inside an IPython kernel (where display handles update)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an IPython too old or half-initialised: not a notebook we can drive
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _bar(fraction, width):
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * filled + "-" * (width - filled)


class ProgressBar:
    """Shows generate_interleaved()'s progress; use as its ``progress`` callback.

    mode: "auto" (default: notebook, terminal or plain, see the module docstring), "notebook",
    "terminal" or "plain". file: where terminal/plain output goes (default sys.stderr).
    min_interval: seconds between redraws of the same phase.
    """

    def __init__(self, mode="auto", file=None, width=24, min_interval=0.1):
        if mode not in ("auto", "notebook", "terminal", "plain"):
            raise ValueError(f"mode: expected 'auto', 'notebook', 'terminal' or 'plain', got {mode!r}")
        self.file = file if file is not None else sys.stderr
        if mode == "auto":
            if in_notebook():
                mode = "notebook"
            else:
                isatty = getattr(self.file, "isatty", None)
                mode = "terminal" if isatty is not None and isatty() else "plain"
        self.mode = mode
        self.width = width
        self.min_interval = min_interval
        self.tokens = 0
        self.max_tokens = 0
        self.images_done = 0
        self.phase = None
        self.fraction = 0.0
        self.detail = ""
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_length = 0
        self._handle = None
        self._closed = False

    # -- the callback ------------------------------------------------------------------------

    def __call__(self, event):
        stage = event.stage
        if stage == "encode_images":
            self._set("images", 0.0, f"encoding {event.total} input image{'s' * (event.total != 1)}")
        elif stage == "prefill":
            self._set("prompt", 0.0, f"reading the prompt ({event.total} positions)")
        elif stage == "token":
            self.tokens, self.max_tokens = event.current, event.total
            fraction = event.current / event.total if event.total > 0 else 0.0
            self._set("text", fraction, f"{event.current}/{event.total} tokens")
        elif stage == "denoise":
            fraction = event.current / event.total if event.total > 0 else 0.0
            self._set(f"image {event.image + 1}", fraction,
                      f"step {event.current}/{event.total} | {self.tokens} tokens")
        elif stage == "image_done":
            self.images_done = max(self.images_done, event.image + 1)
            self._set(f"image {event.image + 1}", 1.0, f"done | {self.tokens} tokens", force=True)
        return None  # continue

    def close(self, summary=None):
        """Draws the final state (with `summary`, e.g. "42 tokens, 1 image") and ends the line."""
        if self._closed:
            return
        self._closed = True
        elapsed = time.monotonic() - self.started
        text = summary if summary is not None else f"{self.tokens} tokens, {self.images_done} images"
        self.phase, self.fraction, self.detail = "done", 1.0, f"{text} in {elapsed:.1f} s"
        self._draw(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close("stopped" if exc[0] is not None else None)
        return False

    # -- drawing -----------------------------------------------------------------------------

    def _set(self, phase, fraction, detail, force=False):
        new_phase = phase != self.phase
        self.phase, self.fraction, self.detail = phase, fraction, detail
        now = time.monotonic()
        if self.mode == "plain":
            if new_phase or force:
                self._draw()
            return
        if new_phase or force or now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self._draw()

    def _line(self):
        return f"voken: {self.phase:<8} [{_bar(self.fraction, self.width)}] {self.detail}"

    def _draw(self, final=False):
        if self.mode == "notebook":
            self._draw_notebook()
            return
        line = self._line()
        if self.mode == "terminal":
            padding = " " * max(0, self._last_length - len(line))
            self.file.write("\r" + line + padding + ("\n" if final else ""))
            self._last_length = len(line)
        else:
            self.file.write(line + "\n")
        self.file.flush()

    def _draw_notebook(self):
        from IPython.display import HTML, display

        value = int(round(self.fraction * 1000))
        content = HTML(
            f'<div style="font-family: monospace">voken: {html.escape(str(self.phase))} '
            f'<progress value="{value}" max="1000" style="width: 16em; vertical-align: middle">'
            f'</progress> {html.escape(self.detail)}</div>')
        if self._handle is None:
            self._handle = display(content, display_id=True)
        else:
            self._handle.update(content)
