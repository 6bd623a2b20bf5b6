"""The component classes of the Python API (Tokenizer, Llama, ImageEncoder, VokenMapper, UNet,
VAE, Scheduler, StableDiffusion, image helpers), each checked once against its golden folder
($VOKEN_GOLDEN_DIR, default <repo>/../shared/golden; tests skip when a folder is absent), plus
argument handling that only the binding does (paths, dtypes, numpy conversion, errors).

Run: PYTHONPATH=<build>/python /usr/bin/python3 -m pytest -q tests/python
"""

import math
import os
import pathlib

import numpy as np
import pytest

from conftest import GOLDEN_DIR, assert_close

import voken


# ---------------------------------------------------------------------------------------------
# Tokenizer


def llama_tokenizer_model(golden):
    tokenizer_golden = golden("tokenizer")
    path = tokenizer_golden.path(tokenizer_golden.spec.get("vocab_file", "../../assets/llama/tokenizer.model"))
    if not os.path.isfile(path):
        pytest.skip(f"LLaMA tokenizer.model not found at {path}")
    return tokenizer_golden, path


def test_tokenizer_matches_golden_ids(golden):
    cases, path = llama_tokenizer_model(golden)
    tokenizer = voken.Tokenizer.from_file(pathlib.Path(path))  # os.PathLike accepted
    assert tokenizer.vocab_size == 32009 == len(tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)
    for name, token_id in cases.spec["added_tokens"].items():
        assert tokenizer.token_id(name) == token_id
    checked = 0
    for case in cases.spec["cases"]:
        want = cases[f"{case['name']}.ids"].tolist()
        if case["kind"] == "plain":
            got = tokenizer.sentencepiece_encode(case["text"])
        else:
            got = tokenizer.encode(case["text"])
        assert got == want, f"{case['name']}: ids {got}, expected {want}"
        # decode takes lists and integer arrays alike.
        assert tokenizer.decode(np.asarray(want, dtype=np.int64)) == case["decoded"], case["name"]
        checked += 1
    assert checked == len(cases.spec["cases"])


def test_tokenizer_added_tokens_and_errors(golden):
    _, path = llama_tokenizer_model(golden)
    tokenizer = voken.Tokenizer.from_file(path)
    names = [t.content for t in tokenizer.added_tokens]
    assert names == [f"[IMG{i}]" for i in range(8)] + ["<ImageHere>"]
    assert [t.id for t in voken.minigpt5_added_tokens()] == list(range(32000, 32009))
    assert tokenizer.decode([1, 15043, 32000], skip_special_tokens=True) == "Hello"
    plain = voken.Tokenizer.from_file(path, added_tokens=[])
    assert plain.vocab_size == 32000
    with pytest.raises(ValueError, match="32009"):
        tokenizer.decode([32009])
    with pytest.raises(ValueError):
        tokenizer.decode([1.5])
    with pytest.raises(FileNotFoundError):
        voken.Tokenizer.from_file(os.path.join(GOLDEN_DIR, "no_such_tokenizer.model"))


# ---------------------------------------------------------------------------------------------
# Llama


@pytest.fixture(scope="module")
def llama(golden):
    cases = golden("llama")
    return cases, voken.Llama.load(cases.model_dir())


def test_llama_forward_matches_golden(llama):
    cases, model = llama
    assert model.config["num_hidden_layers"] == 2 and model.dtype == "float32"
    case = cases.cases["prefill"]
    logits, hidden = model.forward(cases["prefill.input_ids"])
    assert_close(logits, cases["prefill.logits"], case["atol"], case["rtol"], "prefill.logits")
    assert hidden.shape == (1, 12, model.hidden_size) and hidden.dtype == np.float32

    case = cases.cases["embeds"]
    logits, hidden = model.forward(inputs_embeds=cases["embeds.inputs_embeds"])
    assert_close(logits, cases["embeds.logits"], case["atol"], case["rtol"], "embeds.logits")
    assert_close(hidden, cases["embeds.hidden"], case["atol"], case["rtol"], "embeds.hidden")

    last, _ = model.forward(cases["prefill.input_ids"], logits="last")
    assert last.shape == (1, 1, model.vocab_size)
    none, _ = model.forward(cases["prefill.input_ids"], logits="none")
    assert none is None


def test_llama_greedy_generate_matches_golden(llama):
    cases, model = llama
    prompt = cases["greedy.input_ids"]
    want = cases["greedy.output_ids"][0].tolist()
    got = model.generate(prompt, max_new_tokens=len(want), eos_token_ids=[])
    # output_ids may hold the prompt (HF's decoder-only output) or only the continuation.
    continuation = want[prompt.shape[1]:] if len(want) > len(got) else want
    assert got == continuation


def test_llama_bad_input(llama):
    _, model = llama
    with pytest.raises(ValueError):
        model.forward([[0, model.vocab_size]])
    with pytest.raises(ValueError):
        model.forward()
    with pytest.raises(ValueError):
        model.forward([[1, 2]], logits="some")
    with pytest.raises(ValueError):
        model.generate([1, 2], temperature=0.0, do_sample=True)
    model_dir = os.path.join(GOLDEN_DIR, "llama", "model")
    with pytest.raises(ValueError, match="dtype"):
        voken.Llama.load(model_dir, dtype="int8")
    with pytest.raises(FileNotFoundError):
        voken.Llama.load(os.path.join(model_dir, "missing"))


# ---------------------------------------------------------------------------------------------
# Images, preprocessing and the image encoder


def test_preprocess_matches_golden(golden):
    cases = golden("preprocess")
    case = cases.spec["cases"][0]
    rgb = cases[f"{case['name']}.rgb"]
    for mode in ("blip2_eval", "playground"):
        got = voken.preprocess(rgb, mode=mode)
        assert got.shape == (3, 224, 224) and got.dtype == np.float32
        assert_close(got, cases[f"{case['name']}.{mode}"], case["atol"], case["rtol"], mode)
    source = os.path.normpath(os.path.join(GOLDEN_DIR, "..", case["source_image"].replace("shared/", "", 1)))
    if os.path.isfile(source):
        # A path decodes to the same pixels the golden stores (PIL-compatible decoding).
        np.testing.assert_array_equal(voken.load_image(pathlib.Path(source)), rgb)
        with open(source, "rb") as f:
            np.testing.assert_array_equal(voken.load_image(f.read()), rgb)


def test_image_helpers_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    png = voken.encode_image(rgb, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(voken.load_image(png), rgb)
    voken.save_image(rgb, tmp_path / "x.png")
    np.testing.assert_array_equal(voken.load_image(tmp_path / "x.png"), rgb)
    # Gray and RGBA arrays are converted like PIL's convert("RGB").
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(voken.load_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(voken.load_image(rgba), rgb)
    # Non-contiguous views are fine.
    np.testing.assert_array_equal(voken.load_image(rgb[::2, ::-1]), rgb[::2, ::-1])
    with pytest.raises(ValueError, match="uint8"):
        voken.load_image(rgb.astype(np.float32))
    with pytest.raises(voken.FormatError):
        voken.load_image(b"not an image at all")
    with pytest.raises(FileNotFoundError):
        voken.load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError):
        voken.load_image(12345)


def test_pil_images_are_accepted(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(voken.load_image(Image.fromarray(rgb)), rgb)
    rgba = Image.fromarray(np.concatenate([rgb, np.zeros((16, 24, 1), np.uint8)], axis=2))
    np.testing.assert_array_equal(voken.load_image(rgba), rgb)


@pytest.fixture(scope="module")
def image_encoder(golden):
    cases = golden("vision")
    model = cases.model_dir()
    config = os.path.join(model, "config.json")
    encoder = voken.ImageEncoder.load(
        os.path.join(model, "eva_vit_g.pth"), os.path.join(model, "blip2_pretrained_flant5xxl.pth"),
        os.path.join(model, "prerained_minigpt4_7b.pth"), config=config if os.path.isfile(config) else None,
        dtype="float32")
    return cases, encoder


def test_image_encoder_matches_golden(image_encoder):
    cases, encoder = image_encoder
    assert (encoder.image_size, encoder.num_query_tokens, encoder.output_width) == (224, 32, 64)
    case = cases.cases["batch2"]
    got = encoder.encode(cases["batch2.image"])
    assert got.shape == (2, 32, 64)
    assert_close(got, cases["batch2.llama_proj"], case["atol"], case["rtol"], "batch2.llama_proj")
    stages = encoder.encode_all(cases["batch2.image"][:1])
    for stage in ("vit", "ln_vision", "qformer", "llama_proj"):
        assert_close(stages[stage], cases[f"batch2.{stage}"][:1], case["atol"], case["rtol"], stage)


def test_image_encoder_takes_images(image_encoder):
    _, encoder = image_encoder
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    pixels = encoder.preprocess(rgb, mode="playground")
    assert pixels.shape == (3, 224, 224)
    from_pixels = encoder.encode(pixels[None])
    from_image = encoder.encode([rgb, voken.encode_image(rgb)])  # an array and PNG bytes
    assert from_image.shape == (2, 32, 64)
    # Same pixels (batch 2 against batch 1: the products may round differently).
    np.testing.assert_allclose(from_image[0], from_pixels[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_image[1], from_pixels[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((1, 3, 100, 100), np.float32))
    with pytest.raises(ValueError):
        encoder.encode(rgb, mode="nearest")


# ---------------------------------------------------------------------------------------------
# VokenMapper


def test_voken_mapper_matches_golden(golden):
    cases = golden("mapper")
    mapper = voken.VokenMapper.load(pathlib.Path(cases.model_dir()) / "minigpt5_stage1.ckpt")
    assert (mapper.llm_dim, mapper.sd_dim, mapper.prompt_len, mapper.nhead) == (64, 32, 77, 8)
    case = cases.cases["batch2"]
    assert_close(mapper.map(cases["batch2.voken_hidden"]), cases["batch2.mapping_feature"], case["atol"],
                 case["rtol"], "batch2")
    case = cases.cases["cfg_negative"]
    negative = mapper.negative(batch=2)
    assert negative.shape == (2, 77, 32)
    for row in negative:
        assert_close(row[None], cases["cfg_negative.mapping_feature"], case["atol"], case["rtol"], "negative")
    outputs = mapper.forward(cases["single.voken_hidden"])
    case = cases.cases["single"]
    assert_close(outputs["fc_out"], cases["single.fc_out"], case["atol"], case["rtol"], "single.fc_out")
    with pytest.raises(ValueError):
        mapper.map(np.zeros((1, 8, 65), np.float32))


# ---------------------------------------------------------------------------------------------
# Diffusion: UNet, VAE, Scheduler, StableDiffusion, Generator


def test_unet_matches_golden(golden):
    cases = golden("unet")
    unet = voken.UNet.load(os.path.join(cases.model_dir(), "unet"))
    assert unet.context_dim == 32 and unet.in_channels == 4
    case = cases.cases["square_b2"]
    got = unet.forward(cases["square_b2.sample"], cases["square_b2.timestep"],
                       cases["square_b2.encoder_hidden_states"])
    assert_close(got, cases["square_b2.noise_pred"], case["atol"], case["rtol"], "square_b2")
    # A Python number as the timestep broadcasts over the batch.
    one = unet.forward(cases["square_b2.sample"][:1], int(cases["square_b2.timestep"][0]),
                       cases["square_b2.encoder_hidden_states"][:1])
    assert_close(one, cases["square_b2.noise_pred"][:1], case["atol"], case["rtol"], "square_b2[0]")
    with pytest.raises(ValueError):
        unet.forward(cases["square_b2.sample"], 10, np.zeros((2, 77, 31), np.float32))


def test_vae_matches_golden(golden):
    cases = golden("vae")
    vae = voken.VAE.load(os.path.join(cases.model_dir(), "vae"))
    case = cases.cases["decode_8x8"]
    latents = cases["decode_8x8.latents"]
    got = vae.decode(latents / vae.scaling_factor)
    assert_close(got, cases["decode_8x8.image"], case["atol"], case["rtol"], "decode_8x8")
    case = cases.cases["encode_64x64"]
    posterior = vae.encode(cases["encode_64x64.image"])
    assert_close(posterior.mean, cases["encode_64x64.mean"], case["atol"], case["rtol"], "mean")
    assert_close(posterior.logvar, cases["encode_64x64.logvar"], case["atol"], case["rtol"], "logvar")
    assert_close(posterior.sample(cases["encode_64x64.noise"]), cases["encode_64x64.sample"], case["atol"],
                 case["rtol"], "sample")


def test_scheduler_loop_matches_golden(golden):
    cases = golden("schedulers")
    name = "pndm_eps_10"
    case = cases.cases[name]
    params = case["params"]
    scheduler = voken.Scheduler.from_config(cases.path(params["scheduler_dir"]))
    assert scheduler.name == "PNDMScheduler"
    scheduler.set_timesteps(params["num_inference_steps"])
    np.testing.assert_array_equal(scheduler.timesteps, cases[f"{name}.timesteps"])
    x = cases[f"{name}.start"] * np.float32(scheduler.init_noise_sigma)
    latents = []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, i)
        out = (np.float32(0.1) * x_in + np.float32(math.sin(float(t) / 100))).astype(np.float32)
        x = scheduler.step(out, i, x)
        latents.append(x)
    tolerance = case["tolerances"][f"{name}.latents"]
    assert_close(np.stack(latents), cases[f"{name}.latents"], tolerance["atol"], tolerance["rtol"], name)
    # Another class from the same file, like diffusers' Other.from_config(config).
    ddim = voken.Scheduler.from_config(cases.path(params["scheduler_dir"]), name="ddim")
    assert ddim.name == "DDIMScheduler"
    with pytest.raises(ValueError):
        voken.Scheduler.from_config(cases.path(params["scheduler_dir"]), name="lms")
    with pytest.raises(FileNotFoundError):
        voken.Scheduler.from_config(cases.path("model", "no_such_scheduler"))


def test_stochastic_scheduler_takes_a_generator(golden):
    cases = golden("schedulers")
    scheduler = voken.Scheduler.from_config(cases.path("model", "euler_a_eps"))
    scheduler.set_timesteps(3)
    x = np.ones((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError):
        scheduler.step(x, 0, x)  # no generator, no noise
    a = scheduler.clone()
    a.set_timesteps(3)
    b = scheduler.clone()
    b.set_timesteps(3)
    step_a = a.step(x, 0, x, generator=voken.Generator(5))
    step_b = b.step(x, 0, x, noise=voken.Generator(5).randn(x.shape))
    np.testing.assert_array_equal(step_a, step_b)


def test_generator_matches_torch():
    torch = pytest.importorskip("torch")
    want = torch.randn((2, 3), generator=torch.Generator().manual_seed(42)).numpy()
    np.testing.assert_array_equal(voken.Generator(42).randn((2, 3)), want)


def test_stable_diffusion_matches_golden(golden):
    cases = golden("sd_loop")
    name = "pndm_5steps"
    case = cases.cases[name]
    params = case["params"]
    sd = voken.StableDiffusion.load(unet=cases.path(case["unet"]), vae=cases.path(case["vae"]),
                                    scheduler=cases.path(case["scheduler"]))
    steps_seen = []
    result = sd.generate(cases[f"{name}.prompt_embeds"], cases[f"{name}.negative_prompt_embeds"],
                         steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                         height=params["height"], width=params["width"],
                         initial_latents=cases[f"{name}.latents_init"],
                         progress=lambda step, total: steps_seen.append((step, total)), return_all=True)
    tolerance = case["tolerances"][f"{name}.image_uint8"]
    assert result["image_uint8"].dtype == np.uint8
    assert_close(result["image_uint8"], cases[f"{name}.image_uint8"], tolerance["atol"], 0, "image_uint8")
    tolerance = case["tolerances"][f"{name}.latents"]
    assert_close(result["latents"], cases[f"{name}.latents"], tolerance["atol"], tolerance["rtol"], "latents")
    assert steps_seen and steps_seen[-1][0] == steps_seen[-1][1]
    # The seed draws the latents the golden's generator drew.
    seeded = sd.generate(cases[f"{name}.prompt_embeds"], cases[f"{name}.negative_prompt_embeds"],
                         steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                         height=params["height"], width=params["width"], seed=params["latents_seed"])
    np.testing.assert_array_equal(seeded, result["image_uint8"])
    # Cancelling from the callback.
    with pytest.raises(voken.Cancelled):
        sd.generate(cases[f"{name}.prompt_embeds"], cases[f"{name}.negative_prompt_embeds"], steps=3,
                    height=64, width=64, progress=lambda step, total: False)

    class Stop(Exception):
        pass

    def raising(step, total):
        raise Stop()

    with pytest.raises(Stop):
        sd.generate(cases[f"{name}.prompt_embeds"], cases[f"{name}.negative_prompt_embeds"], steps=3,
                    height=64, width=64, progress=raising)
    with pytest.raises(ValueError):
        sd.generate(cases[f"{name}.prompt_embeds"], cases[f"{name}.negative_prompt_embeds"], steps=0,
                    height=64, width=64)


# ---------------------------------------------------------------------------------------------
# Argument conversion shared by every binding


def test_dtype_names(golden):
    cases = golden("mapper")
    path = os.path.join(cases.model_dir(), "minigpt5_stage1.ckpt")
    assert voken.VokenMapper.load(path, dtype="bfloat16").dtype == "bfloat16"
    assert voken.VokenMapper.load(path, dtype="float16").dtype == "bfloat16"  # as bundles do on CPU
    assert voken.VokenMapper.load(path, dtype=np.float32).dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        voken.VokenMapper.load(path, dtype="float8")
