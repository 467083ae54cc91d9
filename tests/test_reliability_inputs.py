"""Hostile inputs through the CLI: odd file names, symlink loops, files that change under the run, decompression
bombs, and fuzzed task specs and data lists. One record per input, never a traceback, never a hang."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from helpers import MODEL, assert_ok_record, jsonl, one_error_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from numclip_cli.images import FORMATS

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
ODD_NAMES = ["with space.png", "ünïcödé 图片.png", "-x.png", "--looks-like-an-option.png", "tab\there.png"]


def records_by_name(stdout: str) -> dict[str, dict]:
    records = jsonl(stdout)
    names = [Path(r["path"]).name for r in records]
    assert len(names) == len(set(names)), names  # one record per input, never more
    return dict(zip(names, records, strict=True))


# --- names -------------------------------------------------------------------------------------------------

@pytest.fixture
def odd_folder(tmp_path: Path, synthetic_images: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copies of one image under names with spaces, unicode, leading dashes, a tab and a newline; cwd is there."""
    for name in [*ODD_NAMES, "new\nline.png"]:
        shutil.copy(synthetic_images[0], tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_odd_names_after_double_dash(run_cli, odd_folder: Path) -> None:
    result = run_cli(["predict", *MODEL, "--workers", "0", "--", *ODD_NAMES])
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == ODD_NAMES
    for record in records:
        assert_ok_record(record)


@pytest.mark.parametrize("null", [False, True])
def test_odd_names_on_stdin(run_cli, odd_folder: Path, null: bool) -> None:
    names = [*ODD_NAMES, "new\nline.png"] if null else ODD_NAMES  # only NUL separation can carry a newline
    separator = "\0" if null else "\n"
    result = run_cli(["predict", "-", *MODEL, "--workers", "0", *(["--null"] if null else [])],
                     input=separator.join(names) + separator)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == names
    for record in records:
        assert_ok_record(record)


# --- directories -------------------------------------------------------------------------------------------

def test_scan_survives_symlink_loops_directories_named_like_images_and_broken_links(
        run_cli, tmp_path: Path, synthetic_images: list[str]) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "x.jpg").mkdir()  # a directory with an image name: an error record, not descended into
    shutil.copy(synthetic_images[0], root / "x.jpg" / "inside.png")
    shutil.copy(synthetic_images[0], root / "a.png")
    shutil.copy(synthetic_images[1], root / "sub" / "b.png")
    os.symlink("..", root / "sub" / "up")  # sub/up/sub/up/... is a loop
    os.symlink(".", root / "self")
    os.symlink(".", root / "loop.jpg")  # an image-named link to a directory
    os.symlink("missing.png", root / "gone.png")  # a broken link
    result = run_cli(["predict", root, "--recursive", *MODEL, "--workers", "0"])
    assert result.exit_code == 3, result.stderr
    by_name = records_by_name(result.stdout)
    assert set(by_name) == {"a.png", "b.png", "x.jpg", "loop.jpg", "gone.png"}
    assert by_name["a.png"]["status"] == by_name["b.png"]["status"] == "ok"
    assert by_name["x.jpg"]["error"] == by_name["loop.jpg"]["error"] == "is a directory"
    assert by_name["gone.png"]["error"] == "no such file"
    assert "Traceback" not in result.stderr


def test_files_that_change_between_listing_and_reading(run_cli, tmp_path: Path, synthetic_images: list[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing is taken, then files vanish, turn into directories or FIFOs, shrink or change content."""
    import numclip_cli.inputs

    folder = tmp_path / "changing"
    folder.mkdir()
    want = {"vanished.png": "no such file", "now_dir.png": "is a directory", "now_fifo.png": "not a regular file",
            "emptied.png": "empty file", "truncated.png": "truncated or corrupt image data",
            "now_text.png": f"not a recognised image format (numclip reads {', '.join(FORMATS)})",
            "replaced.png": "ok", "kept.png": "ok"}
    for i, name in enumerate(want):
        shutil.copy(synthetic_images[i], folder / name)
    listing = numclip_cli.inputs.expand_inputs

    def list_then_change(*args, **kwargs) -> list[str]:
        paths = listing(*args, **kwargs)
        (folder / "vanished.png").unlink()
        (folder / "now_dir.png").unlink()
        (folder / "now_dir.png").mkdir()
        (folder / "now_fifo.png").unlink()
        os.mkfifo(folder / "now_fifo.png")
        (folder / "emptied.png").write_bytes(b"")
        data = (folder / "truncated.png").read_bytes()
        (folder / "truncated.png").write_bytes(data[: len(data) // 2])
        (folder / "now_text.png").write_text("not an image any more\n")
        Image.new("RGB", (30, 20), (1, 2, 3)).save(folder / "replaced.png")
        return paths

    monkeypatch.setattr(numclip_cli.inputs, "expand_inputs", list_then_change)
    result = run_cli(["predict", folder, *MODEL, "--workers", "2", "--batch-size", "3"])
    assert result.exit_code == 3, result.stderr
    by_name = records_by_name(result.stdout)
    assert set(by_name) == set(want)
    for name, expected in want.items():
        record = by_name[name]
        if expected == "ok":
            assert_ok_record(record)
        else:
            assert record == {"path": str(folder / name), "status": "error", "error": expected}
    assert "Traceback" not in result.stderr


def test_bombs_are_rejected_before_any_pixel_is_decoded(run_cli, corpus_dir: Path, synthetic_images: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.filename)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    bombs = [str(corpus_dir / "huge_header.png"), str(corpus_dir / "big_header.png")]
    result = run_cli(["predict", *bombs, synthetic_images[0], *MODEL, "--workers", "0"])
    assert result.exit_code == 3, result.stderr
    records = jsonl(result.stdout)
    assert [r["status"] for r in records] == ["error", "error", "ok"]
    assert "60000x60000" in records[0]["error"] or "decompression bomb" in records[0]["error"]
    assert records[1]["error"].startswith("image too large: 10000x10000 pixels exceeds limit")
    assert set(decoded) == {synthetic_images[0]}  # the spy works, and never saw a bomb


# --- fuzzed task specs and data lists ----------------------------------------------------------------------

SCALARS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.booleans(), st.sampled_from(["child", "{}", "age: {}", "a {} {}", "", " "]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
VALID_SPEC = {"name": "t", "unit": "u", "prompt": "a photo of {}.", "ranks": "bins",
              "bins": [{"name": "low", "low": 0, "high": 9}, {"name": "mid", "low": 10, "high": 19},
                       {"name": "high", "low": 20, "high": 29.5}]}


def toml_value(value: object) -> str:
    """A TOML literal for a generated value (strings as JSON, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def to_toml(spec: dict) -> str:
    bins = spec.get("bins")
    tables = isinstance(bins, list) and bins and all(isinstance(b, dict) for b in bins)
    lines = [f"{key} = {toml_value(value)}" for key, value in spec.items() if not (key == "bins" and tables)]
    for table in bins if tables else []:
        lines += ["[[bins]]", *(f"{key} = {toml_value(value)}" for key, value in table.items())]
    return "\n".join(lines) + "\n"


@st.composite
def task_specs(draw) -> tuple[str, str]:
    """(suffix, text): a valid spec with a few random changes (a field dropped, replaced or added, a bin's field
    changed, bins reordered or repeated), as TOML or JSON; sometimes plain garbage."""
    spec = json.loads(json.dumps(VALID_SPEC))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "set", "bin", "order"]))
        bins = spec.get("bins") if isinstance(spec.get("bins"), list) else []
        if action == "drop" and spec:
            del spec[draw(st.sampled_from(sorted(spec)))]
        elif action == "set":
            spec[draw(st.sampled_from(["name", "unit", "prompt", "ranks", "bins", "extra"]))] = draw(VALUES)
        elif action == "bin" and bins and isinstance(bins[0], dict):
            target = draw(st.sampled_from([b for b in bins if isinstance(b, dict)]))
            field = draw(st.sampled_from(["name", "low", "high", "other"]))
            if draw(st.booleans()) and field in target:
                del target[field]
            else:
                target[field] = draw(VALUES)
        elif action == "order" and bins:
            spec["bins"] = draw(st.permutations(bins + [bins[0]] * draw(st.integers(0, 1))))
    kind = draw(st.sampled_from(["toml", "json", "garbage"]))
    if kind == "garbage":
        return draw(st.sampled_from([".toml", ".json"])), draw(st.text(max_size=80))
    return (".json", json.dumps(spec, ensure_ascii=False)) if kind == "json" else (".toml", to_toml(spec))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for fuzz inputs with three real images (one in a sub-folder with a space in its name)."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "sub dir").mkdir()
    for name in ("a.png", "b.png", "sub dir/c.png"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / name)
    return folder


@pytest.mark.slow
@FUZZ
@given(spec=task_specs())
def test_fuzzed_task_specs_never_give_a_traceback(run_cli, scratch: Path, spec: tuple[str, str]) -> None:
    suffix, text = spec
    path = scratch / f"task{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = run_cli(["tasks", path])
    assert isinstance(result.exception, SystemExit | None), result.exception
    assert result.exit_code in (0, 2), (text, result.stderr)
    if result.exit_code == 2:
        assert str(path) in one_error_line(result.stderr)


GOOD_ROW = st.tuples(st.sampled_from(["a.png", "b.png", "sub dir/c.png"]), st.sampled_from(["34", "3.5", "child"]))
BAD_ROW = st.tuples(st.sampled_from(["missing.png", "", " ", "a.png b.png", "#x", "sub dir", "../a.png"]),
                    st.one_of(st.sampled_from(["nan", "inf", "-1", "1e400", "999", "", "older adult"]),
                              st.text(max_size=6)))


@st.composite
def data_lists(draw) -> tuple[str, str]:
    """(suffix, text): OrdinalCLIP lists and CSV/TSV tables of mostly good rows (real images, valid labels) with
    some bad ones (missing images, odd labels, broken headers); sometimes plain garbage."""
    rows = draw(st.lists(st.one_of(GOOD_ROW, GOOD_ROW, BAD_ROW), max_size=6))
    kind = draw(st.sampled_from([".txt", ".csv", ".tsv", "garbage"]))
    if kind == "garbage":
        return ".txt", draw(st.text(max_size=80))
    if kind == ".txt":
        return kind, "".join(f"{path} {label}\n" for path, label in rows)
    sep = "," if kind == ".csv" else "\t"
    header = draw(st.sampled_from([f"path{sep}label"] * 3 + [f"label{sep}path", f"file{sep}y", ""]))
    return kind, "\n".join([header, *(f"{path}{sep}{label}" for path, label in rows)]) + "\n"


@pytest.mark.slow
@FUZZ
@given(data=data_lists())
def test_fuzzed_data_lists_never_give_a_traceback(run_cli, scratch: Path, data: tuple[str, str]) -> None:
    suffix, text = data
    path = scratch / f"data{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    # --device quantum: a list that reads fine stops with a usage error before any model is loaded
    result = run_cli(["train", "--data", path, "--task", "age", "--device", "quantum", "--workers", "0"])
    assert isinstance(result.exception, SystemExit | None), result.exception
    assert result.exit_code in (1, 2), (text, result.stderr)
    error = one_error_line(result.stderr)
    assert str(path) in error or "device" in error or "validation split" in error, error
