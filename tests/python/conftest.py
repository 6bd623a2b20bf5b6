"""Shared fixtures of the Python suite: golden folders and a tiny random-weight bundle."""

import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN_DIR = os.path.normpath(
    os.environ.get("VOKEN_GOLDEN_DIR") or os.path.join(REPO_ROOT, "..", "shared", "golden"))


class Golden:
    """One golden folder: cases.json, its tensors (numpy, read by voken.io) and paths in it."""

    def __init__(self, component):
        import voken

        self.dir = os.path.join(GOLDEN_DIR, component)
        with open(os.path.join(self.dir, "cases.json"), encoding="utf-8") as f:
            self.spec = json.load(f)
        self.tensors = voken.io.load_state_dict(os.path.join(self.dir, "cases.safetensors"))
        self.cases = {case["name"]: case for case in self.spec["cases"]}

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def model_dir(self):
        return self.path(self.spec.get("model_dir", "model"))

    def __getitem__(self, name):
        return self.tensors[name]


@pytest.fixture(scope="session")
def golden():
    """golden(component) -> Golden, or skips the test naming the missing folder."""
    cache = {}

    def open_component(component):
        if component not in cache:
            folder = os.path.join(GOLDEN_DIR, component)
            if not os.path.isfile(os.path.join(folder, "cases.json")):
                pytest.skip(f"golden folder {folder} is absent; set VOKEN_GOLDEN_DIR to the golden root")
            cache[component] = Golden(component)
        return cache[component]

    return open_component


def assert_close(got, want, atol, rtol=0.0, what=""):
    """|got - want| <= atol + rtol * |want| elementwise (the goldens' rule), with the worst
    element in the message."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    error = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    worst = float(error.max()) if error.size else 0.0
    assert np.all(error <= bound), f"{what}: max_abs_err={worst:.3g} exceeds atol={atol} rtol={rtol}"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The manifest path of a tiny random-weight bundle written once per session."""
    import voken

    return voken.write_random_bundle(tmp_path_factory.mktemp("tiny_bundle"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_bundle):
    """voken.Pipeline on the tiny random bundle, float32 (loaded once per session)."""
    import voken

    return voken.Pipeline.load(tiny_bundle, dtype="float32")
