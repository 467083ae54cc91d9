"""Every ``--method``: loss composition, rank interpolation, RankFormer, readouts, training, checkpoints, predict."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from numclip_cli.backbone import load_backbone
from numclip_cli.checkpoint import Checkpoint, model_tensors, read_checkpoint, write_checkpoint
from numclip_cli.datasets import load_samples
from numclip_cli.factory import create_model_and_transforms
from numclip_cli.losses import ordinal_pairwise_loss, ordinalclip_kl
from numclip_cli.model.methods import METHODS, Output, RankModel, create_model
from numclip_cli.model.ranks import InterpolatedRanks, RankFormer, interpolation_weights
from numclip_cli.predictor import Predictor
from numclip_cli.synthetic import task_spec
from numclip_cli.tasks import get_task
from numclip_cli.trainer import TrainConfig, Trainer

TINY = ["--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu"]
RANK_METHODS = sorted(name for name, cls in METHODS.items() if issubclass(cls, RankModel))
TRAINED_METHODS = [name for name in METHODS if name != "zeroshot"]


def fresh_backbone():
    """A private seeded tiny backbone: training tunes its image tower, so the session fixture must not be used."""
    torch.manual_seed(0)
    return load_backbone("numclip-tiny", "none")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ rank interpolation
def test_interpolation_weights_are_the_reference_linear_formula() -> None:
    """M = 5, bases at ranks 0, 2, 4: w ∝ 1 − |r − p|/4, each row normalised."""
    raw = torch.tensor([[1, 0.5, 0], [0.75, 0.75, 0.25], [0.5, 1, 0.5], [0.25, 0.75, 0.75], [0, 0.5, 1]])
    torch.testing.assert_close(interpolation_weights(5, 3), raw / raw.sum(dim=1, keepdim=True))
    torch.testing.assert_close(interpolation_weights(5, 3)[0], torch.tensor([2 / 3, 1 / 3, 0.0]))


@pytest.mark.parametrize(("ranks", "bases"), [(2, 2), (10, 3), (11, 3), (101, 3), (7, 5)])
def test_interpolation_rows_sum_to_one(ranks: int, bases: int) -> None:
    weights = interpolation_weights(ranks, bases)
    assert weights.shape == (ranks, bases) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(ranks))


def test_endpoint_ranks_equal_the_base_embeddings() -> None:
    """With two bases the end ranks are the bases themselves; in between, a straight line."""
    base = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    ranks = InterpolatedRanks(base, 7)()
    torch.testing.assert_close(ranks[0], base[0])
    torch.testing.assert_close(ranks[-1], base[1])
    torch.testing.assert_close(ranks[3], (base[0] + base[1]) / 2)


def test_ordinalclip_writes_each_interpolated_rank_at_its_placeholder(tiny_backbone) -> None:
    model = create_model("ordinalclip", tiny_backbone, task_spec("dots"))
    ranks = model.ranks()
    assert ranks.shape == (10, model.prompt.width) and model.ranks.base.shape[0] == 3
    embeddings = model.prompt.embeddings(model.clip, ranks)
    torch.testing.assert_close(embeddings[model.prompt.word_rows, model.prompt.word_cols], ranks)
    torch.testing.assert_close(ranks[0], model.ranks.weights[0] @ model.ranks.base)


# ------------------------------------------------------------------------------------------- RankFormer
def _trained(former: RankFormer) -> RankFormer:
    """Give the zero-initialised branch outputs weights, as training does."""
    with torch.no_grad():
        for layer in (former.attn.out_proj, former.mlp[-1]):
            layer.weight.normal_(std=0.2)
    return former


def test_rankformer_starts_at_the_plain_prompts_and_moves_them_by_alpha() -> None:
    torch.manual_seed(0)
    former = RankFormer(16)
    prompts = torch.randn(6, 5, 16)
    assert former.alpha.item() == pytest.approx(0.01)
    torch.testing.assert_close(former.block(prompts), prompts)  # zero-initialised branches: F(P) = P
    torch.testing.assert_close(former(prompts), prompts)
    _trained(former)
    block = former.block(prompts)
    assert (block - prompts).abs().max() > 0.1
    torch.testing.assert_close(former(prompts) - prompts, 0.01 * (block - prompts))  # P̂ − P = α·(F − P)


def test_l2rclip_step_zero_text_features_are_the_plain_rank_prompts(tiny_backbone) -> None:
    model = create_model("l2rclip", tiny_backbone, task_spec("dots"))
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), model.prompt(model.clip), atol=1e-6, rtol=1e-6)


def test_rankformer_attention_mixes_ranks_at_each_position_only() -> None:
    """Changing rank 0's token at position 2 changes rank 1's token at position 2, and nothing elsewhere."""
    torch.manual_seed(0)
    former = _trained(RankFormer(16))
    prompts = torch.randn(4, 5, 16)
    changed = prompts.clone()
    changed[0, 2] = torch.randn(16)  # not a constant shift, which the LayerNorm would remove
    before, after = former(prompts), former(changed)
    assert (after[1, 2] - before[1, 2]).abs().max() > 1e-4  # information crossed from rank 0 to rank 1
    other_positions = [p for p in range(5) if p != 2]
    torch.testing.assert_close(after[:, other_positions], before[:, other_positions])


# ----------------------------------------------------------------------------- rank readouts and bins
def test_rank_readouts_and_bin_probabilities(tiny_backbone) -> None:
    """dots: ranks 1..10, two per bin; softmax over bin logits = summed rank probabilities."""
    model = create_model("linear-probe", tiny_backbone, task_spec("dots"))
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 2.0]])
    out = model.rank_output(logits)
    probs = logits.softmax(-1)
    torch.testing.assert_close(out.value, probs @ torch.arange(1.0, 11.0))
    assert out.value_max.tolist() == [2.0]
    bins = model.bin_logits(logits).softmax(-1)
    torch.testing.assert_close(bins, probs.reshape(1, 5, 2).sum(-1))


def test_rank_labels_nearest_integer_or_bin(tiny_backbone) -> None:
    dots = create_model("linear-probe", tiny_backbone, task_spec("dots"))
    assert dots.rank_labels(torch.tensor([1.0, 4.0, 9.6]), torch.tensor([0, 1, 4])).tolist() == [0, 3, 9]
    hci = create_model("linear-probe", tiny_backbone, get_task("hci"))  # ranks = "bins"
    assert hci.num_ranks == 5
    assert hci.rank_labels(torch.tensor([1931.0, 1979.0]), torch.tensor([0, 4])).tolist() == [0, 4]


# -------------------------------------------------------------------- method-level loss composition
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])


def test_coop_loss_is_cross_entropy_over_bins(tiny_backbone) -> None:
    """hci bins 0 and 4: CE = mean of logsumexp(row) − row[label], written out."""
    model = create_model("coop", tiny_backbone, get_task("hci"))
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.0, 0.0], [0.5, 1.5, 0.0, 0.0, 0.0]])
    losses = model.loss(Output(logits=logits, value=torch.zeros(2)), torch.tensor([1935.0, 1975.0]),
                        torch.tensor([0, 4]))
    by_hand = (math.log(math.exp(2) + math.exp(-1) + 3) - 2 + math.log(math.exp(0.5) + math.exp(1.5) + 3) - 0) / 2
    assert losses["total"].item() == pytest.approx(by_hand, rel=1e-6)


def test_rank_method_losses_compose_ce_with_their_ordinal_terms(tiny_backbone) -> None:
    """dots values 1 and 2 are ranks 0 and 1; each total is CE (by hand) plus the method's own term."""
    task = task_spec("dots")
    logits = torch.zeros(2, 10)
    logits[:, :3] = LOGITS
    values, bins = torch.tensor([1.0, 2.0]), torch.tensor([0, 0])
    labels = torch.tensor([0, 1])
    ce = (math.log(math.exp(2) + math.exp(-1) + 8) - 2 + math.log(math.exp(0.5) + math.exp(1.5) + 8) - 1.5) / 2
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = F.normalize(torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = Output(logits=logits, value=torch.zeros(2), features=z, text=text)

    probe = create_model("linear-probe", tiny_backbone, task).loss(out, values, bins)
    assert probe["total"].item() == pytest.approx(ce, rel=1e-6)

    ordinal = create_model("ordinalclip", tiny_backbone, task).loss(out, values, bins)
    assert ordinal["ce"].item() == pytest.approx(ce, rel=1e-6)
    torch.testing.assert_close(ordinal["kl"], ordinalclip_kl(logits, labels))
    torch.testing.assert_close(ordinal["total"], ordinal["ce"] + ordinal["kl"])

    l2r = create_model("l2rclip", tiny_backbone, task).loss(out, values, bins)
    assert l2r["ce"].item() == pytest.approx(ce, rel=1e-6)
    # L_t + L_d by hand: W_ij = |r_i − j| over 10 ranks, normalised by max W = 9 (the rank-0 image to rank 9)
    d = torch.cdist(z, text)
    w = (labels[:, None] - torch.arange(10)[None, :]).abs() / 9
    by_hand = (d[0, 0] ** 2 + d[1, 1] ** 2) / 2 - (w * d).mean()
    torch.testing.assert_close(l2r["cop"], by_hand)
    torch.testing.assert_close(l2r["cop"], ordinal_pairwise_loss(z, text, labels))
    torch.testing.assert_close(l2r["total"], l2r["ce"] + l2r["cop"])


def test_l2rclip_pairwise_weights_use_rank_values_not_indices(tiny_backbone) -> None:
    """Unequal bins (ranks = "bins"): W_ij = |y_i − r_j| on the bins' representative values, as the reference."""
    task = dataclasses.replace(get_task("age"), ranks="bins")  # representatives 6, 15.5, 26.5, 49.5, 82.5
    model = create_model("l2rclip", tiny_backbone, task)
    z = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    text = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    out = Output(logits=torch.zeros(3, 5), value=torch.zeros(3), features=z, text=text)
    values, bins = torch.tensor([6.0, 26.5, 82.5]), torch.tensor([0, 2, 4])
    cop = model.loss(out, values, bins)["cop"]
    reps = torch.tensor(task.representatives())
    torch.testing.assert_close(cop, ordinal_pairwise_loss(z, text, bins, rank_values=reps))
    assert not torch.allclose(cop, ordinal_pairwise_loss(z, text, bins))  # what rank indices would give


@pytest.mark.parametrize("values", [[4.0], [4.0, 4.0, 4.0]], ids=["batch-of-one", "all-equal"])
def test_l2rclip_degenerate_batches_stay_finite(tiny_backbone, values: list[float]) -> None:
    model = create_model("l2rclip", tiny_backbone, task_spec("dots"))
    out = model(images(len(values)))
    losses = model.loss(out, torch.tensor(values), torch.ones(len(values), dtype=torch.long))
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(model.prompt.words.grad).all()


# --------------------------------------------------------------- every method: train, save, load, predict
@pytest.fixture(scope="module")
def dots_samples(synthetic_dir: Path):
    return load_samples(synthetic_dir, task_spec("dots"))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_round_trips_and_predicts(method: str, dots_samples, synthetic_images, tmp_path: Path) -> None:
    task = task_spec("dots")
    backbone = fresh_backbone()
    out = tmp_path / f"{method}.safetensors"
    if method in TRAINED_METHODS:
        config = TrainConfig(method=method, epochs=1, batch_size=12, lr=1e-3, image_lr=1e-3, workers=0)
        trainer = Trainer(backbone, task, config, torch.device("cpu"))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith("clip.")}
        trainer.fit(dots_samples, dots_samples, out)
        model = trainer.model
        after = model.state_dict()
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
        assert any(not torch.equal(before[k], after[k]) for k in before), "one step changed nothing"
    else:  # nothing to train: the checkpoint must lead back to the backbone's weights, here from a file that
        # differs from every seeded init (so a loader that ignored it would be caught below)
        weights = tmp_path / "weights.safetensors"
        generator = torch.Generator().manual_seed(1)
        save_file({k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous()
                   for k, v in backbone.model.state_dict().items()}, str(weights))
        backbone = load_backbone("numclip-tiny", str(weights))
        model = create_model(method, backbone, task)
        write_checkpoint(out, Checkpoint(tensors=model_tensors(model, backbone, tuned_image=False), task=task,
                                         method=method, backbone=backbone.describe()))
    result = create_model_and_transforms(checkpoint=out)
    loaded, ckpt = result.model, result.checkpoint
    assert ckpt.method == method
    batch = images(3)
    model.eval()
    with torch.no_grad():
        live, again = model(batch), loaded(batch)
        untrained = create_model(method, fresh_backbone(), task).eval()(batch)
    # what was trained (or loaded from the file) is not what a fresh seeded model gives: the round trip carried it
    assert not torch.allclose(untrained.logits, live.logits, atol=1e-3)
    rank_method = method in RANK_METHODS
    assert (live.value_max is not None) == (again.value_max is not None) == rank_method
    for name in ("logits", "value", "value_max") if rank_method else ("logits", "value"):
        torch.testing.assert_close(getattr(live, name), getattr(again, name), rtol=1e-5, atol=1e-5)
    records = list(Predictor(loaded, torch.device("cpu")).records(synthetic_images[:5], backbone.preprocess,
                                                                   batch_size=2, workers=0))
    assert [r["status"] for r in records] == ["ok"] * 5
    for record in records:
        assert math.isfinite(record["value"]) and task.low <= record["value"] <= task.high
        assert record["bin"] in task.bin_names and record["bin"] == task.bin_names[record["bin_index"]]
        assert record["value_bin"] == task.bin_names[task.bin_index(record["value"])]
        assert sum(record["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert ("value_max" in record) == rank_method


@pytest.mark.parametrize("method", RANK_METHODS)
def test_predictor_computes_rank_text_features_once(method: str, tiny_backbone, synthetic_images,
                                                    monkeypatch) -> None:
    model = create_model(method, tiny_backbone, task_spec("dots"))
    calls = []
    original = model.text_features
    monkeypatch.setattr(model, "text_features", lambda: calls.append(1) or original())
    predictor = Predictor(model, torch.device("cpu"))
    records = list(predictor.records(synthetic_images[:6], tiny_backbone.preprocess, batch_size=2, workers=0))
    assert len(records) == 6 and len(calls) == 1


@pytest.mark.slow
def test_linear_probe_encodes_each_image_once(dots_samples, tmp_path: Path, monkeypatch) -> None:
    """The frozen image tower runs once per image for the whole run, not once per epoch."""
    trainer = Trainer(fresh_backbone(), task_spec("dots"),
                      TrainConfig(method="linear-probe", epochs=3, batch_size=8, lr=1e-2, workers=0),
                      torch.device("cpu"))
    seen = []
    original = trainer.model.encode_images
    monkeypatch.setattr(trainer.model, "encode_images", lambda x: seen.append(len(x)) or original(x))
    result = trainer.fit(dots_samples, dots_samples, tmp_path / "probe.safetensors")
    assert sum(seen) == len(dots_samples)  # train and validation are the same images here: one cache
    assert len(result.history) == 3 and all(math.isfinite(h.train_loss) for h in result.history)
    assert not trainer.tunes_image and all(not p.requires_grad for p in trainer.model.clip.parameters())


@pytest.mark.parametrize(("method", "task", "trained"), [
    ("numclip", task_spec("dots"), False), ("numclip", get_task("age"), False), ("numclip", get_task("hci"), False),
    ("numclip", get_task("aesthetics"), True), ("coop", task_spec("dots"), True), ("l2rclip", task_spec("dots"), True)])
def test_context_is_trained_by_default_where_the_method_or_task_says(method: str, task, trained: bool) -> None:
    """numclip follows the task's tune_context (the reference trains the context for aesthetics only)."""
    trainer = Trainer(fresh_backbone(), task, TrainConfig(method=method, epochs=1), torch.device("cpu"))
    groups = {group["name"] for group in trainer.optimizer.param_groups}
    assert ("context" in groups) == trained
    forced = Trainer(fresh_backbone(), task, TrainConfig(method=method, epochs=1, tune_context=False),
                     torch.device("cpu"))
    assert "context" not in {group["name"] for group in forced.optimizer.param_groups}


@pytest.mark.parametrize(("select", "best_epoch"), [("mae", 2), ("mae_levels", 1)])
def test_checkpoint_is_selected_on_the_tasks_metric(select: str, best_epoch: int, dots_samples, tmp_path: Path,
                                                    monkeypatch) -> None:
    """Epoch 1 has the better level MAE, epoch 2 the better MAE in the task unit: the spec's ``select`` decides."""
    task = dataclasses.replace(task_spec("dots"), select=select)
    trainer = Trainer(fresh_backbone(), task, TrainConfig(epochs=2, workers=0), torch.device("cpu"))
    scores = iter([{"mae": 1.0, "mae_levels": 0.5}, {"mae": 0.5, "mae_levels": 0.9}])
    monkeypatch.setattr(trainer, "train_epoch", lambda samples, epoch, on_step: (0.0, 0))
    monkeypatch.setattr(trainer, "evaluate", lambda samples: next(scores))
    out = tmp_path / "best.safetensors"
    result = trainer.fit(dots_samples, dots_samples, out)
    assert result.best_epoch == best_epoch
    stored = read_checkpoint(out).train
    assert (stored["select"], stored["best_epoch"], stored["epoch"]) == (select, best_epoch, best_epoch)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_cli_trains_and_predicts_every_method(method: str, run_cli, synthetic_dir: Path, synthetic_images,
                                              tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli(["train", "--data", synthetic_dir, *TINY, "--method", method, "--epochs", "1",
                      "--batch-size", "8", "--lr", "1e-3", "--val-split", "0.25", "--workers", "0", "--out", out])
    assert result.exit_code == 0, result.stderr
    result = run_cli(["predict", *synthetic_images[:3], "--checkpoint", out, "--format", "jsonl", "--offline",
                      "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert all(("value_max" in r) == (method in RANK_METHODS) for r in records)


def test_cli_zeroshot_predicts_and_refuses_to_train(run_cli, synthetic_dir: Path, synthetic_images,
                                                    tmp_path: Path) -> None:
    result = run_cli(["train", "--data", synthetic_dir, *TINY, "--method", "zeroshot", "--epochs", "1",
                      "--out", tmp_path / "z.safetensors"])
    assert result.exit_code == 2 and "nothing to train" in result.stderr
    result = run_cli(["predict", synthetic_images[0], "--task", synthetic_dir / "task.toml", *TINY,
                      "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"


@pytest.mark.parametrize(("method", "head_lr", "expected"), [
    ("numclip", None, 30 * 3e-3), ("numclip", 5e-4, 5e-4), ("numclip-position", None, 10 * 3e-3),
    ("numclip-ssr", None, 3e-3), ("linear-probe", None, 3e-3)])
def test_head_learning_rate_defaults_to_the_methods_scale(method: str, head_lr, expected: float) -> None:
    """numclip's offset head trains at 30× the prompts' rate, the position head at 10× (the reference design and
    the probe at 1×), unless --head-lr gives one; the other groups keep theirs."""
    config = TrainConfig(method=method, epochs=1, lr=3e-3, image_lr=1e-3, head_lr=head_lr)
    trainer = Trainer(fresh_backbone(), task_spec("dots"), config, torch.device("cpu"))
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates["head"] == pytest.approx(expected)
    assert rates.get("visual", 1e-3) == 1e-3 and rates.get("words", 3e-3) == 3e-3
