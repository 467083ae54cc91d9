"""Training data layouts (folder, CSV/TSV, list) and their error reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.transforms.functional import to_tensor

from numclip_cli.datasets import LabelledImages, collate_labelled, load_samples, split_validation
from numclip_cli.errors import DataError
from numclip_cli.synthetic import render
from numclip_cli.tasks import get_task

HCI = get_task("hci")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(4):
        path = tmp_path / "img" / f"photo {i}.png"  # a space in the name: list rows split on the last field
        path.parent.mkdir(exist_ok=True)
        render("dots", i + 1, seed=i).save(path)
        paths.append(path)
    return paths


def test_folder_per_label_with_bin_names_and_numbers(tmp_path: Path) -> None:
    for folder, label in (("1930s", 1), ("1955", 2), ("1970s", 3)):
        (tmp_path / folder).mkdir()
        render("dots", label, seed=label).save(tmp_path / folder / "a.png")
    samples = load_samples(tmp_path, HCI)
    assert sorted(samples.values) == [1934.5, 1955.0, 1974.5]


def test_csv_tsv_and_list_formats(images: list[Path], tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"img/{p.name},{1930 + 10 * i}.0\n"
                                                              for i, p in enumerate(images)))
    (tmp_path / "l.tsv").write_text("path\tlabel\n" + "".join(f"img/{p.name}\t1940s\n" for p in images))
    (tmp_path / "l.txt").write_text("# comment\n\n" + "".join(f"img/{p.name} 1961\n" for p in images))
    assert load_samples(tmp_path / "l.csv", HCI).values == [1930.0, 1940.0, 1950.0, 1960.0]
    assert load_samples(tmp_path / "l.tsv", HCI).values == [1944.5] * 4
    listed = load_samples(tmp_path / "l.txt", HCI)
    assert listed.values == [1961.0] * 4 and Path(listed.paths[0]).exists()


def test_problems_are_reported_with_file_and_line(images: list[Path], tmp_path: Path) -> None:
    lines = [f"img/{images[0].name} 1931", "img/missing.png 1940", f"img/{images[1].name} 2020",
             f"img/{images[2].name} nineteen", "lonely"]
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "bad.txt", HCI)
    message = str(info.value)
    assert "4 problem(s)" in message and "\n" not in message
    for line in (2, 3, 4, 5):
        assert f"bad.txt:{line}" in message
    assert "image not found" in message and "outside the task range" in message


def test_csv_without_header_is_reported(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a.png,3\n")
    with pytest.raises(DataError, match="x.csv:1"):
        load_samples(tmp_path / "x.csv", HCI)


def test_validation_split_is_seeded_and_disjoint(images: list[Path], tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("".join(f"img/{p.name} {1930 + i}\n" for i, p in enumerate(images)))
    samples = load_samples(tmp_path / "l.txt", HCI)
    train, val = split_validation(samples, 0.25, seed=1)
    again, _ = split_validation(samples, 0.25, seed=1)
    assert train.paths == again.paths and len(val) == 1
    assert set(train.paths).isdisjoint(val.paths) and len(train) + len(val) == 4
    with pytest.raises(DataError):
        split_validation(samples, 1.5, seed=1)


def test_unreadable_images_are_skipped_not_replaced(images: list[Path], tmp_path: Path) -> None:
    images[1].write_bytes(b"\x89PNG broken")
    (tmp_path / "l.txt").write_text("".join(f"img/{p.name} {1930 + 10 * i}\n" for i, p in enumerate(images)))
    data = LabelledImages(load_samples(tmp_path / "l.txt", HCI), HCI, transform=to_tensor)
    batch = collate_labelled([data[i] for i in range(4)])
    assert int(batch["skipped"]) == 1
    assert batch["values"].tolist() == [1930.0, 1950.0, 1960.0]  # the label of the broken image is gone too
    assert batch["bins"].tolist() == [0, 2, 3]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_fuzzed_lists_only_raise_data_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.txt"
    path.write_text(text, encoding="utf-8")
    try:
        load_samples(path, HCI)
    except DataError:
        pass  # the only acceptable failure: anything else (a traceback for the user) fails the test
