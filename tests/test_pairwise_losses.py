"""The instance-level losses other than InfoNCE (losses/pairwise.py), each against an independent reference.

- VSE++'s hinges (max_violation, sum_hinge) against a brute-force Python double loop over the pairs, written here
  from the definition (Faghri et al.): values at several margins, the data-parallel row form (rows offset..offset+b
  of a global batch against all its columns) and gradients (autograd through the loop).
- SigLIP's sigmoid loss against open_clip's `SigLipLoss` (single process): value and gradients to the features, the
  scale and the bias; and the mean of its rank-row forms equals the whole batch's value.
- `ContrastiveObjective(loss=...)` dispatches to these functions; the config refuses the inconsistent combinations;
  the model's `logit_bias` exists exactly when configured, stays out of weight decay, trains and survives export.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from pydantic import ValidationError

from lightclip_core.config import Config, ConfigError, load_config
from lightclip_core.losses.instance import ContrastiveObjective
from lightclip_core.losses.pairwise import hinge_loss, sigmoid_loss
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import tokenize
from lightclip_core.train.trainer import build_optimizer

PARAMS = "params.yaml"
KINDS = ("max_violation", "sum_hinge")
MARGINS = (0.05, 0.2, 0.5, 1.0)
TINY_MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
SIGMOID = {"loss": "sigmoid", "soft_targets": "none"}


def features(n: int, d: int = 8, seed: int = 0, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float64 image and text features; text i leans towards image i (so that some hinges are inactive
    and some active)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return image, text


# ------------------------------------------------------------------------------------------------ the reference
def brute_force_hinge(image: torch.Tensor, text: torch.Tensor, margin: float, kind: str,
                      rows: range | None = None) -> torch.Tensor:
    """VSE++ by the definition, one pair at a time: for image i, [margin - s(i, i) + s(i, j)]_+ over texts j != i;
    for text i, [margin - s(i, i) + s(j, i)]_+ over images j != i; per row the max (max_violation) or the sum
    (sum_hinge); the loss is the mean over the chosen rows (default: all) of image row + text row."""
    n = image.shape[0]
    rows = range(n) if rows is None else rows

    def s(i: int, j: int) -> torch.Tensor:  # cosine of image i and text j
        return (image[i] * text[j]).sum()

    def reduce(costs: list[torch.Tensor]) -> torch.Tensor:
        if kind == "max_violation":
            best = costs[0]
            for c in costs[1:]:
                best = torch.maximum(best, c)
            return best
        return sum(costs[1:], costs[0])

    total = torch.zeros((), dtype=image.dtype)
    for i in rows:
        image_row = [torch.clamp(margin - s(i, i) + s(i, j), min=0) for j in range(n) if j != i]
        text_row = [torch.clamp(margin - s(i, i) + s(j, i), min=0) for j in range(n) if j != i]
        total = total + reduce(image_row) + reduce(text_row)
    return total / len(rows)


# ------------------------------------------------------------------------------------------------ hinges
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("margin", MARGINS)
def test_hinge_equals_the_pairwise_definition(kind, margin):
    image, text = features(7, seed=1)
    expected = brute_force_hinge(image, text, margin, kind)
    got = hinge_loss(image, text, margin, kind)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert expected > 0


def test_the_references_cover_inactive_and_active_hinges():
    """At margin 0.2 the fixture has hinges both at zero and positive, so the clamp is exercised."""
    image, text = features(7, seed=1)
    sim = image @ text.T
    cost = (0.2 - sim.diag().unsqueeze(1) + sim).masked_fill(torch.eye(7, dtype=torch.bool), float("nan"))
    active = cost[~cost.isnan()] > 0
    assert active.any() and (~active).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset,b", [(0, 4), (4, 4), (2, 3), (7, 1)])
def test_hinge_rows_of_a_global_batch_equal_those_rows_of_the_definition(kind, offset, b):
    image, text = features(8, seed=2)
    rows = slice(offset, offset + b)
    got = hinge_loss(image[rows], text[rows], 0.3, kind, all_image_features=image, all_text_features=text,
                     offset=offset)
    torch.testing.assert_close(got, brute_force_hinge(image, text, 0.3, kind, range(offset, offset + b)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_hinge_rank_rows_average_to_the_whole_batch(kind):
    image, text = features(8, seed=3)
    parts = [hinge_loss(image[r:r + 4], text[r:r + 4], 0.2, kind, all_image_features=image, all_text_features=text,
                        offset=r) for r in (0, 4)]
    torch.testing.assert_close(sum(parts) / 2, hinge_loss(image, text, 0.2, kind), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_hinge_gradients_equal_autograd_of_the_definition(kind):
    image0, text0 = features(6, seed=4)
    grads = []
    for fn in (lambda i, t: hinge_loss(i, t, 0.4, kind), lambda i, t: brute_force_hinge(i, t, 0.4, kind)):
        image, text = image0.clone().requires_grad_(), text0.clone().requires_grad_()
        fn(image, text).backward()
        grads.append((image.grad, text.grad))
    (gi, gt), (ri, rt) = grads
    torch.testing.assert_close(gi, ri, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, rt, rtol=1e-12, atol=1e-12)
    assert ri.abs().sum() > 0 and rt.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_hinge_gradients_of_rank_rows_equal_autograd_of_the_definition(kind):
    """The data-parallel form: gradients reach the global columns as well as this rank's rows."""
    image0, text0 = features(6, seed=5)
    grads = []
    for use_ours in (True, False):
        image, text = image0.clone().requires_grad_(), text0.clone().requires_grad_()
        if use_ours:
            loss = hinge_loss(image[2:5], text[2:5], 0.3, kind, all_image_features=image, all_text_features=text,
                              offset=2)
        else:
            loss = brute_force_hinge(image, text, 0.3, kind, range(2, 5))
        loss.backward()
        grads.append((image.grad, text.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_hinge_refuses_bad_arguments():
    image, text = features(4)
    with pytest.raises(ValueError, match="margin"):
        hinge_loss(image, text, 0.0)
    with pytest.raises(ValueError, match="kind"):
        hinge_loss(image, text, 0.2, "hinge")
    with pytest.raises(ValueError, match="do not lie within"):
        hinge_loss(image, text, 0.2, all_image_features=image, all_text_features=text, offset=1)


# ------------------------------------------------------------------------------------------------ sigmoid
def _sigmoid_pair(n: int = 6, seed: int = 6, scale: float = 10.0, bias: float = -3.0):
    image, text = features(n, d=8, seed=seed, noise=0.8)
    return image, text, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)


@pytest.mark.parametrize("scale,bias", [(10.0, -3.0), (1.0, 0.0), (30.0, -10.0)])
def test_sigmoid_equals_open_clip_siglip_values_and_gradients(scale, bias):
    inputs = _sigmoid_pair(scale=scale, bias=bias)
    results = []
    for fn in (sigmoid_loss, SigLipLoss(rank=0, world_size=1)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(t.grad for t in leaves)))
    for name, ours, theirs in zip(("loss", "image", "text", "scale", "bias"), *results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=name)
        assert ours.abs().sum() > 0, name


def test_sigmoid_rank_rows_against_all_texts_average_to_open_clip_on_the_whole_batch():
    image, text, scale, bias = _sigmoid_pair(n=8)
    parts = [sigmoid_loss(image[r:r + 4], text[r:r + 4], scale, bias, all_text_features=text, offset=r)
             for r in (0, 4)]
    torch.testing.assert_close(sum(parts) / 2, SigLipLoss()(image, text, scale, bias), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the objective
def _outputs(with_bias: bool = True) -> dict[str, torch.Tensor]:
    image, text, scale, bias = _sigmoid_pair()
    out = {"image_features": image, "text_features": text, "logit_scale": scale}
    if with_bias:
        out["logit_bias"] = bias
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_objective_runs_the_chosen_hinge(kind):
    out = _outputs(with_bias=False)
    terms = ContrastiveObjective(soft_targets="none", loss=kind, margin=0.35)(out)
    assert set(terms) == {"contrastive_loss"}
    expected = brute_force_hinge(out["image_features"], out["text_features"], 0.35, kind)
    torch.testing.assert_close(terms["contrastive_loss"], expected, rtol=1e-12, atol=1e-12)


def test_objective_runs_the_sigmoid_loss_and_reports_the_bias():
    out = _outputs()
    terms = ContrastiveObjective(soft_targets="none", loss="sigmoid")(out)
    expected = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    torch.testing.assert_close(terms["contrastive_loss"], expected, rtol=1e-12, atol=1e-12)
    assert float(terms["logit_bias"]) == -3.0


def test_objective_sigmoid_without_a_bias_is_refused():
    with pytest.raises(ValueError, match="logit bias"):
        ContrastiveObjective(soft_targets="none", loss="sigmoid")(_outputs(with_bias=False))


@pytest.mark.parametrize("loss", ["max_violation", "sum_hinge", "sigmoid"])
@pytest.mark.parametrize("soft", ["uniform", "similarity"])
def test_objective_soft_targets_need_infonce(loss, soft):
    with pytest.raises(ValueError, match="soft targets"):
        ContrastiveObjective(soft_targets=soft, loss=loss)


def test_objective_refuses_an_unknown_loss():
    with pytest.raises(ValueError, match="loss must be one of"):
        ContrastiveObjective(soft_targets="none", loss="hinge")


# ------------------------------------------------------------------------------------------------ config, model
def test_config_sigmoid_needs_a_bias():
    with pytest.raises(ConfigError, match="model.init_logit_bias=None"):
        load_config(PARAMS, ["objectives.contrastive.loss=sigmoid", "objectives.contrastive.soft_targets=none"])
    with pytest.raises(ValidationError, match="init_logit_bias"):
        Config.model_validate({"objectives": {"contrastive": SIGMOID}})


def test_config_a_bias_needs_the_sigmoid_loss():
    with pytest.raises(ConfigError, match="model.init_logit_bias=-10"):
        load_config(PARAMS, ["model.init_logit_bias=-10"])
    with pytest.raises(ValidationError, match="init_logit_bias"):
        Config.model_validate({"model": {"init_logit_bias": -10.0},
                               "objectives": {"contrastive": {"loss": "infonce", "soft_targets": "none"}}})
    with pytest.raises(ValidationError, match="init_logit_bias"):  # a disabled contrastive objective trains no bias
        Config.model_validate({"model": {"init_logit_bias": -10.0},
                               "objectives": {"contrastive": {**SIGMOID, "enabled": False}}})


def test_config_soft_targets_need_infonce():
    with pytest.raises(ConfigError, match="soft_targets='uniform'.*max_violation"):
        load_config(PARAMS, ["objectives.contrastive.loss=max_violation",
                             "objectives.contrastive.soft_targets=uniform"])
    with pytest.raises(ValidationError, match="softens InfoNCE"):
        Config.model_validate({"objectives": {"contrastive": {"loss": "sum_hinge", "soft_targets": "similarity"}}})


def test_config_accepts_sigmoid_with_a_bias_and_hinges_without():
    cfg = load_config(PARAMS, ["objectives.contrastive.loss=sigmoid", "objectives.contrastive.soft_targets=none",
                               "model.init_logit_bias=-10"])
    assert cfg.objectives.contrastive.loss == "sigmoid" and cfg.model.init_logit_bias == -10.0
    cfg = Config.model_validate({"objectives": {"contrastive": {"loss": "sum_hinge", "soft_targets": "none",
                                                                "margin": 0.5}}})
    assert cfg.objectives.contrastive.margin == 0.5 and cfg.model.init_logit_bias is None


def _tiny_forward(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=gen), tokenize(["a red circle", "a star"], 16))


def test_model_with_a_bias_has_it_learnable_outside_weight_decay():
    cfg = Config.model_validate({"model": {**TINY_MODEL, "init_logit_bias": -10.0},
                                 "objectives": {"contrastive": SIGMOID}})
    model = build_model(cfg.model)
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.requires_grad
    assert model.logit_bias.item() == -10.0 and model.logit_bias.shape == ()
    assert "logit_bias" in model.no_weight_decay()
    groups = build_optimizer(model, cfg).param_groups
    [group] = [g for g in groups if any(p is model.logit_bias for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] > 0 for g in groups)  # decay exists, the bias is just not in it
    out = _tiny_forward(model)
    assert out["logit_bias"] is model.logit_bias


def test_model_without_a_bias_has_none():
    model = build_model(Config.model_validate({"model": TINY_MODEL}).model)
    assert model.logit_bias is None
    assert "logit_bias" not in dict(model.named_parameters()) and "logit_bias" not in model.state_dict()
    assert "logit_bias" not in _tiny_forward(model)


# ------------------------------------------------------------------------------------------------ training, export
def test_the_bias_trains_and_survives_export(tmp_path):
    """A few real training steps with the sigmoid loss move the bias off its initial value; the final checkpoint and
    the export (loaded as the inference API loads it) hold the same trained value."""
    from lightclip_core.data.prepare import prepare
    from lightclip_core.export.exporter import export
    from lightclip_core.export.load import load_exported
    from lightclip_core.train.checkpoint import load_checkpoint
    from lightclip_core.train.trainer import train

    off = {"enabled": False}
    cfg = Config.model_validate({
        "data": {"samples_per_shard": 32, "synthetic": {"num_train": 32, "num_val": 8, "num_test": 8,
                                                        "image_size": 32}},
        "model": {**TINY_MODEL, "init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)},
        "objectives": {"contrastive": SIGMOID, "token": off, "mlm": off, "distill": off},
        "train": {"batch_size": 16, "max_steps": 3, "warmup_steps": 1, "lr": 1e-2, "checkpoint_every": 100,
                  "workers": 0, "shuffle_buffer": 16, "threads": 1},
        "export": {"onnx": False, "parity_batch": 2},
        "tracking": {"enabled": False},
    })
    prepare(cfg.data, tmp_path / "data")
    result = train(cfg, tmp_path / "data" / "train", tmp_path / "run")
    trained = load_checkpoint(result.final_checkpoint)["model"]["logit_bias"]
    assert trained.shape == () and float(trained) != -10.0 and math.isfinite(float(trained))
    export(cfg, result.final_checkpoint, tmp_path / "export")
    loaded = load_exported(tmp_path / "export")
    assert loaded.config["model_config"]["init_logit_bias"] == -10.0
    assert isinstance(loaded.model.logit_bias, torch.nn.Parameter)
    assert torch.equal(loaded.model.logit_bias.detach(), trained)
