"""Shared fixtures: the seeded tiny backbone, a synthetic dataset, the awkward-image corpus and CLI runners.

Everything runs offline (``HF_HUB_OFFLINE=1`` for the whole session) and seeded, so two runs of the suite see
the same weights, images and predictions.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import Result
from helpers import TINY, make_corpus

SYNTHETIC_IMAGES = 24  # below the default batch size (32): one forward pass per CLI run


@pytest.fixture(scope="session", autouse=True)
def offline_hub() -> Iterator[None]:
    """No test may touch the network: the hub is offline for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The feature cache of ``train``/``calibrate`` (``$XDG_CACHE_HOME/numclip``) goes to a temp folder, not ~."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core CI box torch's
    spinning thread pool makes a batch-1 forward pass 100x slower (measured: 0.8 s instead of 5 ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped ``numclip-tiny`` architecture, randomly initialised with torch seed 0."""
    import torch

    from numclip_cli.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone(TINY, "none")


@pytest.fixture(scope="session")
def tiny_weights_off_init(tiny_backbone) -> dict:
    """``numclip-tiny`` weights that no seeded init reproduces (the tiny backbone's, moved by seeded noise): a test
    that loads them and compares with them fails if loading silently keeps an init."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return {key: (value + 0.05 * torch.randn(value.shape, generator=generator)).contiguous()
            if value.dtype.is_floating_point else value.contiguous()
            for key, value in tiny_backbone.model.state_dict().items()}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder-per-label "count the dots" dataset (seed 0) with its ``task.toml``; returns the folder."""
    from numclip_cli.synthetic import write_dataset

    task_file = write_dataset("dots", tmp_path_factory.mktemp("dots"), n=SYNTHETIC_IMAGES, seed=0)
    return task_file.parent


@pytest.fixture(scope="session")
def synthetic_images(synthetic_dir: Path) -> list[str]:
    """The dataset's image paths in the order ``predict DIR --recursive`` visits them (sorted, depth first)."""
    images = sorted(synthetic_dir.rglob("*.png"), key=lambda p: p.relative_to(synthetic_dir).parts)
    return [str(p) for p in images]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The awkward-file corpus of ``tests/helpers.py`` (see its ``EXPECTED`` for ok/error per name)."""
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def numclip_bin() -> Path:
    """The installed ``numclip`` console script of this interpreter's environment."""
    path = Path(sys.executable).parent / "numclip"
    assert path.is_file(), f"console script missing: {path}"
    return path


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., Result]:
    """Run the Typer app in-process with ``CliRunner``; stdout and stderr come back separately.

    The torch seed is set first so ``--pretrained none`` builds the same random weights on every call, and
    the process-wide state a command changes (environment, SIGTERM handler, root logger) is put back.
    """
    import torch
    from typer.testing import CliRunner

    from numclip_cli.cli.app import app

    def run(args: Sequence[object], input: str | bytes | None = None, seed: int = 0) -> Result:
        environ = dict(os.environ)
        handler = signal.getsignal(signal.SIGTERM)
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        torch.manual_seed(seed)
        try:
            return CliRunner().invoke(app, [str(a) for a in args], input=input)
        finally:
            os.environ.clear()
            os.environ.update(environ)
            signal.signal(signal.SIGTERM, handler)
            root.setLevel(level)
            root.handlers[:] = handlers

    return run


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a real ``numclip`` process: offline, an empty Hugging Face cache, no colours, 1 thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", NO_COLOR="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")  # see one_torch_thread
    return env


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """See ``subprocess_env``: one per test, with its own empty cache folder."""
    return subprocess_env(tmp_path)
