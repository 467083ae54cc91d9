"""Backbones: device choice, the tiny config, local weight files, and clear errors for missing weights."""

from __future__ import annotations

import ast
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from numclip_cli.backbone import HOW_TO_PROVIDE_WEIGHTS, load_backbone
from numclip_cli.errors import UsageError, WeightsError
from numclip_cli.factory import resolve_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda_devices(monkeypatch):
    """Pretend this host has N CUDA devices (0: none) and no MPS, whatever it really has."""

    def pretend(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return pretend


@pytest.mark.parametrize("spec", ["auto", "cpu", " CPU ", "cpu:0"])
def test_resolve_device_cpu(spec: str, cuda_devices) -> None:
    cuda_devices(0)
    assert resolve_device(spec).type == "cpu"


def test_auto_picks_cuda_when_present(cuda_devices) -> None:
    cuda_devices(2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu").type == "cpu" and resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("spec", ["bad", "", "gpu", "cuda:abc", "cuda:-1", "meta", "xla"])
def test_resolve_device_rejects_unknown_devices(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_device(spec)
    assert "\n" not in str(info.value) and repr(spec.strip().lower()) in str(info.value)


@pytest.mark.parametrize(("count", "spec", "message"), [
    (0, "cuda", "CUDA is not available"), (0, "cuda:0", "CUDA is not available"), (2, "cuda:3", "only 2 CUDA"),
    (0, "mps", "MPS is not available")])
def test_resolve_device_unavailable_accelerators(count: int, spec: str, message: str, cuda_devices) -> None:
    cuda_devices(count)
    with pytest.raises(UsageError, match=message):
        resolve_device(spec)


def test_tiny_backbone(tiny_backbone) -> None:
    params = sum(p.numel() for p in tiny_backbone.model.parameters())
    assert 1_000_000 < params < 10_000_000  # a few million: CPU tests stay fast
    assert tiny_backbone.image_size == 64
    assert tiny_backbone.random_init and tiny_backbone.pretrained == "none"
    info = tiny_backbone.describe()
    assert info["name"] == "numclip-tiny" and info["model_cfg"]["embed_dim"] == 64
    assert tuple(info["preprocess_cfg"]["size"]) == (64, 64)
    assert not tiny_backbone.model.training
    tokens = tiny_backbone.tokenizer(["a photo of a dog"])
    assert tokens.shape == (1, info["model_cfg"]["text_cfg"]["context_length"])
    image = tiny_backbone.preprocess(Image.new("RGB", (100, 50), (10, 20, 30)))
    assert image.shape == (3, 64, 64)


def test_random_init_is_seeded() -> None:
    torch.manual_seed(0)
    first = load_backbone("numclip-tiny", "none").model.state_dict()
    torch.manual_seed(0)
    second = load_backbone("numclip-tiny", "none").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_backbone_from_local_weight_files(tmp_path: Path, tiny_backbone, tiny_weights_off_init) -> None:
    """Weights no init reproduces arrive exactly, from safetensors and from a torch file."""
    state = tiny_weights_off_init
    fresh = tiny_backbone.model.state_dict()
    assert not any(torch.equal(state[k], fresh[k]) for k in state if state[k].dtype.is_floating_point)
    st_file, pt_file = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file(state, str(st_file))
    torch.save(state, pt_file)
    for path in (st_file, pt_file):
        backbone = load_backbone("numclip-tiny", str(path))
        assert backbone.pretrained == str(path) and not backbone.random_init
        loaded = backbone.model.state_dict()
        assert set(loaded) == set(state)
        for key, value in state.items():
            assert torch.equal(loaded[key], value), f"{path.name}: {key} differs"


def test_pickled_objects_in_a_weight_file_are_refused(tmp_path: Path, tiny_backbone) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_backbone.model.state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(WeightsError, match="refusing to load"):
        load_backbone("numclip-tiny", str(path))


class _NotATensor:
    """Any class instance: unpickling it would run arbitrary code."""


def test_missing_weight_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("numclip-tiny", str(tmp_path / "nope.safetensors"))


def test_offline_missing_hub_weights_say_how_to_provide_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    empty = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads its cache folder once at import: point the already-imported module there too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
    with pytest.raises(WeightsError) as info:
        load_backbone("ViT-B-16", "openai")
    message = str(info.value)
    assert "\n" not in message and len(message) < 250  # it used to be 400 characters
    for words in ("no weights for ViT-B-16 / openai", "not cached, offline", "--pretrained FILE", "local-dir:DIR",
                  "docs/weights.md",
                  "try the dots demo: numclip predict IMAGE --checkpoint numclip-tiny-dots"):
        assert words in message, words
    assert HOW_TO_PROVIDE_WEIGHTS in message


@pytest.mark.parametrize(("name", "pretrained", "words"), [
    ("no-such-model", "none", "unknown model"),
    ("ViT-B-16", "no-such-tag", "unknown pretrained tag"),
    ("numclip-tiny", "openai", "unknown pretrained tag"),
])
def test_unknown_model_or_tag_is_a_usage_error(name: str, pretrained: str, words: str) -> None:
    with pytest.raises(UsageError) as info:
        load_backbone(name, pretrained)
    assert words in str(info.value) and "\n" not in str(info.value)


# --- the fail-fast reachability probe goes where huggingface_hub's downloads go ------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers HEAD with 200 and refuses CONNECT with 502; every request line is kept in ``server.seen``."""

    def do_HEAD(self) -> None:
        self.server.seen.append(f"HEAD {self.path}")
        self.send_response(200)
        self.end_headers()

    def do_CONNECT(self) -> None:
        self.server.seen.append(f"CONNECT {self.path}")
        self.send_response(502)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def probe(env: dict[str, str], **settings: str) -> str | None:
    """``hub_unreachable()`` in a fresh interpreter (huggingface_hub reads its endpoint and proxies at start)."""
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k != "HF_HUB_OFFLINE"}
    code = "from numclip_cli.backbone import hub_unreachable; print(repr(hub_unreachable(timeout=10)))"
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT), **settings},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip())


def test_the_probe_uses_the_endpoints_scheme_and_port(local_server, clean_env) -> None:
    """A mirror such as http://mirror:8080: the old probe opened a raw socket to port 443 of its host."""
    port = local_server.server_address[1]
    assert probe(clean_env, HF_ENDPOINT=f"http://127.0.0.1:{port}") is None
    assert local_server.seen == ["HEAD /"]


def test_the_probe_goes_through_the_http_proxy(local_server, clean_env) -> None:
    port = local_server.server_address[1]
    result = probe(clean_env, HF_ENDPOINT="http://mirror.invalid:8080", HTTP_PROXY=f"http://127.0.0.1:{port}")
    assert local_server.seen == ["HEAD http://mirror.invalid:8080/"] and result is None


def test_the_probe_goes_through_the_https_proxy(local_server, clean_env) -> None:
    port = local_server.server_address[1]
    result = probe(clean_env, HF_ENDPOINT="https://hub.invalid", HTTPS_PROXY=f"http://127.0.0.1:{port}")
    assert local_server.seen == ["CONNECT hub.invalid:443"]  # the proxy saw it, and refused: so is the hub
    assert result is not None and "https://hub.invalid unreachable" in result


def test_the_probe_says_which_endpoint_is_unreachable(clean_env) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = probe(clean_env, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result is not None and f"http://127.0.0.1:{port} unreachable" in result
