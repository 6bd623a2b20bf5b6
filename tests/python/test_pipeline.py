"""voken.Pipeline end to end on a tiny random-weight bundle (voken.write_random_bundle): input
kinds, outputs, determinism, progress and cancellation, the GIL, bad input, and importing voken
without Python torch. The bundle's weights are random: tests check structure and behaviour,
never the content of the text or images.

Run: PYTHONPATH=<build>/python /usr/bin/python3 -m pytest -q tests/python
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import voken

# Small everything: 64x64 images, 2 denoising steps, short responses.
FAST = dict(max_new_tokens=24, steps=2, height=64, width=64, progress=False)


def image_array(seed=0, height=40, width=56):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def as_arrays(result):
    return [np.asarray(image) for image in result.images]


# ---------------------------------------------------------------------------------------------
# What comes out


def test_generate_text_and_image(pipe):
    Image = pytest.importorskip("PIL.Image")
    result = pipe.generate_interleaved(["A cat on a sofa.", image_array(), "What happens next?"], seed=1,
                                       force_image=True, **FAST)
    assert isinstance(result, voken.GenerationResult)
    assert len(result.images) >= 1, f"force_image gave no image: {result.raw_text!r}"
    for segment in result.segments:
        assert isinstance(segment, (str, Image.Image)), type(segment)
    for image in result.images:
        assert image.mode == "RGB" and image.size == (64, 64)
    assert "[IMG" not in result.text and "[IMG0]" in result.raw_text
    assert result.text == "\n".join(s for s in result.segments if isinstance(s, str))
    assert result.prompt.count("<ImageHere>") == 1 and "###Human:" in result.prompt
    assert result.prompt_tokens > 32 and result.generated_tokens >= 1
    assert result.stop_reason in ("eos", "stop_sequence", "max_new_tokens", "context_full")
    assert set(result.timings) == {"encode_images", "prefill", "decode", "mapping", "diffusion", "total"}
    assert all(value >= 0 for value in result.timings.values())
    assert result.random_weights and "random weights" in repr(result)
    assert "<img src='data:image/png;base64," in result._repr_html_()


def test_same_seed_same_output(pipe):
    runs = [pipe.generate_interleaved(["Tell me a story."], seed=seed, force_image=True, **FAST)
            for seed in (7, 7)]
    assert runs[0].raw_text == runs[1].raw_text
    assert len(runs[0].images) == len(runs[1].images) >= 1
    for a, b in zip(as_arrays(runs[0]), as_arrays(runs[1])):
        np.testing.assert_array_equal(a, b)


def test_numpy_images_on_request(pipe):
    result = pipe.generate_interleaved("A beach.", seed=2, force_image=True, numpy_images=True, **FAST)
    assert result.images
    for image in result.images:
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (64, 64, 3)


def test_conditions_are_the_mapper_outputs(pipe):
    result = pipe.generate_interleaved(["A dog."], seed=3, force_image=True, keep_conditions=True,
                                       draw_images=False, **FAST)
    assert result.images == [] and len(result.conditions) >= 1
    positive, negative = result.conditions[0]
    assert positive.shape == negative.shape == (pipe.mapper.prompt_len, pipe.mapper.sd_dim)
    np.testing.assert_allclose(negative, pipe.mapper.negative()[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# What goes in


def test_every_image_kind_gives_the_same_result(pipe, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = image_array(seed=4)
    path = tmp_path / "input.png"
    voken.save_image(rgb, path)
    kinds = {
        "array": rgb,
        "bytes": voken.encode_image(rgb, "png"),
        "path": path,
        "ImageFile": voken.ImageFile(str(path)),
        "PIL": Image.fromarray(rgb),
        "PIL RGBA": Image.fromarray(rgb).convert("RGBA"),
        "array RGBA": np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=2),
    }
    texts = {}
    for name, image in kinds.items():
        result = pipe.generate_interleaved([voken.Text("Look:"), image, "What is it?"], seed=5,
                                           draw_images=False, **FAST)
        texts[name] = result.raw_text
    assert len(set(texts.values())) == 1, texts
    gray = rgb[:, :, 1]
    result = pipe.generate_interleaved(["Look:", gray], seed=5, draw_images=False, **FAST)
    assert result.prompt.count("<ImageHere>") == 1


def test_plain_str_is_text(pipe, tmp_path):
    path = tmp_path / "photo.png"
    voken.save_image(image_array(), path)
    as_text = pipe.build_prompt([str(path)])
    assert str(path) in as_text and "<ImageHere>" not in as_text
    as_image = pipe.build_prompt([path])
    assert as_image.count("<ImageHere>") == 1 and str(path) not in as_image
    raw = pipe.build_prompt(["USER: ", path, " ASSISTANT:"], raw_prompt=True)
    assert raw.startswith("USER:") and "###Human" not in raw
    custom = pipe.build_prompt(["Hi"], system_prompt="You are terse.")
    assert "You are terse." in custom


def test_two_images_in_one_prompt(pipe):
    result = pipe.generate_interleaved(["First:", image_array(1), "second:", image_array(2, 30, 30)], seed=6,
                                       draw_images=False, **FAST)
    assert result.prompt.count("<ImageHere>") == 2


# ---------------------------------------------------------------------------------------------
# Progress, cancelling, threads


def test_progress_callback_sees_every_stage(pipe):
    events = []
    result = pipe.generate_interleaved(["Look:", image_array()], seed=1, force_image=True,
                                       **dict(FAST, progress=events.append))
    stages = [event.stage for event in events]
    for stage in ("encode_images", "prefill", "token", "denoise", "image_done"):
        assert stage in stages, stages
    tokens = [event for event in events if event.stage == "token"]
    assert tokens[-1].current == result.generated_tokens and tokens[-1].total == FAST["max_new_tokens"]
    denoise = [event for event in events if event.stage == "denoise"]
    # (PNDM runs steps + 1 UNet passes: total counts the passes.)
    assert denoise[-1].current == denoise[-1].total >= FAST["steps"]
    assert isinstance(tokens[0].text, str) and "ProgressEvent(token" in repr(tokens[0])


def test_progress_bar_plain_output(pipe, capsys):
    pipe.generate_interleaved(["Hello"], seed=1, force_image=True, **dict(FAST, progress=True))
    err = capsys.readouterr().err
    assert "voken: text" in err and "voken: done" in err, err


def test_progress_bar_terminal_redraws_one_line():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = voken.ProgressBar(file=out, min_interval=0)
    assert bar.mode == "terminal"

    class Event:
        def __init__(self, stage, current, total, image=0):
            self.stage, self.current, self.total, self.image, self.text = stage, current, total, image, ""

    for i in range(1, 4):
        bar(Event("token", i, 10))
    bar(Event("denoise", 1, 2))
    bar.close("3 tokens, 1 image")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 5
    assert "3/10 tokens" in text and "step 1/2" in text and "3 tokens, 1 image" in text


@pytest.mark.parametrize("stage", ["token", "denoise"])
def test_callback_returning_false_cancels(pipe, stage):
    def stop(event):
        return event.stage != stage

    with pytest.raises(voken.Cancelled):
        pipe.generate_interleaved(["Hello"], seed=1, force_image=True, **dict(FAST, progress=stop))


def test_exception_in_callback_propagates(pipe):
    class Stop(Exception):
        pass

    calls = []

    def fail(event):
        calls.append(event.stage)
        if event.stage == "token":
            raise Stop("from the callback")

    with pytest.raises(Stop, match="from the callback"):
        pipe.generate_interleaved(["Hello"], seed=1, **dict(FAST, progress=fail))
    assert calls.count("token") == 1, "the callback was called again after it raised"
    # The pipeline is still usable afterwards.
    assert pipe.generate_interleaved(["Hello"], seed=1, draw_images=False, **FAST).generated_tokens >= 1


def test_ctrl_c_interrupts(pipe):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    sent = []

    def interrupt(event):
        if event.stage == "token" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        pipe.generate_interleaved(["Hello"], seed=1, **dict(FAST, progress=interrupt))


def test_ctrl_c_from_outside_interrupts(pipe):
    # The signal arrives while C++ works without the GIL (as a Ctrl-C does): the next progress
    # event checks for it and the call ends with KeyboardInterrupt.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    started = threading.Event()

    def note(event):
        started.set()

    def interrupt():
        started.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=interrupt)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # force_image with 50 steps: far longer than the signal takes to arrive.
            pipe.generate_interleaved(["Hello"], seed=1, force_image=True,
                                      **dict(FAST, steps=50, max_new_tokens=256, progress=note))
    finally:
        started.set()
        killer.join()


def test_gil_is_released(pipe):
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    try:
        time.sleep(0.01)
        before = counter[0]
        started = time.monotonic()
        pipe.generate_interleaved(["Hello"], seed=1, force_image=True, **dict(FAST, max_new_tokens=48))
        elapsed = time.monotonic() - started
        during = counter[0] - before
    finally:
        stop.set()
        thread.join()
    # A thread that held the GIL for the whole call would leave the counter nearly still; a
    # Python loop on a free GIL counts ~10^6 per second.
    assert during > 1000 * elapsed, f"the counting thread advanced {during} in {elapsed:.3f} s"


def test_concurrent_calls_match_sequential(pipe):
    segments = ["Look:", image_array(3)]
    expected = [pipe.generate_interleaved(segments, seed=seed, draw_images=False, **FAST).raw_text
                for seed in (10, 11)]
    results = {}

    def run(seed):
        results[seed] = pipe.generate_interleaved(segments, seed=seed, draw_images=False, **FAST).raw_text

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[10], results[11]] == expected


# ---------------------------------------------------------------------------------------------
# The components of a loaded pipeline


def test_components_are_exposed(pipe):
    tokenizer = pipe.tokenizer
    assert isinstance(tokenizer, voken.Tokenizer)
    assert tokenizer.token_id("[IMG0]") is not None and tokenizer.token_id("<ImageHere>") is not None
    ids = tokenizer.encode("Hello world")
    logits, hidden = pipe.llm.forward([1] + ids)
    assert logits.shape == (1, len(ids) + 1, pipe.llm.vocab_size)
    assert hidden.shape[-1] == pipe.mapper.llm_dim == pipe.image_encoder.output_width
    assert pipe.image_encoder.encode([image_array()]).shape == (1, 32, pipe.llm.hidden_size)
    condition = pipe.mapper.map(hidden[:, -8:])
    assert condition.shape == (1, pipe.mapper.prompt_len, pipe.mapper.sd_dim)
    images = pipe.diffusion.generate(condition, pipe.mapper.negative(), steps=2, height=64, width=64)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    assert "random weights" in repr(pipe)
    description = pipe.describe()
    assert isinstance(description, str) and description.strip()


def test_components_loaded_by_hand_match_the_pipeline(pipe, tiny_bundle):
    # The component classes read the bundle's files the way the pipeline does.
    bundle = pathlib.Path(tiny_bundle).parent
    manifest = json.loads(pathlib.Path(tiny_bundle).read_text())
    tokenizer = voken.Tokenizer.from_directory(bundle / manifest["tokenizer"]["path"])
    text = "A story about a red kite."
    assert tokenizer.encode(text) == pipe.tokenizer.encode(text)
    assert tokenizer.vocab_size == pipe.tokenizer.vocab_size

    stages = [bundle / manifest["minigpt5"]["stage1"], bundle / manifest["minigpt5"]["stage2"]]
    mapper = voken.VokenMapper.load(*stages, dtype="float32")
    hidden = np.random.default_rng(0).standard_normal((1, 8, mapper.llm_dim)).astype(np.float32)
    np.testing.assert_array_equal(mapper.map(hidden), pipe.mapper.map(hidden))

    llm = voken.Llama.load(bundle / manifest["llm"]["path"], dtype="float32", adapter=stages[0])
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    logits, _ = llm.forward(ids)
    assert logits.shape == (1, len(ids), pipe.llm.vocab_size)

    vision = manifest["vision"]
    encoder = voken.ImageEncoder.load(bundle / vision["vit"], bundle / vision["qformer"], bundle / vision["projection"],
                                      config=bundle / vision["config"], dtype="float32")
    image = image_array(8)
    np.testing.assert_array_equal(encoder.encode([image]), pipe.image_encoder.encode([image]))

    sd = voken.StableDiffusion.load(bundle / manifest["diffusion"]["path"], dtype="float32")
    condition = pipe.mapper.map(hidden)
    for scheduler in (None, "euler_ancestral"):
        ours = sd.generate(condition, pipe.mapper.negative(), steps=2, height=64, width=64, seed=4,
                           scheduler=scheduler)
        theirs = pipe.diffusion.generate(condition, pipe.mapper.negative(), steps=2, height=64, width=64, seed=4,
                                         scheduler=scheduler)
        np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError):
        voken.Pipeline.load(tmp_path / "no_bundle.json")


def test_manifest_with_unknown_key(tiny_bundle):
    manifest = json.loads(pathlib.Path(tiny_bundle).read_text())
    manifest["difusion"] = manifest.get("diffusion")  # a typo must not be ignored
    # Next to the original, so that its relative paths still resolve.
    edited = pathlib.Path(tiny_bundle).parent / "bundle_typo.json"
    edited.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="difusion"):
        voken.Pipeline.load(edited)


def test_random_bundle_writer(tmp_path, tiny_bundle):
    files = []
    manifest = voken.write_random_bundle(tmp_path / "again", seed=0, progress=lambda f, n: files.append((f, n)))
    assert os.path.basename(manifest) == "bundle.json" and json.loads(pathlib.Path(manifest).read_text())["random_weights"]
    assert "bundle.json" in [f for f, _ in files] and all(n > 0 for _, n in files)
    # Same seed, same bytes.
    for name, _ in files:
        assert (tmp_path / "again" / name).read_bytes() == (pathlib.Path(tiny_bundle).parent / name).read_bytes(), name
    with pytest.raises(ValueError, match="shape"):
        voken.write_random_bundle(tmp_path / "bad", shape="huge")

    class Stop(Exception):
        pass

    def stop(file, size):
        raise Stop(file)

    with pytest.raises(Stop):
        voken.write_random_bundle(tmp_path / "stopped", progress=stop)


def test_empty_segments(pipe):
    with pytest.raises(ValueError):
        pipe.generate_interleaved([], **FAST)


def test_missing_image_file(pipe, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        pipe.generate_interleaved(["Look:", missing], **FAST)


def test_undecodable_image(pipe):
    with pytest.raises(voken.FormatError):
        pipe.generate_interleaved(["Look:", b"\x89PNG but not really"], **FAST)
    with pytest.raises(ValueError, match="uint8"):
        pipe.generate_interleaved(["Look:", np.zeros((8, 8, 3), np.float32)], **FAST)
    with pytest.raises(TypeError):
        pipe.generate_interleaved(["Look:", object()], **FAST)


@pytest.mark.parametrize("option", [
    dict(steps=0), dict(temperature=0.0), dict(top_p=0.0), dict(height=63), dict(max_new_tokens=-1),
    dict(repetition_penalty=0.5), dict(scheduler="not_a_scheduler"), dict(seed=-1),
])
def test_bad_options(pipe, option):
    with pytest.raises(ValueError):
        pipe.generate_interleaved(["Hello"], **dict(FAST, **option))


def test_text_only_pipeline(tiny_bundle):
    text_only = voken.Pipeline.load(tiny_bundle, dtype="float32", load_diffusion=False)
    assert text_only.diffusion is None
    result = text_only.generate_interleaved(["Hello"], seed=1, force_image=True, draw_images=False, **FAST)
    assert result.images == []
    with pytest.raises(ValueError):
        text_only.generate_interleaved(["Hello"], seed=1, force_image=True, **FAST)


# ---------------------------------------------------------------------------------------------
# Without Python torch


def test_pipeline_without_torch(tmp_path):
    # A fresh interpreter where `import torch` fails: voken must neither need nor import it.
    # PIL is blocked too: images then come back as numpy arrays.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(voken.__file__)))
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["PIL"] = None
import numpy as np
import voken
manifest = voken.write_random_bundle({str(tmp_path)!r})
pipe = voken.Pipeline.load(manifest, dtype="float32")
result = pipe.generate_interleaved(["Hi", np.zeros((32, 32, 3), np.uint8)], seed=1, force_image=True,
                                   max_new_tokens=16, steps=1, height=64, width=64, progress=False)
assert result.images, result.raw_text
assert all(isinstance(image, np.ndarray) and image.shape == (64, 64, 3) for image in result.images)
print("OK", len(result.images))
"""
    env = dict(os.environ, PYTHONPATH=package_parent)
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0 and "OK" in completed.stdout, completed.stdout + completed.stderr
