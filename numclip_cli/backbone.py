"""open_clip backbones: architecture names + pretrained tags, local weight files, ``local-dir:`` and
``hf-hub:`` bundles, inline configs carried by checkpoints, the shipped ``numclip-tiny`` config, and the
fail-fast check for weights that are neither cached nor reachable.

Weights are only ever read with ``weights_only=True`` (torch files) or from safetensors; nothing is unpickled.
Which of these a checkpoint's metadata may ask for is decided in numclip_cli.factory (see docs/weights.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from numclip_cli.errors import UsageError, WeightsError, one_line
from numclip_cli.textfiles import not_regular

TINY_MODEL = "numclip-tiny"
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
NO_WEIGHTS = "none"
NOT_FOUND = "not found"
STORED_WEIGHTS = "stored"  # in checkpoint metadata: the checkpoint carries the backbone's trained weights
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DEFAULT_CONTEXT_LENGTH = 77  # open_clip's, for an inline text config that does not say
HUB_PROBE_TIMEOUT = 5.0  # seconds: fail fast instead of minutes of download retries

# the pointer every missing-weights error ends with: the demo that needs none, and where real weights go
HOW_TO_PROVIDE_WEIGHTS = ("try the dots demo: numclip predict IMAGE --checkpoint numclip-tiny-dots; real weights: "
                          "--pretrained FILE or --model local-dir:DIR (see `numclip predict --help`, docs/weights.md)")


def register_model_configs() -> None:
    """Make the shipped architectures (``numclip-tiny``) known to open_clip."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(Path(str(resources.files("numclip_cli") / "model_configs")))


def is_known_model(name: str) -> bool:
    """Whether ``name`` is an architecture this open_clip install (plus numclip's own configs) knows by name."""
    import open_clip

    register_model_configs()
    return name in open_clip.list_models()


@dataclass
class Backbone:
    """A loaded open_clip model with its preprocessing and tokenizer, and where it came from."""

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str
    model_cfg: dict[str, Any] = field(default_factory=dict)
    tagged: bool = False  # weights from an open_clip pretrained tag: a checkpoint can name them instead of storing

    @property
    def stored_in_checkpoint(self) -> bool:
        """Whether a checkpoint must carry every backbone tensor (random init, a weights file or a bundle): its
        metadata may only name open_clip architectures and pretrained tags, never files or hub repositories."""
        return not self.tagged

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing settings (size, mean, std, interpolation, resize mode)."""
        return dict(self.model.visual.preprocess_cfg)

    @property
    def image_size(self) -> int:
        """Square input size of the image tower."""
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def random_init(self) -> bool:
        """True when no pretrained weights were loaded (so a checkpoint must carry the whole backbone)."""
        return self.pretrained == NO_WEIGHTS

    def describe(self) -> dict[str, Any]:
        """Metadata stored in checkpoints: an architecture name and a pretrained tag, or (when the checkpoint
        carries the whole backbone) a name for messages, ``none``/``stored`` and the architecture's config."""
        pretrained = self.pretrained if self.tagged else NO_WEIGHTS if self.random_init else STORED_WEIGHTS
        return {
            "name": architecture_label(self.name),
            "pretrained": pretrained,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": self.preprocess_cfg,
        }


def architecture_label(name: str) -> str:
    """A name for metadata and messages that is never a path or a schema: ``hf-hub:org/repo`` → ``org-repo``,
    ``local-dir:/models/my-clip`` → ``my-clip``."""
    if name.startswith(LOCAL_DIR_PREFIX):
        name = Path(name[len(LOCAL_DIR_PREFIX):]).resolve().name
    elif name.startswith(HF_HUB_PREFIX):
        name = name[len(HF_HUB_PREFIX):]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-._+")[:128] or "custom"


def not_a_regular_file(path: str | Path) -> str | None:
    """What ``path`` is when it is not a regular file ("not found", "a directory, not a regular file" …),
    from ``stat`` alone: opening a FIFO would block and a device can stream forever. None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return NOT_FOUND
    except OSError as exc:
        return f"not readable ({exc.strerror})"
    return not_regular(mode)


def _is_weight_file(pretrained: str) -> bool:
    return pretrained.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.sep in pretrained or pretrained.startswith(".")


def load_backbone(
    name: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    device: Any = "cpu",
    init_seed: int = 0,
) -> Backbone:
    """Build the open_clip model the user names: an architecture with a pretrained tag, a weights file or
    ``none``, or a ``hf-hub:``/``local-dir:`` bundle.

    Random initialisation (``pretrained="none"``, or parts a weights file does not cover) is seeded with
    ``init_seed`` without disturbing the caller's random state, so the same command builds the same model.
    """
    import open_clip

    register_model_configs()
    schema = name.split(":", 1)[0] + ":" if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) else None
    if schema is None and name not in open_clip.list_models():
        raise UsageError(f"unknown model {name!r}: use an open_clip name (e.g. {DEFAULT_MODEL}), "
                         f"{TINY_MODEL}, {HF_HUB_PREFIX}ORG/REPO or {LOCAL_DIR_PREFIX}DIR")
    tag: str | None = None if (schema or pretrained.lower() == NO_WEIGHTS) else pretrained
    problem = not_a_regular_file(tag) if tag and _is_weight_file(tag) else None
    if problem:
        raise WeightsError(f"weights file not found: {tag}" if problem == NOT_FOUND else
                           f"weights file {tag} is {problem}")
    if tag and not _is_weight_file(tag):
        known = open_clip.list_pretrained_tags_by_model(name)
        if tag not in known:
            raise UsageError(f"unknown pretrained tag {tag!r} for {name}: known tags {known}, "
                             f"a weights file, or 'none'")
        _check_hub_weights(name, tag)
    weights_file = tag if tag and _is_weight_file(tag) else None
    model, preprocess = _create(name, _weights_label(name, tag), init_seed, model_name=name,
                                pretrained=None if weights_file else tag, device=device)
    if weights_file:
        _load_weights_file(model, name, weights_file)
    cfg = open_clip.get_model_config(name) or {}
    label = NO_WEIGHTS if tag is None and schema is None else (tag or "bundle")
    return Backbone(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), name=name,
                    pretrained=label, model_cfg=cfg, tagged=bool(tag) and not _is_weight_file(tag))


def inline_backbone(label: str, model_cfg: dict[str, Any], device: Any = "cpu", init_seed: int = 0) -> Backbone:
    """Build a randomly initialised architecture from a config dict (one a checkpoint carries), without any file.

    open_clip only knows architectures by name, so the config is applied as overrides on top of a known plain
    CLIP config (``numclip-tiny``): every architecture field is replaced, nothing is read or written, and
    ``label`` is only a name for messages and metadata. Inline configs use CLIP's own tokenizer.
    """

    register_model_configs()
    overrides = {key: value for key, value in model_cfg.items() if key != "custom_text"}
    model, preprocess = _create(label, NO_WEIGHTS, init_seed, model_name=TINY_MODEL, pretrained=None, device=device,
                                force_custom_text=bool(model_cfg.get("custom_text", False)), **overrides)
    tokenizer = _clip_tokenizer(model_cfg["text_cfg"].get("context_length", DEFAULT_CONTEXT_LENGTH))
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, name=label, pretrained=NO_WEIGHTS,
                    model_cfg=dict(model_cfg))


@functools.lru_cache(maxsize=4)
def _clip_tokenizer(context_length: int) -> Any:
    """CLIP's own tokenizer (reading its vocabulary takes a moment: the shape check builds a model first)."""
    import open_clip

    return open_clip.get_tokenizer(TINY_MODEL, context_length=context_length)


def _weights_label(name: str, tag: str | None) -> str:
    """Where the weights come from, for messages: the file, the bundle's weights file, or name / tag."""
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):])
        files = sorted(p.name for p in folder.glob("*") if p.suffix in WEIGHT_FILE_SUFFIXES) if folder.is_dir() else []
        return f"{name} ({files[0]})" if len(files) == 1 else name
    if name.startswith(HF_HUB_PREFIX) or (tag and _is_weight_file(tag)):
        return name if not tag else tag
    return f"{name} / {tag or NO_WEIGHTS}"


def _create(label: str, source: str, init_seed: int, **kwargs: Any) -> tuple[Any, Any]:
    """open_clip's ``create_model_and_transforms`` with seeded init and weights-only loads; model in eval mode.

    ``device="meta"`` builds the architecture without allocating its tensors (to check shapes first)."""
    import open_clip
    import torch

    # on the meta device (shapes only, no memory): every tensor is created there, not just moved
    shapes_only = contextlib.nullcontext() if str(kwargs.get("device")) != "meta" else torch.device("meta")
    try:
        with _weights_only_loads(), torch.random.fork_rng(devices=[]), shapes_only:
            torch.manual_seed(init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(weights_only=True, **kwargs)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/FileNotFoundError/UnpicklingError
        raise _weights_error(label, source, exc) from exc
    return model.eval(), preprocess


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` meanwhile use ``weights_only=True``, whatever the caller passes, and quietly.

    open_clip retries a ``torch.load`` that raised TypeError without ``weights_only``; torch then defaults to True,
    unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set, which would let a crafted file run code. The environment
    is put back afterwards. torch's warnings about odd files it refuses are noise next to our one-line error.
    """
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _check_hub_weights(name: str, tag: str) -> None:
    """Fail fast (instead of minutes of retries) when tagged weights are neither cached nor reachable."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return  # a plain URL download: let open_clip try it
    repo, filename = hub.rstrip("/"), ""
    if not hub.endswith("/"):
        repo, filename = os.path.split(hub)
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in candidates):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsError(f"no weights for {name} / {tag} (not cached, offline); {HOW_TO_PROVIDE_WEIGHTS}")
    unreachable = hub_unreachable()
    if unreachable:
        raise WeightsError(f"no weights for {name} / {tag} (not cached, {unreachable}); {HOW_TO_PROVIDE_WEIGHTS}")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the Hugging Face endpoint cannot be reached, or None when it answers.

    The probe is a HEAD request through huggingface_hub's own HTTP client, so it goes where downloads would:
    ``HF_ENDPOINT`` with its scheme and port, through ``HTTPS_PROXY``/``HTTP_PROXY`` (minus ``NO_PROXY``). Any
    answer below 500 means reachable; a 5xx is typically a proxy that cannot reach the endpoint either.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        status = get_session().head(constants.ENDPOINT, timeout=timeout).status_code
    except Exception as exc:  # the client's connect, proxy and timeout errors
        return f"{constants.ENDPOINT} unreachable: {type(exc).__name__}"
    return f"{constants.ENDPOINT} answered HTTP {status}" if status >= 500 else None


def _load_weights_file(model: Any, name: str, path: str) -> None:
    """Load a local weights file into ``model`` the way open_clip does (it converts known third-party layouts);
    a file that does not fit names its first tensor that differs, with both shapes."""
    import open_clip

    try:
        with _weights_only_loads():
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as exc:  # open_clip asserts, torch raises RuntimeError, unpickling raises its own errors
        mismatch = None if _refused_unpickling(exc) else _mismatch(model, name, path)
        raise _weights_error(name, path, exc, mismatch) from exc


def _mismatch(model: Any, name: str, path: str) -> str | None:
    """The first way the tensors in ``path`` do not fit ``model`` (None: they fit, or the file is unreadable)."""
    import open_clip.factory

    try:
        with _weights_only_loads():
            state = open_clip.factory.load_state_dict(path, weights_only=True)
    except Exception:  # unreadable: the loading error itself says why
        return None
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    for key, shape in expected.items():  # in the model's order: the first layer that differs
        if key in state and list(state[key].shape) != shape:
            return f"tensor {key!r} has shape {list(state[key].shape)}, {name} expects {shape}"
    for kind, keys in (("missing", [k for k in expected if k not in state]),
                       ("unexpected", [k for k in state if k not in expected])):
        if keys:
            listed = ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            return f"{kind} tensor(s) {listed}"
    return None


def _refused_unpickling(exc: Exception) -> bool:
    """Whether torch's weights-only loader refused a file that needs unpickling."""
    text = str(exc)
    return "weights_only" in text or "Unpickl" in type(exc).__name__ or "pickle" in text.lower()


def _weights_error(name: str, pretrained: str, exc: Exception, mismatch: str | None = None) -> WeightsError:
    """Turn open_clip's loading failures into one actionable line."""
    text = one_line(exc, limit=None)
    if _refused_unpickling(exc):
        return WeightsError(f"refusing to load {pretrained}: it is not a plain tensor file "
                            f"(unpickling arbitrary objects is disabled for safety)")
    if mismatch:
        return WeightsError(f"{pretrained} does not fit {name}: {mismatch} (weights of another architecture? "
                            f"check --model)")
    # torch's load_state_dict message names every mismatch; the first one, by name, is what the user needs
    shape = re.search(r"size mismatch for (\S+): copying a param with shape torch\.Size\((.*?)\) from checkpoint, "
                      r"the shape in current model is torch\.Size\((.*?)\)", text)
    if shape:
        key, got, want = shape.groups()
        return WeightsError(f"{pretrained}: tensor {key!r} has shape {got}, {name} expects {want} "
                            f"(weights of another architecture? check --model)")
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]*\"(?:, )?){1,3})", text)
    if keys:
        kind, names = keys.groups()
        return WeightsError(f"{pretrained} does not fit {name}: {kind.lower()} tensor(s) {names.rstrip(', ')} "
                            f"(weights of another architecture? check --model)")
    if len(text) > 160:
        text = text[:160] + "…"
    offline = " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return WeightsError(f"cannot load weights {pretrained}{offline}: {text}. "
                        f"{HOW_TO_PROVIDE_WEIGHTS}")
