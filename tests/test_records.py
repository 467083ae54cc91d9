"""What a prediction record says: ``value`` inside the task range, ``bin`` vs ``value_bin``, and non-finite
model outputs turned into error records (never ``NaN`` in the JSON)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from numclip_cli.checkpoint import Checkpoint, model_tensors, write_checkpoint
from numclip_cli.cli.table import TableWriter
from numclip_cli.model.methods import create_model
from numclip_cli.predictor import NON_FINITE, Predictor
from numclip_cli.synthetic import task_spec
from numclip_cli.writers import CsvWriter

DOTS = task_spec("dots")  # bins 1–2, 3–4, 5–6, 7–8, 9–10


def _predictor(tiny_backbone, outputs: list[dict[str, object]], monkeypatch) -> Predictor:
    """A predictor whose model outputs (value, bin probabilities) are the given ones, image by image."""
    predictor = Predictor(create_model("zeroshot", tiny_backbone, DOTS), torch.device("cpu"))
    rows = iter(outputs)

    def predict_images(images: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = [next(rows) for _ in range(len(images))]
        probs = torch.tensor([row["probs"] for row in batch], dtype=torch.float32)
        return {"value": torch.tensor([row["value"] for row in batch]), "probs": probs, "bin_logits": probs.log(),
                "expected_bin": probs @ torch.arange(5, dtype=torch.float32)}

    monkeypatch.setattr(predictor, "predict_images", predict_images)
    return predictor


def _records(predictor: Predictor, images: list[str]) -> list[dict]:
    """Records of real image files; the crafted outputs replace the model's, so the pixels do not matter."""
    return list(predictor.records(images, lambda image: torch.zeros(3, 64, 64), batch_size=8, workers=0))


def test_value_bin_is_the_bin_holding_the_value_and_bin_the_most_probable(tiny_backbone, synthetic_images,
                                                                         monkeypatch) -> None:
    outputs = [{"value": 9.45, "probs": [0.0, 0.0, 0.1, 0.5, 0.4]},  # the demo's "9.45, seven or eight"
               {"value": 7.7, "probs": [0.0, 0.0, 0.1, 0.8, 0.1]},
               {"value": 10.09, "probs": [0.0, 0.0, 0.0, 0.0, 1.0]}]  # above the range: clamped
    records = _records(_predictor(tiny_backbone, outputs, monkeypatch), synthetic_images[:3])
    assert [(r["value"], r["bin"], r["value_bin"]) for r in records] == [
        (9.45, "seven or eight", "nine or ten"), (7.7, "seven or eight", "seven or eight"),
        (10.0, "nine or ten", "nine or ten")]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["value", "probs"])
def test_non_finite_outputs_become_error_records(tiny_backbone, synthetic_images, monkeypatch, bad: float,
                                                 where: str) -> None:
    broken = {"value": bad, "probs": [0.2] * 5} if where == "value" else {"value": 5.0, "probs": [bad] + [0.2] * 4}
    outputs = [{"value": 5.5, "probs": [0.0, 0.0, 1.0, 0.0, 0.0]}, broken]
    records = _records(_predictor(tiny_backbone, outputs, monkeypatch), synthetic_images[:2])
    assert records[0]["status"] == "ok"
    assert records[1] == {"path": synthetic_images[1], "status": "error", "error": NON_FINITE}


def _strict(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_nan_weights_give_error_records_and_a_failure_exit(run_cli, tiny_backbone, synthetic_images,
                                                           tmp_path: Path) -> None:
    """A checkpoint whose fine-head weights are NaN: strict JSON, one error record per image, exit 1 (all failed)."""
    model = create_model("numclip", tiny_backbone, DOTS)
    with torch.no_grad():
        for parameter in model.regressor.parameters():
            parameter.fill_(math.nan)
    checkpoint = tmp_path / "nan.safetensors"
    write_checkpoint(checkpoint, Checkpoint(tensors=model_tensors(model, tiny_backbone, tuned_image=False),
                                            task=DOTS, method="numclip", backbone=tiny_backbone.describe()))
    result = run_cli(["predict", *synthetic_images[:3], "--checkpoint", checkpoint, "--format", "jsonl",
                      "--device", "cpu", "--offline"])
    assert result.exit_code == 1, result.stderr
    records = [_strict(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == synthetic_images[:3]
    assert all(r == {"path": r["path"], "status": "error", "error": NON_FINITE} for r in records)


def _ok(value: float, bin_name: str, value_bin: str) -> dict:
    return {"path": "a.png", "status": "ok", "value": value, "bin": bin_name, "value_bin": value_bin,
            "probs": {bin_name: 0.5}}


def test_table_marks_a_value_outside_the_most_probable_bin() -> None:
    stream = io.StringIO()
    writer = TableWriter(stream, "dots")
    writer.write(_ok(9.45, "seven or eight", "nine or ten"))
    writer.close()
    text = stream.getvalue()
    assert "9.45 (nine or ten)†" in text and "† the value lies in the bin in brackets" in text
    plain = io.StringIO()
    writer = TableWriter(plain, "dots")
    writer.write(_ok(7.7, "seven or eight", "seven or eight"))
    writer.close()
    assert "†" not in plain.getvalue() and "7.70" in plain.getvalue()


def test_csv_has_the_value_bin_column() -> None:
    stream = io.StringIO()
    writer = CsvWriter(stream, DOTS.bin_names)
    writer.write(_ok(9.45, "seven or eight", "nine or ten"))
    header, row = stream.getvalue().splitlines()
    assert dict(zip(header.split(","), row.split(","), strict=True))["value_bin"] == "nine or ten"
