"""Where a fresh ``numclip predict IMAGE`` process spends its time: interpreter start and exit, the imports
(torch, open_clip with what it pulls in, numclip), building the model, and the first batch. Measured in a
child process, so every import is really cold (apart from the operating system's file cache)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from numclip_cli.errors import NumclipError

PHASES = ("import_torch", "import_open_clip", "import_numclip", "build_model", "first_batch")

# The child does what ``numclip predict IMAGE --checkpoint FILE`` does, with a timestamp after each phase.
_CHILD = """
import json, sys, time
marks = [time.perf_counter()]
import torch
marks.append(time.perf_counter())
import open_clip
marks.append(time.perf_counter())
import numclip_cli.cli.app
from numclip_cli.predictor import Predictor
from numclip_cli.factory import create_model_and_transforms
marks.append(time.perf_counter())
checkpoint, device, image = sys.argv[1:4]
session = create_model_and_transforms(torch.device(device), checkpoint=checkpoint)
predictor = Predictor(session.model, torch.device(device))
marks.append(time.perf_counter())
records = list(predictor.records([image], session.transform, 1, workers=0))
marks.append(time.perf_counter())
assert records[0]["status"] == "ok", records
print(json.dumps([later - earlier for earlier, later in zip(marks, marks[1:])]))
"""


def cold_start_phases(checkpoint: str, image: str, device: str = "cpu") -> dict[str, float]:
    """Seconds of each phase of a cold ``predict`` of one image (``PHASES``), plus ``python`` (interpreter start
    and exit: the rest of the process's life) and ``total`` (process start to exit)."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _CHILD, checkpoint, device, image], capture_output=True,
                           text=True, timeout=600)
    total = time.perf_counter() - start
    if child.returncode != 0:
        raise NumclipError(f"cold-start run failed (exit {child.returncode}): {child.stderr.strip()[-300:]}")
    phases = dict(zip(PHASES, json.loads(child.stdout.strip().splitlines()[-1]), strict=True))
    return {**phases, "python": total - sum(phases.values()), "total": total}
