"""How numclip writes its outputs: regular files are replaced atomically, symlinks are written through (the link
stays), character devices and FIFOs are written in place; output locations are checked before any work; a file
being written by one numclip process is refused to a second; stale temp files are cleaned up.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from helpers import MODEL, SUBPROCESS_TIMEOUT, jsonl, write_distinct_pngs

from numclip_cli.atomic import atomic_open, atomic_write_bytes, remove_stale_temps
from numclip_cli.locking import lock_path
from numclip_cli.predictor import Predictor


def predict_to(run_cli, images: list[str], target: Path | str) -> Result:
    result = run_cli(["predict", *images, *MODEL, "--workers", "0", "--output", target])
    assert result.exit_code == 0, result.stderr
    return result


# --- symlinks ---------------------------------------------------------------------------------------------

def test_predict_writes_through_a_symlink(run_cli, synthetic_images, tmp_path: Path) -> None:
    real = tmp_path / "data" / "real.jsonl"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    predict_to(run_cli, synthetic_images[:2], link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert [r["path"] for r in jsonl(real.read_text())] == synthetic_images[:2]
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.jsonl"]  # the temp file lived beside the target


def test_a_dangling_symlink_creates_its_target(run_cli, synthetic_images, tmp_path: Path) -> None:
    real, link = tmp_path / "new.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(real.name)  # relative, as `ln -s new.jsonl link.jsonl` makes it
    predict_to(run_cli, synthetic_images[:1], link)
    assert link.is_symlink() and len(jsonl(real.read_text())) == 1


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_atomic_writes_follow_a_chain_of_symlinks(tmp_path: Path, mode: str) -> None:
    """Checkpoints, --metrics-out, calibrate --json/--plot all go through these two functions."""
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    (tmp_path / "middle").symlink_to(real)
    top = tmp_path / "top"
    top.symlink_to(tmp_path / "middle")
    if mode == "wb":
        atomic_write_bytes(top, b"new")
    else:
        with atomic_open(top, "w") as handle:
            handle.write("new")
    assert top.is_symlink() and (tmp_path / "middle").is_symlink()
    assert real.read_bytes() == b"new"


# --- devices and FIFOs ------------------------------------------------------------------------------------

def is_char_device(path: Path | str) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


def test_dev_null_stays_a_character_device(run_cli, synthetic_images, tmp_path: Path) -> None:
    assert is_char_device("/dev/null")
    if os.geteuid() == 0:
        # root could replace the system's /dev/null: prove it on a private copy of the device first
        private = tmp_path / "null"
        os.mknod(private, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        predict_to(run_cli, synthetic_images[:1], private)
        assert is_char_device(private)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    result = predict_to(run_cli, synthetic_images[:1], "/dev/null")
    assert result.stdout == ""
    assert is_char_device("/dev/null")


def test_a_fifo_receives_the_output(run_cli, synthetic_images, tmp_path: Path) -> None:
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as reader:
            received.append(reader.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    predict_to(run_cli, synthetic_images[:2], fifo)
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert [r["path"] for r in jsonl(received[0].decode())] == synthetic_images[:2]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.fifo"]


# --- stale temp files -------------------------------------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    dead = tmp_path / f".out.jsonl.{dead_pid()}.abc123.tmp"
    alive = tmp_path / f".out.jsonl.{os.getppid()}.def456.tmp"  # a live process (our parent) may still write it
    other = tmp_path / f".other.jsonl.{dead_pid()}.abc123.tmp"
    for path in (dead, alive, other):
        path.write_text("{}\n")
    atomic_write_bytes(target, b"x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, alive.name, other.name])
    assert remove_stale_temps(target) == []


# --- output locations are checked before any work ---------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Loading a model or reading a dataset is recorded (and stopped): an early check must come first."""
    import numclip_cli.backbone
    import numclip_cli.checkpoint
    import numclip_cli.datasets
    import numclip_cli.factory

    calls: list[str] = []

    def refuse(name: str):
        def work(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} ran before the output location was checked")
        return work

    for module, name in ((numclip_cli.factory, "create_model_and_transforms"), (numclip_cli.factory, "open_backbone"),
                         (numclip_cli.backbone, "load_backbone"), (numclip_cli.checkpoint, "read_checkpoint"),
                         (numclip_cli.datasets, "load_samples")):
        monkeypatch.setattr(module, name, refuse(name))
    return calls


def bad_targets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Unwritable output locations and the words their error must contain."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    return {"missing folder": (tmp_path / "missing" / "out.x", "does not exist"),
            "folder": (tmp_path / "a-folder", "is a folder"),
            "file as folder": (tmp_path / "a-file" / "out.x", "is not a folder")}


def assert_usage_error_before_work(result, option: str, target: Path, words: str, calls: list[str]) -> None:
    assert result.exit_code == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("numclip: error")]
    assert len(error) == 1 and f"{option} {target}" in error[0] and words in error[0], result.stderr
    assert "unexpected" not in result.stderr
    assert calls == []


@pytest.mark.parametrize("case", ["missing folder", "folder", "file as folder"])
def test_predict_checks_its_output_before_loading_a_model(case: str, run_cli, synthetic_images, tmp_path: Path,
                                                          no_work: list[str]) -> None:
    target, words = bad_targets(tmp_path)[case]
    for extra in ([], ["--skip-existing"]):
        result = run_cli(["predict", *synthetic_images[:2], *MODEL, "--output", target, *extra])
        assert_usage_error_before_work(result, "--output", target, words, no_work)


@pytest.mark.parametrize("option", ["--out", "--metrics-out"])
@pytest.mark.parametrize("case", ["missing folder", "folder"])
def test_train_checks_its_outputs_before_reading_data(option: str, case: str, run_cli, synthetic_dir: Path,
                                                      tmp_path: Path, no_work: list[str]) -> None:
    target, words = bad_targets(tmp_path)[case]
    others = [] if option == "--out" else ["--out", tmp_path / "model.safetensors"]
    result = run_cli(["train", "--data", synthetic_dir, "--model", "numclip-tiny", "--pretrained", "none",
                      "--epochs", "1", "--workers", "0", option, target, *others])
    assert_usage_error_before_work(result, option, target, words, no_work)


def test_train_checks_where_the_last_checkpoint_goes(run_cli, synthetic_dir: Path, tmp_path: Path,
                                                     no_work: list[str]) -> None:
    last = tmp_path / "model.last.safetensors"
    last.mkdir()  # a folder where the resumable checkpoint must go
    result = run_cli(["train", "--data", synthetic_dir, "--model", "numclip-tiny", "--pretrained", "none",
                      "--out", tmp_path / "model.safetensors"])
    assert_usage_error_before_work(result, "--out", last, "is a folder", no_work)


@pytest.mark.parametrize("option", ["--out", "--plot", "--json"])
@pytest.mark.parametrize("case", ["missing folder", "folder"])
def test_calibrate_checks_its_outputs_before_loading_the_checkpoint(option: str, case: str, run_cli,
                                                                    synthetic_dir: Path, tmp_path: Path,
                                                                    no_work: list[str]) -> None:
    target, words = bad_targets(tmp_path)[case]
    result = run_cli(["calibrate", "--checkpoint", tmp_path / "model.safetensors", "--data", synthetic_dir,
                      option, target])
    assert_usage_error_before_work(result, option, target, words, no_work)


# --- one writer per output file ---------------------------------------------------------------------------

@contextlib.contextmanager
def held_by_another_process(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the lock on ``path`` until the block ends."""
    code = ("import sys\nfrom numclip_cli.locking import output_lock\n"
            "with output_lock(sys.argv[1], '--output'):\n    print('held', flush=True)\n    sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def busy_commands(tmp_path: Path, synthetic_dir: Path, image: str) -> dict[str, tuple[list, Path, str]]:
    """Commands that write a file, the file and the option naming it."""
    out, model = tmp_path / "out.jsonl", tmp_path / "model.safetensors"
    model.write_bytes(b"the other run's checkpoint")
    train = ["train", "--data", synthetic_dir, "--model", "numclip-tiny", "--pretrained", "none", "--workers", "0"]
    calibrate = ["calibrate", "--checkpoint", model, "--data", synthetic_dir]
    return {
        "predict --output": (["predict", image, *MODEL, "--output", out], out, "--output"),
        "predict --skip-existing": (["predict", image, *MODEL, "--output", out, "--skip-existing"], out, "--output"),
        "train --out": ([*train, "--out", model], model, "--out"),
        "train --metrics-out": ([*train, "--out", tmp_path / "m2.safetensors", "--metrics-out", out], out,
                                "--metrics-out"),
        "calibrate in place": (calibrate, model, "--checkpoint"),
        "calibrate --json": ([*calibrate, "--out", tmp_path / "m2.safetensors", "--json", out], out, "--json"),
    }


@pytest.mark.parametrize("command", ["predict --output", "predict --skip-existing", "train --out",
                                     "train --metrics-out", "calibrate in place", "calibrate --json"])
def test_a_file_another_process_is_writing_is_refused_at_once(command: str, run_cli, synthetic_dir: Path,
                                                              synthetic_images, tmp_path: Path,
                                                              no_work: list[str]) -> None:
    args, target, option = busy_commands(tmp_path, synthetic_dir, synthetic_images[0])[command]
    before = target.read_bytes() if target.exists() else None
    with held_by_another_process(target) as holder:
        result = run_cli(args)
    assert result.exit_code == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("numclip: error")]
    assert error == [f"numclip: error: {target} is being written by another numclip process (pid {holder.pid}); "
                     f"wait for it or choose another {option}"]
    assert no_work == []
    assert (target.read_bytes() if target.exists() else None) == before


def test_the_lock_guards_a_symlinks_target(run_cli, synthetic_images, tmp_path: Path, no_work: list[str]) -> None:
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(real)
    with held_by_another_process(real):
        result = run_cli(["predict", synthetic_images[0], *MODEL, "--output", link])
    assert result.exit_code == 1 and "is being written by another numclip process" in result.stderr
    assert lock_path(link) == lock_path(real) == tmp_path / ".real.jsonl.lock"


def test_a_killed_writer_does_not_block_the_next_run(run_cli, synthetic_images, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with held_by_another_process(out) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert lock_path(out).exists()  # left behind, but nobody holds it
        result = run_cli(["predict", synthetic_images[0], *MODEL, "--workers", "0", "--output", out])
    assert result.exit_code == 0, result.stderr
    assert len(jsonl(out.read_text())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # the lock file is gone after a clean run


def test_a_child_the_killed_writer_forked_does_not_hold_its_lock(run_cli, synthetic_images, tmp_path: Path) -> None:
    """A decoding worker is a fork of the writer and shares its flock; if the writer is killed, the worker must
    not keep the output locked while it lingers."""
    out = tmp_path / "out.jsonl"
    code = ("import os, sys, time\nfrom numclip_cli.locking import output_lock\n"
            "with output_lock(sys.argv[1], '--output'):\n"
            "    child = os.fork()\n"
            "    if child == 0:\n        time.sleep(60)\n        os._exit(0)\n"
            "    print(child, flush=True)\n    sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result = run_cli(["predict", synthetic_images[0], *MODEL, "--workers", "0", "--output", out])
        assert result.exit_code == 0, result.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        holder.communicate()


def test_one_output_file_for_two_options_is_a_usage_error(run_cli, synthetic_dir: Path, tmp_path: Path,
                                                          no_work: list[str]) -> None:
    out = tmp_path / "model.safetensors"
    result = run_cli(["train", "--data", synthetic_dir, "--out", out, "--metrics-out", out])
    assert result.exit_code == 2, result.stderr
    assert f"--out and --metrics-out name the same file {out}" in result.stderr
    assert no_work == []


@pytest.mark.slow  # two real processes: ~15 s on a busy 2-core machine
def test_two_real_predict_runs_on_one_output(numclip_bin: Path, synthetic_images, tmp_path: Path,
                                             clean_env) -> None:
    """The second of two concurrent ``predict -o F --skip-existing`` fails at once; the first completes alone."""
    out = tmp_path / "out.jsonl"
    command = [str(numclip_bin), "predict", "-", *MODEL, "--workers", "0", "--output", str(out), "--skip-existing"]
    first = subprocess.Popen(command, env=clean_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # the first run holds the lock while it waits for its input list: the runs surely overlap
        deadline = SUBPROCESS_TIMEOUT
        while not lock_path(out).exists() and deadline > 0:
            assert first.poll() is None, first.communicate()[1]
            threading.Event().wait(0.05)
            deadline -= 0.05
        second = subprocess.run(command, env=clean_env, input="\n".join(synthetic_images), capture_output=True,
                                text=True, timeout=SUBPROCESS_TIMEOUT)
        stdout, stderr = first.communicate("\n".join(synthetic_images), timeout=SUBPROCESS_TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, second.stderr
    assert f"is being written by another numclip process (pid {first.pid})" in second.stderr
    assert first.returncode == 0, stderr
    assert [r["path"] for r in jsonl(out.read_text())] == synthetic_images
    assert not lock_path(out).exists()


# --- --skip-existing: the resumable mode ------------------------------------------------------------------

def face_record(path: str, index: int | None, count: int) -> str:
    face = None if index is None else {"index": index, "count": count, "box": [0, 0, 8, 8]}
    return json.dumps({"path": path, "status": "ok", "value": 1.0, "face": face}) + "\n"


def test_a_faces_all_group_cut_short_by_a_kill_is_done_again_whole(tmp_path: Path) -> None:
    """kill -9 between two records of one input's faces: resuming redoes that input, never half of it."""
    from numclip_cli.errors import NumclipError
    from numclip_cli.writers import done_inputs, remaining

    whole = face_record("a.jpg", 0, 2) + face_record("a.jpg", 1, 2) + face_record("b.jpg", None, 0)
    out = tmp_path / "out.jsonl"
    out.write_text(whole + face_record("c.jpg", 0, 3) + face_record("c.jpg", 1, 3), encoding="utf-8")
    done, keep = done_inputs(out)
    assert keep == len(whole.encode()) and remaining(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], done) == ["c.jpg", "d.jpg"]
    out.write_text(whole + face_record("c.jpg", 0, 1), encoding="utf-8")  # a complete group of one face
    done, keep = done_inputs(out)
    assert keep == out.stat().st_size and remaining(["a.jpg", "b.jpg", "c.jpg"], done) == []
    out.write_text(whole + face_record("c.jpg", 0, 3).replace('"count": 3', '"count": "3"'), encoding="utf-8")
    with pytest.raises(NumclipError, match="line 4 is not a numclip record"):  # a mangled count: one-line error
        done_inputs(out)


MANY = 120  # with --batch-size 4: 30 batches, so a kill lands mid-run


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder of tiny distinct PNGs and their paths in the order ``predict FOLDER`` visits them."""
    folder = tmp_path_factory.mktemp("many")
    return folder, write_distinct_pngs(folder, MANY, blue=90)


@pytest.fixture
def predicted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The inputs the model actually runs on (in-process runs)."""
    seen: list[str] = []
    records = Predictor.input_records

    def counting(self, paths, *args, **kwargs):
        seen.extend(paths)
        return records(self, paths, *args, **kwargs)

    monkeypatch.setattr(Predictor, "input_records", counting)
    return seen


def complete_records(out: Path) -> int:
    """Complete lines in ``out`` (0 if it does not exist)."""
    return out.read_bytes().count(b"\n") if out.exists() else 0


@pytest.mark.slow  # a real process, then the rest in-process: ~15-20 s on a busy 2-core machine
def test_a_killed_skip_existing_run_resumes_where_it_stopped(numclip_bin: Path, many_images, tmp_path: Path,
                                                             clean_env, run_cli, predicted: list[str]) -> None:
    folder, paths = many_images
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [str(numclip_bin), "predict", str(folder), *MODEL, "--batch-size", "4", "--workers", "0", "--output",
         str(out), "--skip-existing"], env=clean_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        # the first records must reach out.jsonl itself, not a temp file that a kill -9 would strand
        while complete_records(out) == 0:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no record reached the output file"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = jsonl(out.read_bytes().rsplit(b"\n", 1)[0].decode())  # a torn last line is left out
    assert 0 < len(kept) < MANY and [r["path"] for r in kept] == paths[:len(kept)]
    stale = tmp_path / f".out.jsonl.{proc.pid}.x1y2z3.tmp"  # as a killed rewrite (no --skip-existing) leaves
    stale.write_text("{}\n")
    result = run_cli(["predict", folder, *MODEL, "--workers", "0", "--output", out, "--skip-existing"])
    assert result.exit_code == 0, result.stderr
    assert predicted == paths[len(kept):]  # only the rest ran
    records = jsonl(out.read_text())
    assert [r["path"] for r in records] == paths and all(r["status"] == "ok" for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # the stale temp file is gone


def test_skip_existing_creates_the_file_and_writes_in_place(run_cli, synthetic_images, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "new.jsonl"
    replaced: list[object] = []
    monkeypatch.setattr(os, "replace", lambda *args: replaced.append(args))  # an atomic rewrite would call it
    result = run_cli(["predict", *synthetic_images[:3], *MODEL, "--workers", "0", "--output", out,
                      "--skip-existing"])
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in jsonl(out.read_text())] == synthetic_images[:3]
    assert replaced == []


def test_skip_existing_matches_a_file_however_it_is_spelled(run_cli, synthetic_dir: Path, synthetic_images,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            predicted: list[str]) -> None:
    out = tmp_path / "out.jsonl"
    first = run_cli(["predict", *synthetic_images[:3], *MODEL, "--workers", "0", "--output", out])
    assert first.exit_code == 0, first.stderr
    monkeypatch.chdir(synthetic_dir)
    relative = [os.path.relpath(p) for p in synthetic_images[:5]]
    spelled = [relative[0], "./" + relative[1], str(Path(synthetic_images[2]).parent / ".." /
                                                    Path(synthetic_images[2]).relative_to(synthetic_dir)),
               *relative[3:]]
    predicted.clear()
    again = run_cli(["predict", *spelled, *MODEL, "--workers", "0", "--output", out, "--skip-existing"])
    assert again.exit_code == 0, again.stderr
    assert predicted == relative[3:]
    assert [r["path"] for r in jsonl(out.read_text())] == [*synthetic_images[:3], *relative[3:]]  # as given


def test_an_input_listed_twice_gets_two_records(run_cli, synthetic_images, tmp_path: Path,
                                                predicted: list[str]) -> None:
    out = tmp_path / "out.jsonl"
    p, q = synthetic_images[:2]
    base = [*MODEL, "--workers", "0", "--output", out, "--skip-existing"]
    first = run_cli(["predict", p, *base])
    assert first.exit_code == 0, first.stderr
    predicted.clear()
    again = run_cli(["predict", p, q, p, *base])
    assert again.exit_code == 0, again.stderr
    assert predicted == [q, p]  # p has one record of the two it needs
    assert [r["path"] for r in jsonl(out.read_text())] == [p, q, p]
    predicted.clear()
    done = run_cli(["predict", p, q, p, *base])
    assert done.exit_code == 0 and predicted == [] and "nothing to do" in done.stderr


def test_skip_existing_refuses_a_file_that_is_not_numclip_output(run_cli, synthetic_images, tmp_path: Path,
                                                                 no_work: list[str]) -> None:
    out = tmp_path / "notes.jsonl"
    text = '{"path": "a.png", "status": "ok"}\n{"note": "not a record"}\n{"path": "b.png", "status": "ok"}\n'
    out.write_text(text)
    result = run_cli(["predict", synthetic_images[0], *MODEL, "--output", out, "--skip-existing"])
    assert result.exit_code == 1, result.stderr
    assert f"{out} line 2 is not a numclip record" in result.stderr
    assert out.read_text() == text  # never truncated


@pytest.mark.parametrize("content", [b'{"experiment": "x", "results": [1, 2, 3]}', b"my notes, no newline",
                                     b'{"path": "a.png", "status": "ok"}\n' + b"x" * (1 << 16)])
def test_skip_existing_never_cuts_a_last_line_that_is_no_torn_record(content: bytes, run_cli, synthetic_images,
                                                                     tmp_path: Path, no_work: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Only an unfinished record (a line starting like one) is an interrupted write to cut off; a file whose last
    line lacks its newline for another reason is someone else's, and a line longer than any record is not read
    to its end."""
    import numclip_cli.writers

    monkeypatch.setattr(numclip_cli.writers, "MAX_RECORD_BYTES", 1 << 15)
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    result = run_cli(["predict", synthetic_images[0], *MODEL, "--output", out, "--skip-existing"])
    assert result.exit_code == 1, result.stderr
    assert "is not a numclip record (nor part of one)" in result.stderr
    assert out.read_bytes() == content


# --- helpful emptiness ------------------------------------------------------------------------------------

def test_a_folder_with_images_only_in_sub_folders_suggests_recursive(run_cli, synthetic_dir: Path,
                                                                    no_work: list[str]) -> None:
    result = run_cli(["predict", synthetic_dir, *MODEL])
    assert result.exit_code == 1, result.stderr
    assert f"numclip: error: no inputs found ({synthetic_dir} has sub-folders: add --recursive)" in result.stderr
    flat = run_cli(["predict", synthetic_dir, "--recursive", *MODEL])
    assert no_work == ["create_model_and_transforms"]  # --recursive finds the images: loads a model
    assert "sub-folders" not in flat.stderr


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_reading_paths_from_a_terminal_says_so(tty: bool, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.testing

    class Keyboard(io.BytesIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(typer.testing, "make_input_stream", lambda data, charset: Keyboard(data or b""))
    result = run_cli(["predict", "-", *MODEL], input="")
    hint = "numclip: reading paths from stdin (one per line; Ctrl-D to end)"
    assert (hint in result.stderr.splitlines()) == tty, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("output", ["stdout", "out.jsonl", "out.csv"])
def test_an_empty_shard_succeeds_with_an_empty_output(output: str, run_cli, synthetic_images, tmp_path: Path,
                                                      no_work: list[str]) -> None:
    target = [] if output == "stdout" else ["--output", tmp_path / output]
    result = run_cli(["predict", *synthetic_images[:3], *MODEL, "--shard", "5/8", *target])
    assert result.exit_code == 0, result.stderr
    assert "numclip: shard 5/8 has no inputs (3 input(s) in all)" in result.stderr
    assert result.stdout == ""
    if target:
        assert (tmp_path / output).read_bytes() == b""
    assert no_work == []


def test_an_empty_shard_keeps_what_skip_existing_holds(run_cli, synthetic_images, tmp_path: Path,
                                                       no_work: list[str]) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "earlier.png", "status": "ok"}\n{"path": "torn')
    result = run_cli(["predict", *synthetic_images[:3], *MODEL, "--shard", "3/4", "--output", out,
                      "--skip-existing"])
    assert result.exit_code == 0, result.stderr
    assert out.read_text() == '{"path": "earlier.png", "status": "ok"}\n'  # complete records only
    assert no_work == []
