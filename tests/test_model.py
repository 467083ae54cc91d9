"""The ordinal models on real open_clip backbones: step 0 is zero-shot CLIP, shapes, readouts and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from numclip_cli.backbone import load_backbone
from numclip_cli.errors import UsageError
from numclip_cli.model.heads import FineRegressor, OffsetRegressor, PositionRegressor
from numclip_cli.model.methods import METHODS, NumClip, create_model
from numclip_cli.names import METHOD_NAMES, UNTRAINED_METHODS
from numclip_cli.synthetic import list_generators, task_spec
from numclip_cli.tasks import TaskSpec, get_task, list_tasks

BATCH = 3


def reference_text_features(backbone, task) -> torch.Tensor:
    """What plain zero-shot CLIP computes for the task's hand-written prompts."""
    tokens = backbone.tokenizer([task.prompt.format(name) for name in task.bin_names])
    with torch.no_grad():
        return nn.functional.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def images(backbone, n: int = BATCH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=generator)


@pytest.fixture(scope="module")
def batch(tiny_backbone) -> torch.Tensor:
    return images(tiny_backbone)


def test_methods_registry_builds_each_method_by_its_name(tiny_backbone) -> None:
    assert tuple(METHODS) == METHOD_NAMES  # the torch-free list that help texts are built from
    for name, cls in METHODS.items():
        model = create_model(name, tiny_backbone, get_task("age"))
        assert type(model) is cls and model.method == name  # the name a checkpoint stores rebuilds this class
        assert (not model.trainable_groups()) == (name in UNTRAINED_METHODS), name
    assert isinstance(create_model("numclip", tiny_backbone, get_task("age")), NumClip)
    with pytest.raises(UsageError, match="unknown method 'numclip2'"):
        create_model("numclip2", tiny_backbone, get_task("age"))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task_name", list_tasks())
def test_every_method_predicts_bins_and_values(tiny_backbone, batch, task_name: str, method: str) -> None:
    """Parametrised over the method registry: every method maps images to bin logits and an in-range value."""
    task = get_task(task_name)
    model = create_model(method, tiny_backbone, task).eval()
    assert model.method == method
    with torch.no_grad():
        out = model(batch, model.text_features())
    bins = model.bin_logits(out.logits)
    assert bins.shape == (BATCH, len(task.bins)) and torch.isfinite(bins).all()
    assert out.value.shape == (BATCH,) and torch.isfinite(out.value).all()
    assert ((task.low - 1e-3 <= out.value) & (out.value <= task.high + 1e-3)).all()
    if out.value_max is not None:
        assert out.value_max.shape == (BATCH,)


def test_unknown_method_is_a_usage_error(tiny_backbone) -> None:
    with pytest.raises(UsageError, match="bogus"):
        create_model("bogus", tiny_backbone, get_task("age"))


@pytest.mark.parametrize("method", ["numclip", "zeroshot"])
@pytest.mark.parametrize("task_name", list_tasks())
def test_initial_prompts_equal_zero_shot_clip(tiny_backbone, task_name: str, method: str) -> None:
    """Step 0 of prompt learning is exactly zero-shot CLIP: the learnable tokens start as the prompt's words."""
    task = get_task(task_name)
    model = create_model(method, tiny_backbone, task)
    with torch.no_grad():
        features = model.text_features()
    expected = reference_text_features(tiny_backbone, task)
    assert features.shape == (len(task.bins), model.embed_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(features.norm(dim=-1), torch.ones(len(task.bins)), atol=1e-5)


@pytest.mark.parametrize("method", ["numclip", "zeroshot"])
@pytest.mark.parametrize("task_name", list_tasks())
def test_output_shapes_and_cached_text_features(tiny_backbone, batch, task_name: str, method: str) -> None:
    task = get_task(task_name)
    model = create_model(method, tiny_backbone, task).eval()
    with torch.no_grad():
        out = model(batch)
        cached = model(batch, model.text_features())
    assert out.logits.shape == (BATCH, len(task.bins))
    assert out.value.shape == (BATCH,)
    assert out.value_max is None
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.value).all()
    torch.testing.assert_close(out.logits, cached.logits)
    torch.testing.assert_close(out.value, cached.value)
    assert model.bin_logits(out.logits) is out.logits


@pytest.mark.parametrize("task_name", list_tasks())
def test_zero_shot_value_is_the_expected_representative(tiny_backbone, batch, task_name: str) -> None:
    task = get_task(task_name)
    model = create_model("zeroshot", tiny_backbone, task)
    with torch.no_grad():
        out = model(batch)
    representatives = torch.tensor([(b.low + b.high) / 2 for b in task.bins])
    torch.testing.assert_close(out.value, out.logits.softmax(-1) @ representatives)
    assert ((task.low <= out.value) & (out.value <= task.high)).all()


@pytest.mark.parametrize("task_name", list_tasks())
def test_zero_shot_logits_are_scaled_cosine_similarities(tiny_backbone, batch, task_name: str) -> None:
    task = get_task(task_name)
    model = create_model("zeroshot", tiny_backbone, task)
    with torch.no_grad():
        out = model(batch)
        image = nn.functional.normalize(tiny_backbone.model.encode_image(batch).float(), dim=-1)
        scale = tiny_backbone.model.logit_scale.exp().clamp(max=100)
    expected = scale * image @ reference_text_features(tiny_backbone, task).t()
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)


NUMCLIP_METHODS = ["numclip", "numclip-position", "numclip-ssr"]
WIDTH = 16  # image-feature width of the feature-reading heads built here


@pytest.mark.parametrize("method", NUMCLIP_METHODS)
@pytest.mark.parametrize("task_name", list_tasks())
def test_fine_head_starts_as_probability_weighted_representatives(tiny_backbone, batch, task_name: str,
                                                                  method: str) -> None:
    """Δ ≈ 0 (SSR head), t ≈ 0 (position head) or δ ≈ 0 (offset head) at init, so ŷ = Σ p_k · representative_k:
    the value each bin's label stands for."""
    task = get_task(task_name)
    model = create_model(method, tiny_backbone, task)
    with torch.no_grad():
        out = model(batch)
    expected = out.logits.softmax(-1) @ torch.tensor(task.representatives())
    torch.testing.assert_close(out.value, expected, atol=1e-3 * (task.high - task.low), rtol=0)
    assert ((task.low <= out.value) & (out.value <= task.high)).all()


def every_task() -> list[TaskSpec]:
    """The built-in tasks and the synthetic ones."""
    return [get_task(name) for name in list_tasks()] + [task_spec(kind) for kind in list_generators()]


class Head:
    """The three fine heads behind one interface: ŷ from bin probabilities (B×K) and a head output t ∈ [−1, 1]
    (B×K; the position and offset heads read its first column, their one output per image). The offset head's δ
    is t times twice the task range, so t = ±1 pushes the value to its bounds from anywhere."""

    def __init__(self, kind: str, task: TaskSpec) -> None:
        self.kind = kind
        self.reach = 2 * (task.high - task.low)
        self.module = {"ssr": lambda: FineRegressor(task.extents(), task.representatives()),
                       "position": lambda: PositionRegressor(WIDTH, task.extents(), task.representatives()),
                       "offset": lambda: OffsetRegressor(WIDTH, task.extents(), task.representatives())}[kind]()

    def readout(self, probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "ssr":
            return self.module.readout(probs, self.module.stretch(t))
        if self.kind == "offset":
            return self.module.readout(probs, self.reach * t[:, 0])
        return self.module.readout(probs, t[:, :1])


HEADS = ["ssr", "position", "offset"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("task", every_task(), ids=lambda t: t.name)
def test_certain_prediction_is_the_bins_representative(tiny_backbone, task: TaskSpec, head: str) -> None:
    """p = one-hot(k), head output 0: the fine head, the bin-prompt readout and the label of bin k all say the same."""
    certain = torch.eye(len(task.bins))
    values = Head(head, task).readout(certain, torch.zeros_like(certain))
    expected = torch.tensor([task.parse_label(name) for name in task.bin_names])
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-4 * (task.high - task.low))
    zeroshot = create_model("zeroshot", tiny_backbone, task)
    torch.testing.assert_close(certain @ zeroshot.representatives, expected)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("task", every_task(), ids=lambda t: t.name)
def test_fine_head_reaches_every_value_of_the_range_and_moves_bin_zero(task: TaskSpec, head: str) -> None:
    """Certain of bin k, the head sweeps the value over a span inside k's extent (the offset head: all of it); the
    spans start at the task's low end, end at its high end and follow each other, so mixing neighbours reaches every
    value in between. Bin 0 is not pinned (the reference's β₀ = 0 kept it at low₀ whatever Δ)."""
    fine = Head(head, task)
    certain = torch.eye(len(task.bins))
    down = torch.ones_like(certain) if head == "ssr" else -torch.ones_like(certain)  # SSR: larger Δ, lower anchor
    low_end, high_end = fine.readout(certain, down), fine.readout(certain, -down)
    reps = torch.tensor(task.representatives())
    assert (low_end < high_end).all() and (low_end <= reps).all() and (reps <= high_end).all()
    assert low_end[0].item() == pytest.approx(task.low, abs=1e-4) and high_end[-1].item() == pytest.approx(task.high)
    assert (low_end[1:] >= high_end[:-1]).all()  # ordered spans: any gaps between them are reached by mixing
    if head == "offset":
        torch.testing.assert_close(torch.stack([low_end, high_end], dim=1), torch.tensor(task.extents()))
    for k, (start, end) in enumerate(task.extents()):
        assert start - 1e-4 <= low_end[k] and high_end[k] <= end + 1e-4


@st.composite
def confident(draw: st.DrawFn, num_bins: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A bin k, probabilities with ≥ 0.9 on k and the rest on its neighbours, and any tanh output t ∈ [−1, 1]."""
    k = draw(st.integers(0, num_bins - 1))
    top = draw(st.floats(0.9, 1.0))
    below = draw(st.floats(0, 1)) if 0 < k < num_bins - 1 else float(k == num_bins - 1)
    probs = torch.zeros(num_bins, dtype=torch.float64)
    probs[k] = top
    if k > 0:
        probs[k - 1] = (1 - top) * below
    if k < num_bins - 1:
        probs[k + 1] = (1 - top) * (1 - below)
    t = torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=num_bins, max_size=num_bins)))
    return k, probs.float(), t.float()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("task", every_task(), ids=lambda t: t.name)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_confident_prediction_lands_inside_its_bin(task: TaskSpec, head: str, data: st.DataObject) -> None:
    """≥ 0.9 on bin k (the rest on its neighbours), any output the head can produce: the value lies in bin k's
    extent."""
    k, probs, t = data.draw(confident(len(task.bins)))
    value = Head(head, task).readout(probs[None], t[None]).item()
    start, end = task.extents()[k]
    slack = 1e-5 * (task.high - task.low)  # float32
    assert start - slack <= value <= end + slack, (k, probs, t, value)


@pytest.mark.parametrize("task", every_task(), ids=lambda t: t.name)
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(logits=st.lists(st.floats(-1e30, 1e30), min_size=5, max_size=5), weight=st.floats(-1e4, 1e4))
def test_fine_value_is_finite_and_in_range_for_any_logits_and_saturated_shift(task: TaskSpec, logits: list[float],
                                                                                weight: float) -> None:
    """Huge logits, a saturated tanh (Δ at its bound, the reference's 0/0 at Δ = −1; t at ±1) and a huge offset
    give a finite value in the task range, from every head."""
    ssr = FineRegressor(task.extents(), task.representatives())
    position = PositionRegressor(WIDTH, task.extents(), task.representatives())
    offset = OffsetRegressor(WIDTH, task.extents(), task.representatives())
    with torch.no_grad():
        for layer in [*ssr.shift, position.position, offset.offset]:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(weight)
                layer.bias.fill_(-weight)
        row = torch.tensor([logits[:len(task.bins)]])
        features = nn.functional.normalize(torch.arange(1.0, WIDTH + 1)[None], dim=-1)
        values = [ssr(row).item(), position(features, row).item(), offset(features, row).item()]
    slack = 1e-5 * (task.high - task.low)
    for value in values:
        assert math.isfinite(value) and task.low - slack <= value <= task.high + slack


@pytest.mark.parametrize("method", NUMCLIP_METHODS)
def test_gradients_reach_prompts_and_heads_but_not_the_frozen_text_tower(tiny_backbone, batch, method: str) -> None:
    model = create_model(method, tiny_backbone, get_task("age"))
    out = model(batch)
    (out.value.sum() + out.logits.square().mean()).backward()
    learned = {
        "prompt.context": [model.prompt.context],
        "prompt.words": [model.prompt.words],
        "regressor": list(model.regressor.parameters()),
        **({"adapter": list(model.adapter.parameters())} if method == "numclip-ssr" else {}),
    }
    for name, params in learned.items():
        assert params, name
        for p in params:
            assert p.requires_grad, name
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in params), f"no gradient reaches {name}"
    clip = tiny_backbone.model
    frozen = [clip.token_embedding.weight, clip.positional_embedding, clip.text_projection,
              *clip.transformer.parameters(), *clip.ln_final.parameters(), *clip.visual.parameters()]
    for p in frozen:
        assert not p.requires_grad and p.grad is None
    groups = model.trainable_groups()
    assert groups["context"][0] is model.prompt.context and groups["words"][0] is model.prompt.words
    assert {id(p) for p in groups["head"]} == {id(p) for name in ("regressor", "adapter") if hasattr(model, name)
                                               for p in getattr(model, name).parameters()}


def test_zero_shot_has_nothing_to_train(tiny_backbone) -> None:
    model = create_model("zeroshot", tiny_backbone, get_task("hci"))
    assert model.trainable_groups() == {}
    assert not any(p.requires_grad for p in model.parameters())


def test_prompt_words_have_variable_token_lengths(tiny_backbone) -> None:
    """'young adult' is two tokens, 'child' one: every bin keeps exactly its own word positions."""
    task = get_task("age")
    model = create_model("numclip", tiny_backbone, task)
    lengths = [len(tiny_backbone.tokenizer.encode(name)) for name in task.bin_names]
    assert model.prompt.word_lengths.tolist() == lengths
    assert model.prompt.words.shape[0] == sum(lengths)
    assert model.prompt.context.shape[0] == len(tiny_backbone.tokenizer.encode(task.prompt.split("{}")[0]))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "width"), [("ViT-B-32", 512), ("RN50", 1024)])
def test_embedding_width_comes_from_the_backbone(name: str, width: int) -> None:
    """Random-init ViT-B-32 (512-d) and RN50 (1024-d): one forward pass on a single image each."""
    torch.manual_seed(0)
    backbone = load_backbone(name, "none")
    task = get_task("age")
    model = create_model("numclip", backbone, task).eval()
    assert model.embed_dim == width
    assert model.regressor.offset.in_features == width
    with torch.no_grad():
        features = model.text_features()
        out = model(images(backbone, n=1), features)
    torch.testing.assert_close(features, reference_text_features(backbone, task), atol=1e-5, rtol=1e-5)
    assert out.logits.shape == (1, len(task.bins)) and out.value.shape == (1,)
    assert torch.isfinite(out.value).all()
