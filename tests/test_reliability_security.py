"""Checkpoints and weights never execute code: no unpickling anywhere in the package, hostile pickles refused.

The hostile file is a pickle whose unpickling opens (creates) a marker file; it is passed as ``--checkpoint`` and
as ``--pretrained`` in both torch's zip format and as a raw pickle. The marker must never appear, the run exits 1
with one line saying why, and tensors that do not fit the backbone are reported by name.
"""

from __future__ import annotations

import ast
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import one_error_line
from safetensors.torch import save_file

import numclip_cli

PACKAGE = Path(numclip_cli.__file__).parent
# Modules whose loaders run arbitrary code from the bytes they read.
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
# open_clip entry points that read weight files: each must be asked for weights_only=True.
OPEN_CLIP_LOADERS = {"create_model", "create_model_and_transforms", "create_model_from_pretrained",
                     "load_checkpoint", "load_state_dict"}


class Payload:
    """Unpickling this object opens (creates) ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, filename: str) -> Iterator[str]:
    """Every place in ``source`` that could unpickle: imports of unpicklers, torch/jit/numpy/open_clip loads."""
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in UNPICKLERS:
                    yield f"{where}: imports {module}"
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name.endswith("jit.load"):
            yield f"{where}: {name}() runs TorchScript"
        elif name in ("torch.load", "load") or name.endswith("serialization.load"):
            if not keyword_is(node, "weights_only", True):
                yield f"{where}: {name}() without weights_only=True"
        elif name.split(".")[-1] in OPEN_CLIP_LOADERS and name.startswith("open_clip"):
            if not keyword_is(node, "weights_only", True):
                yield f"{where}: {name}() without weights_only=True"
        elif name in ("np.load", "numpy.load") and keyword_is(node, "allow_pickle", True):
            yield f"{where}: {name}(allow_pickle=True)"


def test_the_package_never_unpickles() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package is scanned, not an empty folder
    problems = [p for f in files for p in unsafe_loads(f.read_text("utf-8"), str(f.relative_to(PACKAGE)))]
    assert problems == []
    # open_clip is the one door to weight files, and it is asked for weights_only
    assert "weights_only=True" in (PACKAGE / "backbone.py").read_text("utf-8")


@pytest.mark.parametrize("snippet, found", [
    ("import pickle", "imports pickle"),
    ("from dill import loads", "imports dill"),
    ("torch.load(f)", "without weights_only=True"),
    ("torch.load(f, weights_only=False)", "without weights_only=True"),
    ("torch.jit.load(f)", "runs TorchScript"),
    ("open_clip.create_model_and_transforms('ViT-B-16', pretrained=p)", "without weights_only=True"),
    ("np.load(f, allow_pickle=True)", "allow_pickle=True"),
])
def test_the_scan_finds_unsafe_loads(snippet: str, found: str) -> None:
    problems = list(unsafe_loads(snippet, "x.py"))
    assert len(problems) == 1 and found in problems[0]
    assert list(unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)", "x.py")) == []


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a torch zip (``.pt``), a raw pickle (``.bin``) and a raw pickle named ``.safetensors``."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    data = pickle.dumps({"state_dict": {"visual.proj": Payload(marker)}})
    pickle.loads(data)["state_dict"]["visual.proj"].close()  # the payload works: unpickling creates the marker
    assert marker.exists()
    marker.unlink()
    files = {"torch.pt": folder / "weights.pt", "raw.bin": folder / "weights.bin",
             "raw.safetensors": folder / "weights.safetensors"}
    torch.save({"state_dict": {"visual.proj": Payload(marker)}}, files["torch.pt"])
    files["raw.bin"].write_bytes(data)
    files["raw.safetensors"].write_bytes(data)
    assert not marker.exists()
    return files


@pytest.mark.parametrize("kind", ["torch.pt", "raw.bin", "raw.safetensors"])
@pytest.mark.parametrize("option", ["--checkpoint", "--pretrained"])
def test_hostile_pickle_never_runs(option: str, kind: str, hostile_files, marker: Path, synthetic_images,
                                   run_cli) -> None:
    path = hostile_files[kind]
    args = ["--checkpoint", path] if option == "--checkpoint" else ["--model", "numclip-tiny", "--pretrained", path,
                                                                      "--task", "age"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli(["predict", synthetic_images[0], *args])
    assert not marker.exists(), "unpickling ran the payload"
    assert not [w for w in caught if "torch" in w.filename], "torch's warnings reach the user's stderr"
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    error = one_error_line(result.stderr)
    assert str(path) in error
    if option == "--checkpoint":
        assert "not a readable safetensors checkpoint" in error
    elif kind != "raw.safetensors":  # a .safetensors name is read by safetensors, which just finds no header
        assert "refusing to load" in error and "unpickling" in error


def test_open_clips_fallback_load_stays_weights_only(monkeypatch, hostile_files, marker: Path, synthetic_images,
                                                     run_cli) -> None:
    """open_clip retries a torch.load that raised TypeError without ``weights_only``; with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 that retry would unpickle, so numclip forces weights-only loads."""
    real_load = torch.load
    calls: list[dict] = []

    def first_call_raises_type_error(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # what a file crafted to trip the weights-only unpickler would cause
            raise TypeError("crafted")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", first_call_raises_type_error)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    result = run_cli(["predict", synthetic_images[0], "--model", "numclip-tiny", "--pretrained",
                      hostile_files["torch.pt"], "--task", "age"])
    assert len(calls) == 2 and "weights_only" not in calls[1]  # the fallback ran, without the argument
    assert not marker.exists(), "the fallback load ran the payload"
    assert result.exit_code == 1 and "refusing to load" in one_error_line(result.stderr)


@pytest.fixture(scope="module")
def tiny_weights(tiny_backbone) -> dict[str, torch.Tensor]:
    return {key: value.contiguous() for key, value in tiny_backbone.model.state_dict().items()}


@pytest.mark.parametrize("change, words", [
    ("shape", ["'visual.proj'", "[3, 3]", "[128, 64]"]),
    ("missing", ["missing tensor(s) 'visual.proj'"]),
    ("text-width", ["'positional_embedding'", "[32, 32]", "numclip-tiny expects [32, 64]"]),
])
def test_weights_that_do_not_fit_are_named(change: str, words: list[str], tiny_weights, tmp_path: Path,
                                           synthetic_images, run_cli) -> None:
    weights = dict(tiny_weights)
    if change == "shape":
        weights["visual.proj"] = torch.zeros(3, 3)
    elif change == "missing":
        del weights["visual.proj"]
    else:  # another architecture: open_clip used to stop at "text pos_embed width changed!"
        from numclip_cli.backbone import inline_backbone

        narrow = inline_backbone("narrow", {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "width": 32}})
        weights = {key: value.contiguous() for key, value in narrow.model.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(weights, str(path))
    result = run_cli(["predict", synthetic_images[0], "--model", "numclip-tiny", "--pretrained", path, "--task", "age"])
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    for word in [str(path), *words]:
        assert word in error, (word, error)
    assert "demo" not in error  # a wrong file is not a missing-weights problem


def test_a_checkpoint_tensor_of_the_wrong_dtype_is_named(tiny_backbone, tmp_path: Path, synthetic_images,
                                                         run_cli) -> None:
    from numclip_cli.checkpoint import Checkpoint, model_tensors, write_checkpoint
    from numclip_cli.model.methods import create_model
    from numclip_cli.tasks import get_task

    model = create_model("numclip", tiny_backbone, get_task("age"))
    tensors = model_tensors(model, tiny_backbone, tuned_image=False)
    tensors["regressor.offset.weight"] = tensors["regressor.offset.weight"].to(torch.int32)
    path = tmp_path / "int.safetensors"
    write_checkpoint(path, Checkpoint(tensors=tensors, task=model.task, method="numclip",
                                      backbone=tiny_backbone.describe()))
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", path])
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert "'regressor.offset.weight'" in error and "torch.int32" in error and str(path) in error


# --- checkpoint metadata never becomes a path -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    """A valid checkpoint of the random-init tiny backbone (so it carries every backbone tensor)."""
    from numclip_cli.checkpoint import Checkpoint, model_tensors, write_checkpoint
    from numclip_cli.model.methods import create_model
    from numclip_cli.tasks import get_task

    model = create_model("numclip", tiny_backbone, get_task("age"))
    path = tmp_path_factory.mktemp("good") / "tiny.safetensors"
    write_checkpoint(path, Checkpoint(tensors=model_tensors(model, tiny_backbone, tuned_image=False),
                                      task=model.task, method="numclip", backbone=tiny_backbone.describe()))
    return path


def with_backbone(good: Path, dst: Path, **changes: object) -> Path:
    """A copy of ``good`` whose backbone metadata has ``changes`` (a value of None removes the key)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(good), framework="pt") as handle:
        meta = dict(handle.metadata())
    backbone = json.loads(meta["backbone"])
    for key, value in changes.items():
        if value is None:
            backbone.pop(key, None)
        else:
            backbone[key] = value
    meta["backbone"] = json.dumps(backbone)
    save_file(load_file(str(good)), str(dst), metadata=meta)
    return dst


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "numclip-tiny/../../x", "hf-hub:evil/x"])
def test_a_backbone_name_in_metadata_never_becomes_a_path(name: str, tiny_checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, synthetic_images,
                                                          run_cli) -> None:
    """open_clip reads architectures from files, so numclip used to write the checkpoint's config to
    ``tempdir/<name>.json``: a crafted name wrote attacker-chosen JSON anywhere, and a folder leaked per load."""
    import tempfile

    work, temp = tmp_path / "cwd" / "a" / "b", tmp_path / "tmp"
    work.mkdir(parents=True)
    temp.mkdir()
    name = str(tmp_path / "cwd" / "x") if name == "ABSOLUTE" else name
    crafted = with_backbone(tiny_checkpoint, tmp_path / "crafted.safetensors", name=name,
                            model_cfg={"embed_dim": 64, "vision_cfg": {}, "text_cfg": {"context_length": 32}})
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = tree(tmp_path)
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", crafted])
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert "backbone name" in error and str(crafted) in error
    assert tree(tmp_path) == before, "a file or folder appeared"
    assert list(temp.iterdir()) == []


def test_an_inline_config_builds_without_any_file(tiny_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, synthetic_images, run_cli) -> None:
    """An architecture unknown to open_clip, carried by the checkpoint as a config, is built in memory."""
    import json
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    crafted = with_backbone(tiny_checkpoint, tmp_path / "inline.safetensors", name="my-own-arch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = tree(tmp_path)
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", crafted, "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"
    assert tree(tmp_path) == before and list(temp.iterdir()) == []


@pytest.fixture(scope="module")
def real_weights_file(tmp_path_factory, tiny_weights) -> Path:
    """A valid weights file for numclip-tiny: metadata that names it must still not get it read."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(tiny_weights, str(path))
    return path


TINY_CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32,
                                            "patch_size": 8},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _with_text(**fields: object) -> dict:
    return {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], **fields}}


# backbone metadata -> words of the refusal
REFUSED_METADATA = {
    "hub-name": ({"name": "hf-hub:someone/their-repo", "pretrained": "none"}, "not an architecture name"),
    "local-dir-name": ({"name": "local-dir:/tmp", "pretrained": "none"}, "not an architecture name"),
    "hub-pretrained": ({"pretrained": "hf-hub:someone/their-repo"}, "may only name an open_clip pretrained tag"),
    "local-dir-pretrained": ({"pretrained": "local-dir:/tmp"}, "may only name an open_clip pretrained tag"),
    "absolute-pretrained": ({"pretrained": "/etc/passwd"}, "may only name an open_clip pretrained tag"),
    "relative-pretrained": ({"pretrained": "../weights.pt"}, "may only name an open_clip pretrained tag"),
    "file-name-pretrained": ({"pretrained": "weights.bin"}, "may only name an open_clip pretrained tag"),
    "existing-file-pretrained": ({"pretrained": "REAL_FILE"}, "may only name an open_clip pretrained tag"),
    "unknown-tag": ({"pretrained": "laion2b_s34b_b88k"}, "is not a pretrained tag of numclip-tiny"),
    "tag-of-unknown-arch": ({"name": "my-arch", "pretrained": "openai"}, "not an open_clip architecture"),
    "hf-text-tower": ({"name": "my-arch", "model_cfg": _with_text(hf_model_name="someone/bert")},
                      "hf_model_name names a model or tokenizer outside the checkpoint"),
    "hf-tokenizer": ({"name": "my-arch", "model_cfg": _with_text(hf_tokenizer_name="someone/tok")},
                     "hf_tokenizer_name names a model or tokenizer outside the checkpoint"),
    "tokenizer-file": ({"name": "my-arch", "model_cfg": _with_text(tokenizer_kwargs={"bpe_path": "/etc/passwd"})},
                       "tokenizer_kwargs names a model or tokenizer outside the checkpoint"),
    "timm-tower": ({"name": "my-arch", "model_cfg": {**TINY_CFG, "vision_cfg": {"timm_model_name": "resnet50"}}},
                   "timm_model_name names a model or tokenizer outside the checkpoint"),
    "no-config": ({"name": "my-arch", "model_cfg": None}, "lacks embed_dim"),
}


@pytest.mark.parametrize("kind", list(REFUSED_METADATA))
def test_checkpoint_metadata_only_names_tags_or_carried_weights(kind: str, tiny_checkpoint: Path, tmp_path: Path,
                                                                real_weights_file: Path, synthetic_images,
                                                                run_cli) -> None:
    """Metadata may resolve to an open_clip architecture + known tag, or to an architecture whose tensors the
    checkpoint carries; schemas, paths and external names are refused in one line before anything is read."""
    changes, words = REFUSED_METADATA[kind]
    if changes.get("pretrained") == "REAL_FILE":
        changes = {**changes, "pretrained": str(real_weights_file)}
    crafted = with_backbone(tiny_checkpoint, tmp_path / f"{kind}.safetensors", **changes)
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", crafted])
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert words in error and str(crafted) in error, error


def test_checkpoint_with_a_known_tag_goes_to_that_tag(tiny_checkpoint: Path, tmp_path: Path, synthetic_images,
                                                      run_cli) -> None:
    """The one thing metadata may make numclip fetch: an open_clip architecture's known pretrained weights."""
    crafted = with_backbone(tiny_checkpoint, tmp_path / "tagged.safetensors", name="ViT-B-16", pretrained="openai")
    result = run_cli(["predict", synthetic_images[0], "--checkpoint", crafted])
    assert result.exit_code == 1  # offline test session: the weights are not cached
    assert "ViT-B-16" in one_error_line(result.stderr) and "openai" in result.stderr


HUGE_DECLARATIONS = {
    # an open_clip architecture of 2.5 G values, declared as carried by a 10 MB file
    "known-architecture": ({"name": "ViT-bigG-14", "model_cfg": None}, "declares backbone 'ViT-bigG-14' (2539"),
    # within the size caps but ~80 G values
    "inline-within-caps": ({"name": "huge", "model_cfg": {
        "embed_dim": 8192, "vision_cfg": {"image_size": 224, "layers": 96, "width": 8192, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8192, "heads": 64, "layers": 96}}},
        "declares backbone 'huge' ("),
    "inline-over-caps": ({"name": "huger", "model_cfg": {
        "embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 100000, "width": 1 << 20, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}},
        "must be an integer from 0 to"),
}
# torch + open_clip + the tiny checkpoint: 0.85-0.95 GB alone, up to 1.7 GB seen inside the full suite on CI;
# the smallest declared model (ViT-bigG-14, 2.5 G values) would need 10 GB, so any build fails this bound
PEAK_RSS_MB = 2500

_RUN_UNDER_LIMIT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from typer.testing import CliRunner
from numclip_cli.cli.app import app
results = []
for path in sys.argv[2:]:
    result = CliRunner().invoke(app, ["predict", sys.argv[1], "--checkpoint", path])
    results.append({"exit": result.exit_code, "stderr": result.stderr})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"results": results, "peak_mb": peak}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch: ~15 s on a busy 2-core machine
def test_a_small_checkpoint_declaring_a_huge_backbone_is_refused_before_allocating(
        tiny_checkpoint: Path, tmp_path: Path, synthetic_images, clean_env) -> None:
    """The declared architecture is checked against the stored tensors (shapes only, on the meta device) and the
    size caps before anything is built: a fast one-line refusal under a 4 GB address-space limit."""
    import json
    import subprocess
    import sys

    crafted = [with_backbone(tiny_checkpoint, tmp_path / f"{kind}.safetensors", pretrained="none", **changes)
               for kind, (changes, _) in HUGE_DECLARATIONS.items()]
    env = {**clean_env, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", _RUN_UNDER_LIMIT, synthetic_images[0], *map(str, crafted)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for (kind, (_, words)), path, result in zip(HUGE_DECLARATIONS.items(), crafted, report["results"], strict=True):
        assert result["exit"] == 1, (kind, result["stderr"])
        error = one_error_line(result["stderr"])
        assert words in error and str(path) in error, (kind, error)
    assert report["peak_mb"] < PEAK_RSS_MB, report["peak_mb"]


def test_a_pickle_in_a_local_dir_bundle_is_named(hostile_files, marker: Path, tmp_path: Path, synthetic_images,
                                                 run_cli) -> None:
    """The refusal names the bundle and its weights file (it used to say "refusing to load openai")."""
    import json

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    (bundle / "open_clip_pytorch_model.bin").write_bytes(hostile_files["torch.pt"].read_bytes())
    result = run_cli(["predict", synthetic_images[0], "--model", f"local-dir:{bundle}", "--task", "age"])
    assert not marker.exists(), "unpickling ran the payload"
    assert result.exit_code == 1, result.stderr
    error = one_error_line(result.stderr)
    assert f"refusing to load local-dir:{bundle} (open_clip_pytorch_model.bin)" in error
    assert "openai" not in error


def _configs():
    """Small buildable CLIP configs, often with one field changed to something odd or external."""
    from hypothesis import strategies as st

    def assemble(embed, head_width, vision_k, patch, grid, vision_layers, heads, text_k, context, text_layers, change):
        cfg = {"embed_dim": embed,
               "vision_cfg": {"image_size": patch * grid, "patch_size": patch, "width": head_width * vision_k,
                              "head_width": head_width, "layers": vision_layers},
               "text_cfg": {"context_length": context, "vocab_size": 49408, "width": heads * 8 * text_k,
                            "heads": heads, "layers": text_layers}}
        if change:
            section, key, value = change
            (cfg if section is None else cfg[section])[key] = value
        return cfg

    odd = st.sampled_from([-1, 0, 3, 10**7, 1.5, float("nan"), "x", None, True, [4, 4], [1, 1, 1, 1], {}])
    keys = st.sampled_from([(None, "embed_dim"), (None, "quick_gelu"), (None, "init_logit_bias"),
                            (None, "multimodal_cfg"), (None, "custom_text"),
                            ("vision_cfg", "image_size"), ("vision_cfg", "patch_size"), ("vision_cfg", "width"),
                            ("vision_cfg", "layers"), ("vision_cfg", "mlp_ratio"), ("vision_cfg", "pool_type"),
                            ("vision_cfg", "timm_model_name"), ("text_cfg", "context_length"),
                            ("text_cfg", "vocab_size"), ("text_cfg", "heads"), ("text_cfg", "eos_id"),
                            ("text_cfg", "hf_tokenizer_name"), ("text_cfg", "tokenizer_kwargs")])
    change = st.one_of(st.none(), st.builds(lambda k, v: (*k, v), keys, odd))
    return st.builds(assemble, st.integers(1, 64), st.sampled_from([8, 16, 32]), st.integers(1, 4),
                     st.sampled_from([8, 16, 32]), st.integers(1, 8), st.integers(1, 3), st.integers(1, 4),
                     st.integers(1, 4), st.integers(1, 40), st.integers(1, 2), change)


def test_any_inline_config_is_refused_in_one_line_unless_carried() -> None:
    """Whatever a stranger's config says (odd sizes, types, external names), reading it against a file that carries
    no backbone tensor ends in a one-line CheckpointError: never another exception, never an allocation."""
    from hypothesis import HealthCheck, given, settings

    from numclip_cli.errors import CheckpointError
    from numclip_cli.factory import checkpoint_backbone

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_configs())
    def check(cfg: dict) -> None:
        with pytest.raises(CheckpointError) as info:
            checkpoint_backbone({"name": "fuzzed", "pretrained": "none", "model_cfg": cfg}, "f.safetensors",
                                stored={})
        assert "\n" not in str(info.value) and str(info.value).startswith("f.safetensors: ")

    check()
