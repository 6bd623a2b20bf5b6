"""Tests of voken's checkpoint I/O through the Python binding (voken.io).

Run with the build's package on the path:
    PYTHONPATH=<build dir>/python /usr/bin/python3 -m pytest -q tests/python

References are torch.load (for torch.save files; those tests skip when torch is missing) and a
small pure-numpy safetensors reader below. Every tensor comparison is bit-exact: dtype, shape
and the raw bytes (so NaN payloads and -0.0 count).

Golden files are read from $VOKEN_GOLDEN_DIR, default <repo>/../shared/golden.
"""

import argparse
import gc
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

# torch (when present) is imported before voken on purpose: both load libtorch, and importing
# voken on its own is checked separately, in a clean interpreter (test_import_without_torch),
# so that a failure there shows up as one clear test instead of taking the whole module down.
try:
    import torch
except ImportError:  # the torch-dependent tests skip; the rest still run
    torch = None

import voken

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURE_SCRIPT = os.path.join(REPO_ROOT, "tests", "fixtures", "make_torch_fixtures.py")
GOLDEN_DIR = os.path.normpath(
    os.environ.get("VOKEN_GOLDEN_DIR") or os.path.join(REPO_ROOT, "..", "shared", "golden"))

NO_TORCH = "torch is not importable in this interpreter (use Debian's /usr/bin/python3)"
requires_torch = pytest.mark.skipif(torch is None, reason=NO_TORCH)

# The torch.save files make_torch_fixtures.py writes (kind "ok"); test_manifest_matches checks
# this list against the manifest, so a fixture added there cannot silently go untested here.
TORCH_FIXTURES = [
    "plain.pth",
    "dtypes.pth",
    "views.pth",
    "lightning.ckpt",
    "bytes_and_misc.pth",
    "unsharded.pth",
    "sharded/pytorch_model-00001-of-00002.bin",
    "sharded/pytorch_model-00002-of-00002.bin",
]
# Paths that must load to the same state dict as unsharded.pth.
SHARDED_PATHS = [
    "sharded/pytorch_model.bin.index.json",
    "sharded",
    "sharded_st/model.safetensors.index.json",
    "sharded_st",
]


# ---------------------------------------------------------------------------------------------
# Helpers: a reference safetensors reader and bit-exact comparisons.

SAFETENSORS_NP = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path):
    """(dict name -> np.ndarray in data-offset order, metadata dict, dict name -> begin offset).

    BF16 is widened to float32 exactly (the 16 bits become the top half of an fp32), which is
    what voken returns for bf16 too.
    """
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    # sorted() is stable, so tensors at equal offsets (empty ones) keep the header's order.
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    tensors, begins = {}, {}
    for name, info in entries:
        begin, end = info["data_offsets"]
        raw = data[base + begin:base + end]
        assert len(raw) == end - begin, f"{path}: {name} runs past the end of the file"
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            dtype = np.dtype(SAFETENSORS_NP[info["dtype"]])
            array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
        tensors[name] = array.reshape(info["shape"])
        begins[name] = begin
    return tensors, metadata, begins


def torch_to_numpy(t):
    """The array voken should return for tensor `t` (bf16 widened to float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def assert_same_array(ours, ref, where):
    assert isinstance(ours, np.ndarray), f"{where}: got {type(ours).__name__}, not an ndarray"
    assert ours.dtype == ref.dtype, f"{where}: dtype {ours.dtype}, expected {ref.dtype}"
    assert ours.shape == ref.shape, f"{where}: shape {ours.shape}, expected {ref.shape}"
    ours_bytes = np.ascontiguousarray(ours).tobytes()
    ref_bytes = np.ascontiguousarray(ref).tobytes()
    if ours_bytes != ref_bytes:
        differ = np.flatnonzero(np.frombuffer(ours_bytes, np.uint8) != np.frombuffer(ref_bytes,
                                                                                    np.uint8))
        first = int(differ[0]) // max(ref.itemsize, 1)
        pytest.fail(f"{where}: values differ ({differ.size} bytes), first at flat index {first}: "
                    f"{ours.reshape(-1)[first]!r} vs expected {ref.reshape(-1)[first]!r}")


def float_bits(x):
    return struct.pack("<d", x)


def assert_same_tree(ours, ref, where="root"):
    """Walks torch.load's object tree `ref` and voken.io.load_torch's `ours` together."""
    # Order matters: torch.Size is a tuple, Parameter a Tensor, bool an int.
    if isinstance(ref, torch.Tensor):
        assert_same_array(ours, torch_to_numpy(ref), where)
    elif isinstance(ref, torch.Size):
        assert type(ours) is tuple and ours == tuple(ref), f"{where}: {ours!r} != {tuple(ref)!r}"
    elif isinstance(ref, torch.dtype):
        assert isinstance(ours, voken.io.PickledGlobal), f"{where}: got {type(ours).__name__}"
        assert ours.name == str(ref), f"{where}: global {ours.name!r}, expected {str(ref)!r}"
    elif isinstance(ref, torch.device):
        expected_args = (ref.type,) if ref.index is None else (ref.type, ref.index)
        assert isinstance(ours, voken.io.PickledObject), f"{where}: got {type(ours).__name__}"
        assert ours.cls == "torch.device", f"{where}: cls {ours.cls!r}"
        assert tuple(ours.args) == expected_args, f"{where}: args {ours.args!r}"
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(ours, voken.io.PickledObject), f"{where}: got {type(ours).__name__}"
        assert ours.cls == "argparse.Namespace", f"{where}: cls {ours.cls!r}"
        assert isinstance(ours.args, tuple) and ours.args == (), f"{where}: args {ours.args!r}"
        assert isinstance(ours.state, dict), f"{where}: state {ours.state!r}"
        assert_same_tree(ours.state, vars(ref), where + ".__dict__")
    elif isinstance(ref, dict):  # dict and OrderedDict
        assert isinstance(ours, dict), f"{where}: got {type(ours).__name__}, not a dict"
        assert list(ours.keys()) == list(ref.keys()), (
            f"{where}: keys (in order) {list(ours.keys())} != {list(ref.keys())}")
        for key, value in ref.items():
            assert_same_tree(ours[key], value, f"{where}/{key}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref), f"{where}: got {type(ours).__name__}, not {type(ref)}"
        assert len(ours) == len(ref), f"{where}: length {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same_tree(a, b, f"{where}/{i}")
    elif isinstance(ref, (set, frozenset)):
        assert isinstance(ours, (set, frozenset)), f"{where}: got {type(ours).__name__}"
        assert set(ours) == set(ref), f"{where}: {ours!r} != {ref!r}"
    elif isinstance(ref, bool) or ref is None:
        assert ours is ref, f"{where}: {ours!r} is not {ref!r}"
    elif isinstance(ref, int):
        assert type(ours) is int and ours == ref, f"{where}: {ours!r} != {ref!r}"
    elif isinstance(ref, float):
        assert type(ours) is float and float_bits(ours) == float_bits(ref), (
            f"{where}: {ours!r} != {ref!r}")
    elif isinstance(ref, (str, bytes)):
        assert type(ours) is type(ref) and ours == ref, f"{where}: {ours!r} != {ref!r}"
    else:
        pytest.fail(f"{where}: this test cannot compare a {type(ref).__module__}."
                    f"{type(ref).__qualname__}; extend assert_same_tree")


def reference_state_dict(obj, inner_key=""):
    """What load_state_dict should return, computed from torch.load's tree: the tensors of the
    root dict when it holds any, else of the first of state_dict/model/module that does (or of
    `inner_key`). None when there is no such dict."""
    def tensors_of(d):
        if not isinstance(d, dict):
            return {}
        return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}

    if inner_key:
        return tensors_of(obj.get(inner_key))
    if tensors_of(obj):
        return tensors_of(obj)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and tensors_of(obj.get(key)):
            return tensors_of(obj[key])
    return None


def assert_same_state_dict(ours, ref, where, ordered=True):
    """`ref`: dict name -> torch.Tensor or np.ndarray."""
    assert isinstance(ours, dict), f"{where}: got {type(ours).__name__}, not a dict"
    if ordered:
        assert list(ours) == list(ref), f"{where}: keys (in order) differ"
    else:
        assert sorted(ours) == sorted(ref), f"{where}: keys differ"
    for name, value in ref.items():
        if torch is not None and isinstance(value, torch.Tensor):
            value = torch_to_numpy(value)
        assert_same_array(ours[name], value, f"{where}[{name}]")


def assert_names_file(excinfo, path):
    message = str(excinfo.value)
    assert os.path.basename(str(path).rstrip("/")) in message, (
        f"the error does not name the file {path}: {message!r}")


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """The output of make_torch_fixtures.py, generated once per session."""
    if torch is None:
        pytest.skip(NO_TORCH)
    out = tmp_path_factory.mktemp("torch_fixtures")
    result = subprocess.run([sys.executable, FIXTURE_SCRIPT, str(out)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.fail(f"{FIXTURE_SCRIPT} failed ({result.returncode}):\n{result.stderr}")
    return out


@pytest.fixture(scope="session")
def manifest(fixtures_dir):
    with open(fixtures_dir / "manifest.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixture_module():
    """make_torch_fixtures.py imported as a module (for its safetensors writer and ramps)."""
    if torch is None:
        pytest.skip(NO_TORCH)
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# a. Version, build info, exception hierarchy.


def run_isolated(code, import_torch_first=True, unset_env=()):
    """Runs `code` in a fresh interpreter that imports the same voken; fails the calling test
    (naming the signal, if any) unless it exits 0. For cases that could crash the process.
    Like this module, the interpreter imports torch (when present) before running `code`.
    `unset_env`: environment variables the interpreter does not inherit."""
    if import_torch_first and torch is not None:
        code = "import torch\n" + code
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(voken.__file__)))
    env = dict(os.environ, PYTHONPATH=package_parent)
    for name in unset_env:
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        how = (f"was killed by signal {-result.returncode}" if result.returncode < 0
               else f"exited with {result.returncode}")
        # Keep what happened; drop the native backtrace frames libtorch prints.
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if not line.startswith("frame #")]
        output = "\n".join(lines[:40])
        pytest.fail(f"a fresh interpreter running the test code {how}:\n{output}")
    return result.stdout


def test_import_without_torch():
    # Most users import voken alone (it needs no Python torch); that must work in a fresh
    # interpreter whatever this process imported first.
    run_isolated("import sys, voken\n"
                 "assert 'torch' not in sys.modules, 'importing voken imported torch'\n"
                 "print(voken.__version__, sorted(voken.build_info()))\n",
                 import_torch_first=False)


def test_threads_default_to_one_per_core():
    # Debian's libtorch starts with one intra-op thread on some multi-core machines; importing
    # voken sets one per core unless OMP_NUM_THREADS says otherwise, set_num_threads changes it,
    # and a load keeps it unless given num_threads.
    run_isolated("import os, voken\n"
                 "threads = voken.build_info()['intra_op_threads']\n"
                 "assert threads == os.cpu_count(), (threads, os.cpu_count())\n"
                 "voken.set_num_threads(1)\n"
                 "assert voken.build_info()['intra_op_threads'] == 1\n"
                 "import tempfile\n"
                 "with tempfile.TemporaryDirectory() as directory:\n"
                 "    bundle = voken.write_random_bundle(directory, shape='tiny')\n"
                 "    voken.Pipeline.load(bundle, load_diffusion=False)\n"
                 "    assert voken.build_info()['intra_op_threads'] == 1, 'a load undid set_num_threads'\n"
                 "    voken.Pipeline.load(bundle, load_diffusion=False, num_threads=0)\n"
                 "    assert voken.build_info()['intra_op_threads'] == os.cpu_count()\n"
                 "try:\n"
                 "    voken.set_num_threads(-1)\n"
                 "    raise SystemExit('a negative thread count was accepted')\n"
                 "except ValueError as e:\n"
                 "    assert 'num_threads must be >= 0' in str(e), e\n",
                 import_torch_first=False, unset_env=("OMP_NUM_THREADS",))


def test_openblas_override_only_for_the_models_openblas_misdetects():
    # OpenBLAS 0.3.21's get_coretype(): Intel family 6 with an extended model >= 11, and Intel
    # families above 15, fall through to its Pentium 4 kernels; everything else it gets right.
    from voken import _openblas
    avx512_bf16 = {"avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
                   "avx512_bf16"}
    avx512 = avx512_bf16 - {"avx512_bf16"}
    avx2 = {"avx", "avx2", "fma"}
    cases = [
        (("GenuineIntel", 6, 207, avx512_bf16), "Cooperlake"),  # Emerald Rapids
        (("GenuineIntel", 6, 183, avx2), "Haswell"),  # Raptor Lake
        (("GenuineIntel", 6, 198, avx2), "Haswell"),  # Arrow Lake
        (("GenuineIntel", 19, 1, avx512), "SkylakeX"),  # a family OpenBLAS 0.3.21 does not know
        (("GenuineIntel", 6, 143, avx512_bf16), None),  # Sapphire Rapids: known to OpenBLAS
        (("GenuineIntel", 6, 85, avx512), None),  # Skylake-SP / Cascade Lake
        (("GenuineIntel", 6, 173, avx512_bf16), None),  # Granite Rapids: its feature fallback
        (("AuthenticAMD", 26, 2, avx512_bf16), None),  # Zen 5: its feature fallback (Cooperlake)
        (("AuthenticAMD", 25, 17, avx512_bf16), None),  # Zen 4
        (("GenuineIntel", 6, 207, {"sse2"}), None),  # nothing better to ask for
    ]
    for cpu, expected in cases:
        assert _openblas.coretype_override(cpu) == expected, (cpu[:3], expected)


def test_openblas_kernels_fit_the_cpu_after_import():
    # Importing voken leaves OpenBLAS with kernels for this CPU's instruction set: never the
    # Pentium 4 ones it picks for the models it misdetects.
    from voken import _openblas
    cpu = _openblas.read_cpuinfo()
    if cpu is None:
        pytest.skip("no x86 /proc/cpuinfo here")
    expected = _openblas.coretype_override(cpu)
    run_isolated("import ctypes, os, voken\n"
                 f"assert os.environ.get('OPENBLAS_CORETYPE') == {expected!r}, os.environ.get('OPENBLAS_CORETYPE')\n"
                 "try:\n"
                 "    blas = ctypes.CDLL('libopenblas.so.0')\n"
                 "except OSError:\n"
                 "    raise SystemExit(0)  # libtorch's BLAS is not OpenBLAS here\n"
                 "blas.openblas_get_corename.restype = ctypes.c_char_p\n"
                 "core = blas.openblas_get_corename().decode()\n"
                 "assert core.lower() not in ('prescott', 'northwood', 'katmai', 'banias'), core\n"
                 "assert core.lower() == voken.build_info()['blas_core'].lower(), core\n",
                 import_torch_first=False, unset_env=("OPENBLAS_CORETYPE",))


def test_version_and_build_info():
    assert isinstance(voken.__version__, str)
    parts = voken.__version__.split(".")
    assert len(parts) >= 3 and all(p.isdigit() for p in parts[:3]), voken.__version__

    info = voken.build_info()
    assert isinstance(info, dict)
    for key in ("voken_version", "torch_version", "cuda_enabled", "cuda_available",
                "intra_op_threads", "parallel_info"):
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
    assert info["voken_version"] == voken.__version__
    assert isinstance(info["torch_version"], str) and info["torch_version"][:1].isdigit()
    assert isinstance(info["cuda_enabled"], bool)
    assert isinstance(info["cuda_available"], bool)
    assert info["cuda_enabled"] or not info["cuda_available"]
    # The CPU and the kernel tier (core/cpu.h): named, and never above what the CPU offers.
    tiers = ["generic", "avx2", "avx512", "avx512_bf16", "amx"]
    assert info["cpu_tier"] in tiers and info["cpu_native_tier"] in tiers, info
    assert tiers.index(info["cpu_tier"]) <= tiers.index(info["cpu_native_tier"])
    assert info["cpu_model"], info
    assert info["run_threads"] >= 1
    assert isinstance(info["cpu_features"], list)
    assert isinstance(info["intra_op_threads"], int) and info["intra_op_threads"] >= 1
    assert isinstance(info["parallel_info"], str) and info["parallel_info"]


def test_exception_hierarchy():
    assert issubclass(voken.Error, RuntimeError)
    for cls in (voken.FormatError, voken.ConfigError, voken.WeightsError):
        assert issubclass(cls, voken.Error), cls
        assert issubclass(cls, ValueError), cls
    assert issubclass(voken.Cancelled, voken.Error)
    assert not issubclass(voken.Cancelled, ValueError)
    # Distinct classes: catching one must not catch the others.
    classes = [voken.FormatError, voken.ConfigError, voken.WeightsError, voken.Cancelled]
    for a in classes:
        for b in classes:
            assert a is b or not issubclass(a, b), (a, b)
    assert not issubclass(voken.Error, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# b. Fixtures: load_torch and load_state_dict against torch.load.


@requires_torch
def test_manifest_matches(fixtures_dir, manifest):
    torch_ok = [e["file"] for e in manifest["files"]
                if e["kind"] == "ok" and e["format"] == "torch"]
    assert torch_ok == TORCH_FIXTURES
    listed = {e["file"] for e in manifest["files"]}
    assert set(SHARDED_PATHS) <= listed
    for entry in manifest["files"]:
        assert (fixtures_dir / entry["file"]).exists(), entry["file"]


@requires_torch
@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_load_torch_matches_torch_load(fixtures_dir, name):
    path = str(fixtures_dir / name)
    assert_same_tree(voken.io.load_torch(path), torch.load(path), name)


@requires_torch
@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_load_state_dict_matches_torch_load(fixtures_dir, name):
    path = str(fixtures_dir / name)
    ref = reference_state_dict(torch.load(path))
    if ref is None:
        # Nothing in the file is a state dict (bytes_and_misc.pth): a clear error, not {}.
        with pytest.raises(voken.Error) as excinfo:
            voken.io.load_state_dict(path)
        assert_names_file(excinfo, path)
    else:
        assert_same_state_dict(voken.io.load_state_dict(path), ref, name)


@requires_torch
def test_load_state_dict_inner_key(fixtures_dir):
    path = str(fixtures_dir / "lightning.ckpt")
    ref = torch.load(path)
    ours = voken.io.load_state_dict(path, inner_key="state_dict")
    assert_same_state_dict(ours, ref["state_dict"], "lightning.ckpt[state_dict]")
    assert_same_state_dict(voken.io.load_state_dict(path), ref["state_dict"], "lightning.ckpt")
    # A missing inner key is a bad argument (ValueError; voken.WeightsError is one too).
    with pytest.raises(ValueError) as excinfo:
        voken.io.load_state_dict(path, inner_key="no_such_key")
    assert "no_such_key" in str(excinfo.value)


@requires_torch
def test_views_keep_their_values_and_shapes(fixtures_dir):
    # Spelled out on top of the generic comparison: these are the cases a reader gets wrong
    # (storage offsets, transposed/zero strides, shared storages).
    ours = voken.io.load_torch(str(fixtures_dir / "views.pth"))
    base = ours["base"]
    np.testing.assert_array_equal(ours["transposed"], base.T)
    np.testing.assert_array_equal(ours["sliced"], base[2:5, 1:7])
    np.testing.assert_array_equal(ours["strided"], base[:, ::2])
    np.testing.assert_array_equal(ours["expanded"], np.broadcast_to(base[1], (3, 8)))
    np.testing.assert_array_equal(ours["flat"], base.reshape(-1))
    np.testing.assert_array_equal(ours["param_row"], ours["param"][1])
    np.testing.assert_array_equal(ours["bf16_col"], ours["bf16_t"].T[:, 1])
    assert ours["bf16_t"].dtype == np.float32


@requires_torch
def test_expected_safetensors_matches_torch_load(fixtures_dir, manifest):
    """The fixture's expected.safetensors (what the C++ gtest compares against) holds exactly
    torch.load's values under the manifest's names, and voken reads it like numpy does."""
    expected, metadata, begins = read_safetensors(fixtures_dir / manifest["expected"])
    assert metadata.get("producer", "").endswith("make_torch_fixtures.py")
    seen = set()
    for entry in manifest["files"]:
        if entry["format"] != "torch" or entry["kind"] != "ok":
            continue
        tree = torch.load(fixtures_dir / entry["file"])
        for key_path, name in entry["tensors"]:
            node = follow_key_path(tree, key_path)
            assert_same_array(expected[name], torch_to_numpy(node), f"{entry['file']}:{key_path}")
            seen.add(name)
    assert seen == set(expected), set(expected) ^ seen

    path = str(fixtures_dir / manifest["expected"])
    ours = voken.io.load_state_dict(path)
    assert_same_state_dict(ours, expected, "expected.safetensors", ordered=False)
    assert_file_order(list(ours), begins, path)
    assert voken.io.safetensors_metadata(path) == metadata


def follow_key_path(tree, key_path):
    """The node at a manifest key path: dict keys and list indices joined by "/", int dict keys
    written in decimal."""
    node = tree
    for part in key_path.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:  # a list/tuple index or an int dict key
            node = node[int(part)]
    return node


def assert_file_order(keys, begins, where):
    """load_state_dict returns tensors in file (data offset) order; tensors at the same offset
    (empty ones) may come in either order."""
    offsets = [begins[k] for k in keys]
    assert offsets == sorted(offsets), f"{where}: keys not in file order: {keys}"


# ---------------------------------------------------------------------------------------------
# c. Sharded checkpoints and directories.


@requires_torch
@pytest.mark.parametrize("name", SHARDED_PATHS)
def test_sharded_equals_unsharded(fixtures_dir, name):
    unsharded = voken.io.load_state_dict(str(fixtures_dir / "unsharded.pth"))
    assert_same_state_dict(unsharded, torch.load(fixtures_dir / "unsharded.pth"), "unsharded.pth")
    ours = voken.io.load_state_dict(str(fixtures_dir / name))
    # An index's weight_map is sorted by name, not in file order: compare as sets.
    assert_same_state_dict(ours, unsharded, name, ordered=False)


@requires_torch
@pytest.mark.parametrize("name", ["sharded_st/model-00001-of-00002.safetensors",
                                  "sharded_st/model-00002-of-00002.safetensors"])
def test_safetensors_shard(fixtures_dir, name):
    path = str(fixtures_dir / name)
    ref, metadata, begins = read_safetensors(path)
    ours = voken.io.load_state_dict(path)
    assert_same_state_dict(ours, ref, name, ordered=False)
    assert_file_order(list(ours), begins, name)
    assert voken.io.safetensors_metadata(path) == metadata == {"format": "pt"}
    full = torch.load(fixtures_dir / "unsharded.pth")
    assert_same_state_dict(ours, {k: full[k] for k in ref}, name, ordered=False)


@requires_torch
def test_directory_prefers_safetensors(tmp_path, fixture_module):
    # Both formats present (as on the HF hub): the safetensors file wins.
    ramp = fixture_module.ramp
    torch.save({"w": ramp([2, 3], start=0)}, tmp_path / "pytorch_model.bin")
    fixture_module.write_safetensors(tmp_path / "model.safetensors",
                                     [("w", ramp([2, 3], start=100))])
    ours = voken.io.load_state_dict(str(tmp_path))
    assert_same_state_dict(ours, {"w": ramp([2, 3], start=100)}, "directory")


@requires_torch
def test_diffusers_directory(tmp_path, fixture_module):
    ramp = fixture_module.ramp
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    torch.save({"conv_in.weight": ramp([2, 1, 3, 3], torch.float16)},
               tmp_path / "unet" / "diffusion_pytorch_model.bin")
    fixture_module.write_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
                                     [("decoder.conv_out.bias", ramp([3], torch.bfloat16))])
    assert_same_state_dict(voken.io.load_state_dict(str(tmp_path / "unet")),
                           {"conv_in.weight": ramp([2, 1, 3, 3], torch.float16)}, "unet")
    assert_same_state_dict(voken.io.load_state_dict(str(tmp_path / "vae")),
                           {"decoder.conv_out.bias": ramp([3], torch.bfloat16)}, "vae")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((FileNotFoundError, voken.Error)) as excinfo:
        voken.io.load_state_dict(str(tmp_path))
    assert_names_file(excinfo, tmp_path)


def test_index_with_missing_shard(tmp_path):
    voken.io.save_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"),
                              {"a": np.ones(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 16},
        "weight_map": {"a": "model-00001-of-00002.safetensors",
                       "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises((FileNotFoundError, voken.Error)) as excinfo:
        voken.io.load_state_dict(str(tmp_path / "model.safetensors.index.json"))
    assert "model-00002-of-00002.safetensors" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# save_safetensors (no torch needed).


def sample_arrays():
    """One array of each dtype voken writes, plus 0-d, empty and non-contiguous ones."""
    base = (np.arange(24, dtype=np.float64) * 0.37 - 1).reshape(4, 6)
    return {
        "f32": base.astype(np.float32),
        "f16": base.astype(np.float16),
        "f64": base,
        "i64": np.array([2 ** 63 - 1, -2 ** 63, 0, -1], dtype=np.int64),
        "i32": np.array([[2 ** 31 - 1, -2 ** 31]], dtype=np.int32),
        "i16": np.array([32767, -32768, 3], dtype=np.int16),
        "i8": np.array([127, -128, 0], dtype=np.int8),
        "u8": np.arange(0, 256, 51, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "transposed": base.astype(np.float32).T,  # not C-contiguous
        "strided": base.astype(np.float32)[::2, ::3],
        "name with spaces/and.dots": np.array([1.5], dtype=np.float32),
    }


def test_save_safetensors_round_trip(tmp_path):
    arrays = sample_arrays()
    path = str(tmp_path / "round_trip.safetensors")
    metadata = {"format": "pt", "note": "h\u00e9llo"}
    voken.io.save_safetensors(path, arrays, metadata=metadata)

    ours = voken.io.load_state_dict(path)
    assert list(ours) == list(arrays), "tensors are written and read back in the given order"
    assert_same_state_dict(ours, arrays, "round_trip")
    assert voken.io.safetensors_metadata(path) == metadata

    # The bytes on disk follow the format (checked with the independent reader).
    ref, ref_metadata, _ = read_safetensors(path)
    assert ref_metadata == metadata
    assert_same_state_dict(ref, arrays, "round_trip (numpy reader)", ordered=False)


def test_save_safetensors_without_metadata(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    voken.io.save_safetensors(path, {"x": np.arange(3, dtype=np.int32)})
    assert voken.io.safetensors_metadata(path) == {}
    assert_same_state_dict(voken.io.load_state_dict(path), {"x": np.arange(3, dtype=np.int32)},
                           "plain")


def test_save_safetensors_metadata_none(tmp_path):
    # metadata=None is the documented default; passing it explicitly must work too.
    path = str(tmp_path / "none.safetensors")
    voken.io.save_safetensors(path, {"x": np.ones(2, dtype=np.float32)}, metadata=None)
    assert voken.io.safetensors_metadata(path) == {}


def test_save_safetensors_negative_strides(tmp_path):
    # Reversed views (arr[::-1]) are ordinary numpy arrays; their values must be written (or
    # the array refused with ValueError). Run in a fresh interpreter: a native crash here must
    # fail this test, not end the session.
    code = f"""
import numpy as np, voken
base = np.arange(12, dtype=np.float32).reshape(3, 4)
arrays = {{"flipped": base[::-1], "flipped_cols": base[:, ::-2]}}
path = {str(tmp_path / "flipped.safetensors")!r}
voken.io.save_safetensors(path, arrays)
loaded = voken.io.load_state_dict(path)
for name, array in arrays.items():
    assert loaded[name].shape == array.shape and (loaded[name] == array).all(), name
print("OK")
"""
    run_isolated(code)


def test_save_safetensors_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError):
        voken.io.save_safetensors(str(tmp_path / "bad.safetensors"),
                                  {"c": np.zeros(2, dtype=np.complex64)})


def test_arrays_outlive_the_file(tmp_path):
    # Tensors may view a mapping of the file: it must stay alive as long as the arrays do,
    # including after the loader's dict is gone and the file is unlinked.
    path = tmp_path / "lifetime.safetensors"
    values = np.arange(4096, dtype=np.float32) * 0.5
    voken.io.save_safetensors(str(path), {"a": values, "b": values[::-1].copy()})
    loaded = voken.io.load_state_dict(str(path))
    a = loaded["a"]
    del loaded
    gc.collect()
    os.remove(path)
    np.testing.assert_array_equal(a, values)


# ---------------------------------------------------------------------------------------------
# d. Golden files from the parity suite.


def golden_params(extensions):
    if not os.path.isdir(GOLDEN_DIR):
        return [pytest.param(None, id="no-golden-dir")]
    found = []
    for root, dirs, files in os.walk(GOLDEN_DIR):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(extensions):
                path = os.path.join(root, name)
                found.append(pytest.param(path, id=os.path.relpath(path, GOLDEN_DIR)))
    return found or [pytest.param(None, id="no-golden-files")]


def skip_without_golden(path):
    if path is None:
        pytest.skip(f"golden directory {GOLDEN_DIR} does not exist or holds no checkpoints; "
                    "set VOKEN_GOLDEN_DIR to the golden root")


@pytest.mark.parametrize("path", golden_params((".safetensors",)))
def test_golden_safetensors(path):
    skip_without_golden(path)
    ref, metadata, begins = read_safetensors(path)
    ours = voken.io.load_state_dict(path)
    assert_same_state_dict(ours, ref, path, ordered=False)
    assert_file_order(list(ours), begins, path)
    assert voken.io.safetensors_metadata(path) == metadata


@pytest.mark.parametrize("path", golden_params((".pth", ".ckpt")))
def test_golden_torch_file(path):
    skip_without_golden(path)
    if torch is None:
        pytest.skip(NO_TORCH)
    ref = torch.load(path, map_location="cpu")
    assert_same_tree(voken.io.load_torch(path), ref, os.path.basename(path))
    ref_state_dict = reference_state_dict(ref)
    assert ref_state_dict, f"{path}: the reference finds no state dict"
    assert_same_state_dict(voken.io.load_state_dict(path), ref_state_dict, path)


def golden_model_dirs():
    """Golden directories in HF/diffusers layout (they hold a weights file voken looks for)."""
    names = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
             "diffusion_pytorch_model.bin")
    if not os.path.isdir(GOLDEN_DIR):
        return [pytest.param(None, None, id="no-golden-dir")]
    found = []
    for root, dirs, files in os.walk(GOLDEN_DIR):
        dirs.sort()
        for name in names:
            if name in files:
                found.append(pytest.param(root, os.path.join(root, name),
                                          id=os.path.relpath(root, GOLDEN_DIR)))
                break
    return found or [pytest.param(None, None, id="no-golden-model-dirs")]


@pytest.mark.parametrize("directory,weights", golden_model_dirs())
def test_golden_model_directory(directory, weights):
    skip_without_golden(directory)
    ours = voken.io.load_state_dict(directory)
    assert_same_state_dict(ours, voken.io.load_state_dict(weights), directory)


# ---------------------------------------------------------------------------------------------
# e. Bad input.


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pth", "missing.ckpt",
                                  "missing_dir", "missing.index.json"])
@pytest.mark.parametrize("function", ["load_state_dict", "load_torch", "safetensors_metadata"])
def test_missing_file(tmp_path, name, function):
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError) as excinfo:
        getattr(voken.io, function)(path)
    assert_names_file(excinfo, path)


@requires_torch
@pytest.mark.parametrize("function", ["load_state_dict", "load_torch"])
def test_legacy_torch_file(fixtures_dir, function):
    path = str(fixtures_dir / "legacy.pth")
    with pytest.raises(voken.FormatError) as excinfo:
        getattr(voken.io, function)(path)
    assert "legacy" in str(excinfo.value).lower(), str(excinfo.value)
    assert_names_file(excinfo, path)


@pytest.fixture
def valid_safetensors(tmp_path):
    """(bytes of a valid safetensors file, its header length) written by voken itself."""
    path = tmp_path / "valid.safetensors"
    voken.io.save_safetensors(str(path), {"a": np.arange(64, dtype=np.float32),
                                          "b": np.arange(6, dtype=np.int64).reshape(2, 3)},
                              metadata={"k": "v"})
    data = path.read_bytes()
    voken.io.load_state_dict(str(path))  # the uncut file is fine
    return data, struct.unpack_from("<Q", data)[0]


@pytest.mark.parametrize("cut", ["empty", "in_length", "in_header", "header_only",
                                 "last_byte", "half_data"])
def test_truncated_safetensors(tmp_path, valid_safetensors, cut):
    data, header_len = valid_safetensors
    size = {"empty": 0, "in_length": 5, "in_header": 8 + header_len // 2,
            "header_only": 8 + header_len, "last_byte": len(data) - 1,
            "half_data": 8 + header_len + (len(data) - 8 - header_len) // 2}[cut]
    path = tmp_path / f"cut_{cut}.safetensors"
    path.write_bytes(data[:size])
    for function in (voken.io.load_state_dict, voken.io.safetensors_metadata):
        if function is voken.io.safetensors_metadata and cut in ("header_only", "last_byte",
                                                                  "half_data"):
            continue  # the header alone is intact; reading metadata need not look further
        with pytest.raises(voken.FormatError) as excinfo:
            function(str(path))
        assert_names_file(excinfo, path)


def make_safetensors_bytes(header, payload=b""):
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + payload


@pytest.mark.parametrize("case", ["huge_header_length", "bad_json", "not_an_object",
                                  "size_mismatch", "offsets_past_end", "unknown_dtype",
                                  "negative_shape"])
def test_corrupt_safetensors(tmp_path, case):
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    data = {
        "huge_header_length": struct.pack("<Q", 1 << 62) + b"{}      ",
        "bad_json": struct.pack("<Q", 8) + b"{\"a\":   ",
        "not_an_object": make_safetensors_bytes([1, 2, 3]),
        "size_mismatch": make_safetensors_bytes({"a": dict(ok, shape=[3])}, b"\0" * 8),
        "offsets_past_end": make_safetensors_bytes({"a": dict(ok, data_offsets=[8, 16])},
                                                   b"\0" * 8),
        "unknown_dtype": make_safetensors_bytes({"a": dict(ok, dtype="F8_E9M9")}, b"\0" * 8),
        "negative_shape": make_safetensors_bytes({"a": dict(ok, shape=[-2, -1])}, b"\0" * 8),
    }[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(voken.FormatError) as excinfo:
        voken.io.load_state_dict(str(path))
    assert_names_file(excinfo, path)


def write_torch_zip(path, pickle_bytes):
    """A zip laid out like torch.save's (records stored, not compressed)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("protocol", [2, 4])
def test_hand_built_zip_loads(tmp_path, protocol):
    # Positive control for the malicious-pickle tests: the same container with a harmless
    # pickle is accepted, so a refusal below is about the global, not the zip.
    obj = {"a": 1, "b": [1.5, "x", None], "c": (True, b"\x00\xff")}
    path = tmp_path / "benign.pth"
    write_torch_zip(path, pickle.dumps(obj, protocol=protocol))
    assert voken.io.load_torch(str(path)) == obj


class _Calls:
    """Pickles as a call of `function(*args)`, the way a malicious checkpoint runs code."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.call"])
def test_disallowed_global(tmp_path, protocol, attack):
    # The pickled names depend on the protocol: os.system is "posix system"; with protocol 2
    # Python writes Python 2 names, "__builtin__ eval" and "commands call" (its unpickler maps
    # them back to builtins/subprocess, so a deny-list must know them too).
    marker = tmp_path / "pwned"
    command = f"touch '{marker}'"
    payload, word = {
        "os.system": (_Calls(os.system, (command,)), "system"),
        "builtins.eval": (_Calls(eval, (f"__import__('os').system({command!r})",)), "eval"),
        "subprocess.call": (_Calls(subprocess.call, (["touch", str(marker)],)), "call"),
    }[attack]
    path = tmp_path / "evil.pth"
    write_torch_zip(path, pickle.dumps({"state_dict": {}, "payload": payload}, protocol=protocol))

    for function in (voken.io.load_torch, voken.io.load_state_dict):
        with pytest.raises(voken.FormatError) as excinfo:
            function(str(path))
        assert word in str(excinfo.value), str(excinfo.value)
        assert_names_file(excinfo, path)
    assert not marker.exists(), "loading the checkpoint ran the command in it"
