"""A folder numclip cannot list never hides its images silently: ``predict`` writes one error record for it
(exit 3 when other inputs worked), and training data with such a folder is a data error naming it.

Permissions do not stop root, so the real-permission tests skip under root; the same logic is tested everywhere
by making ``os.scandir`` refuse the folder.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MODEL, assert_ok_record, jsonl

from numclip_cli.inputs import UnreadableFolder, expand_inputs, take_shard

ARGS = [*MODEL, "--faces", "none", "--workers", "0"]
AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders whatever their permissions; the "
                                                      "scandir-refusing variant of this test covers the logic")


@pytest.fixture
def photos(tmp_path: Path, synthetic_images: list[str]) -> Path:
    """photos/a.png, photos/locked/b.png, photos/z.png."""
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    shutil.copy(synthetic_images[0], root / "a.png")
    shutil.copy(synthetic_images[1], root / "locked" / "b.png")
    shutil.copy(synthetic_images[2], root / "z.png")
    return root


@pytest.fixture
def chmod_locked(photos: Path) -> Iterator[Path]:
    """The real thing: ``locked`` loses every permission (restored afterwards so tmp_path can be removed)."""
    (photos / "locked").chmod(0)
    yield photos / "locked"
    (photos / "locked").chmod(0o755)


def refuse_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.scandir`` raises PermissionError for ``folder``, as it does for a non-root user without permission."""
    real_scandir = os.scandir

    def scandir(path=".", *args, **kwargs):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture
def scandir_refuses(photos: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``locked`` cannot be listed (simulated)."""
    refuse_listing(monkeypatch, photos / "locked")
    return photos / "locked"


def check_predict_reports_the_folder(run_cli, photos: Path, locked: Path) -> None:
    result = run_cli(["predict", photos, "--recursive", *ARGS])
    assert result.exit_code == 3, result.stderr
    records = jsonl(result.stdout)
    # a folder's own images come before its sub-folders
    assert [r["path"] for r in records] == [str(photos / "a.png"), str(photos / "z.png"), str(locked)]
    assert records[2] == {"path": str(locked), "status": "error", "error": "cannot read folder: permission denied"}
    assert_ok_record(records[0])
    assert_ok_record(records[1])


@AS_ROOT
def test_unreadable_subfolder_is_an_error_record(run_cli, photos: Path, chmod_locked: Path) -> None:
    check_predict_reports_the_folder(run_cli, photos, chmod_locked)


def test_refused_subfolder_is_an_error_record(run_cli, photos: Path, scandir_refuses: Path) -> None:
    check_predict_reports_the_folder(run_cli, photos, scandir_refuses)


def test_unreadable_top_folder_is_an_error_record_too(run_cli, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_listing(monkeypatch, photos)
    result = run_cli(["predict", photos, *ARGS])
    assert result.exit_code == 1, result.stderr  # every input failed
    assert jsonl(result.stdout) == [{"path": str(photos), "status": "error",
                                     "error": "cannot read folder: permission denied"}]


def test_an_unreadable_folder_is_one_input_for_sharding(photos: Path, scandir_refuses: Path) -> None:
    paths = expand_inputs([str(photos)], recursive=True)
    assert paths == [str(photos / "a.png"), str(photos / "z.png"), str(scandir_refuses)]
    shard = take_shard(paths, 0, 2)
    assert shard == [str(photos / "a.png"), str(scandir_refuses)]
    assert isinstance(shard[1], UnreadableFolder) and shard[1].reason == "cannot read folder: permission denied"


def test_the_reason_survives_pickling_to_decode_workers() -> None:
    folder = pickle.loads(pickle.dumps(UnreadableFolder("/x/locked", "cannot read folder: permission denied")))
    assert isinstance(folder, UnreadableFolder) and folder == "/x/locked"
    assert folder.reason == "cannot read folder: permission denied"


def test_decode_workers_report_the_folder(run_cli, photos: Path, scandir_refuses: Path) -> None:
    result = run_cli(["predict", photos, "--recursive", *MODEL, "--faces", "none", "--workers", "2",
                      "--batch-size", "1"])
    assert result.exit_code == 3, result.stderr
    assert jsonl(result.stdout)[2]["error"] == "cannot read folder: permission denied"


def training_folder(photos: Path) -> Path:
    """photos/ rearranged as folder-per-label data: 1/a.png, 2/locked/b.png, 2/z.png."""
    (photos / "1").mkdir()
    (photos / "2").mkdir()
    shutil.move(photos / "a.png", photos / "1" / "a.png")
    shutil.move(photos / "z.png", photos / "2" / "z.png")
    shutil.move(photos / "locked", photos / "2" / "locked")
    return photos / "2" / "locked"


def test_training_data_with_an_unreadable_folder_is_a_data_error(photos: Path, synthetic_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from numclip_cli.datasets import load_samples
    from numclip_cli.errors import DataError
    from numclip_cli.tasks import get_task

    locked = training_folder(photos)
    refuse_listing(monkeypatch, locked)
    with pytest.raises(DataError, match=f"{locked}: cannot read folder: permission denied"):
        load_samples(photos, get_task(str(synthetic_dir / "task.toml")))


def test_an_unreadable_training_folder_is_named(photos: Path, synthetic_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from numclip_cli.datasets import load_samples
    from numclip_cli.errors import DataError
    from numclip_cli.tasks import get_task

    training_folder(photos)
    real_iterdir = Path.iterdir

    def iterdir(self: Path):
        if self == photos:
            raise PermissionError(13, "Permission denied", str(photos))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=f"^cannot read folder {photos}: Permission denied$"):
        load_samples(photos, get_task(str(synthetic_dir / "task.toml")))


# --- globs numclip expands itself (a quoted pattern) -------------------------------------------------------------

@pytest.mark.parametrize("recursive", [True, False])
def test_an_unreadable_folder_under_a_glob_is_an_input_too(photos: Path, scandir_refuses: Path,
                                                           recursive: bool) -> None:
    """glob.glob skips a folder it cannot list; numclip keeps it as an error record."""
    pattern = str(photos / "**" / "*.png") if recursive else str(photos / "*" / "*.png")
    paths = expand_inputs([pattern], recursive=recursive)
    expected = [str(photos / "a.png"), str(scandir_refuses), str(photos / "z.png")] if recursive \
        else [str(scandir_refuses)]
    assert paths == expected
    assert [isinstance(p, UnreadableFolder) for p in paths] == [p == str(scandir_refuses) for p in expected]


def test_predict_reports_a_folder_its_glob_could_not_list(run_cli, photos: Path, scandir_refuses: Path) -> None:
    result = run_cli(["predict", str(photos / "**" / "*.png"), "--recursive", *ARGS])
    assert result.exit_code == 3, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(photos / "a.png"), str(scandir_refuses), str(photos / "z.png")]
    assert records[1]["error"] == "cannot read folder: permission denied"


GLOB_PATTERNS = ["*.png", "*/*.png", "**/*.png", "**/*", "a/**/*.png", "a/*/*", "*/**/*.jpg", ".*/*.png", "a/.*/*",
                 "*", "a/b/*", "missing/*", "**/c/*.png", "a/[b]/*.jpg", "?.png"]


@pytest.mark.parametrize("recursive", [True, False])
@pytest.mark.parametrize("pattern", GLOB_PATTERNS)
def test_a_readable_tree_globs_as_the_standard_library_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             pattern: str, recursive: bool) -> None:
    import glob

    from numclip_cli.inputs import glob_inputs

    for name in ["1.png", "a/2.png", "a/b/3.jpg", "a/b/c/4.png", ".h/5.png", "a/.hh/6.png", "x/7.png", ".8.png",
                 "a/b/c/.9.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    monkeypatch.chdir(tmp_path)
    assert glob_inputs(pattern, recursive) == sorted(glob.glob(pattern, recursive=recursive))
    absolute = str(tmp_path / pattern)
    assert glob_inputs(absolute, recursive) == sorted(glob.glob(absolute, recursive=recursive))


def test_a_symlink_loop_under_a_recursive_glob_is_read_once(tmp_path: Path) -> None:
    from numclip_cli.inputs import glob_inputs

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "1.png").touch()
    (tmp_path / "a" / "b" / "2.png").touch()
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")  # glob.glob would descend until ELOOP
    assert glob_inputs(str(tmp_path / "a" / "**" / "*.png"), True) == [str(tmp_path / "a" / "1.png"),
                                                                       str(tmp_path / "a" / "b" / "2.png")]
