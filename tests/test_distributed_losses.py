"""Data-parallel exactness of every training objective ("local loss, gather with grad").

Two gloo processes on 127.0.0.1, each holding the same initialisation wrapped as `DDP(TrainingLoss(model,
objectives))` and one half of a fixed batch of 8, run one forward and backward per objective set. The reference is
one process computing `TrainingLoss` on the whole batch. The global loss and every term, and the DDP-averaged
gradient of every parameter (model and objectives), must match the reference within 1e-5; the plain contrastive
loss is also checked, rank by rank, against open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`, and the
sigmoid loss (gathered text columns) against open_clip's `SigLipLoss(rank, world_size)`, which passes the texts
between neighbouring ranks instead.

BatchNorm keeps per-rank batch statistics under DDP (SyncBatchNorm needs CUDA), so the tiny model's BatchNorm layers
run in eval mode (running statistics) while everything else trains; the rest of the model has no batch statistics.
All ranks and objective sets run in one spawn, float64 (about 25 s on two idle cores).
"""
from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightclip_core.config import Config
from lightclip_core.losses.instance import LOSSES, ContrastiveObjective
from lightclip_core.losses.mlm import MaskedLanguageObjective, selected_rows
from lightclip_core.losses.objective import TrainingLoss, build_objectives
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import tokenize, trim_padding

WORLD = 2
MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
         "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 3}}
CAPTIONS = [
    "a photo of a red circle on a blue background", "two green triangles next to a small yellow star",
    "a purple square", "an orange ellipse at the bottom left of the picture with some noise around it",
    "cat and dog", "a large white hexagon in the middle of a dark grey field", "three blue dots",
    "a tiny black star above a pink rectangle on the right",
]
SYNTHETIC = ["a red round shape", "green shapes and a star", "a violet box", "an orange oval with noise",
             "two pets", "a white hexagon on grey", "blue dots", "a star over a pink box"]
REINFORCEMENT = {"dims": [8, 12], "scales": [100.0, 50.0]}
STEP, TOTAL_STEPS = 1, 4
OFF = {"enabled": False}
PLAIN = {"soft_targets": "none"}
UNIFORM = {"soft_targets": "uniform", "eps_schedule": "linear", "eps_start": 0.1, "eps_end": 0.4}
SIMILARITY = {"soft_targets": "similarity", "similarity_source": "online", "eps_start": 0.2, "eps_end": 0.2,
              "eps_schedule": "constant", "similarity_temperature": 0.5}
EMA = {**SIMILARITY, "similarity_source": "ema", "ema_momentum": 0.9}
# stride 8 at 32 px: 16 patches, so that captions match different numbers of words (a data-dependent count)
TOKEN = {"enabled": True, "image_stride": 8, "matcher": "hungarian", "loss": "softmax", "weight": 2.0}
# fraction 3/8 of 8 pairs reads global indices 0, 2, 5: two pairs on rank 0, one on rank 1
MLM = {"enabled": True, "mask_prob": 0.4, "batch_fraction": 0.375, "weight": 1.5,
       "fusion": [{"text_layer": 0, "image_stride": 8}, {"text_layer": 1, "image_stride": 16},
                  {"text_layer": 2, "image_stride": 32}]}
DISTILL = {"lam": 0.5, "caption_batches": "both", "weight": 0.7}
MAX_VIOLATION = {"loss": "max_violation", "margin": 0.2, "soft_targets": "none"}
SUM_HINGE = {"loss": "sum_hinge", "margin": 0.1, "soft_targets": "none"}  # about 85% of the hinges active
SIGMOID = {"loss": "sigmoid", "soft_targets": "none"}
# cases whose model differs from MODEL: the sigmoid loss needs the model's learnable bias
MODELS = {"sigmoid": {**MODEL, "init_logit_bias": -10.0}}
# objective set -> (objectives section, whether some parameters get no gradient: DDP must look for them)
CASES = {
    "contrastive": ({"contrastive": PLAIN, "token": OFF, "mlm": OFF, "distill": OFF}, False),
    "soft_uniform": ({"contrastive": UNIFORM, "token": OFF, "mlm": OFF, "distill": OFF}, False),
    "soft_similarity_online": ({"contrastive": SIMILARITY, "token": OFF, "mlm": OFF, "distill": OFF}, False),
    "soft_similarity_ema": ({"contrastive": EMA, "token": OFF, "mlm": OFF, "distill": OFF}, False),
    "token": ({"contrastive": OFF, "token": TOKEN, "mlm": OFF, "distill": OFF}, True),
    "mlm": ({"contrastive": OFF, "token": OFF, "mlm": MLM, "distill": OFF}, True),
    # fraction 1/8 reads global index 0 only: rank 1 has nothing to predict
    "mlm_one_rank_reads_nothing": ({"contrastive": OFF, "token": OFF, "mlm": {**MLM, "batch_fraction": 0.125},
                                    "distill": OFF}, True),
    # with distillation on, the contrastive section is CLIP's part of its loss (one instance-level term)
    "distill": ({"contrastive": PLAIN, "token": OFF, "mlm": OFF, "distill": DISTILL}, False),
    # the hinges read the cosine only: the logit scale gets no gradient
    "max_violation": ({"contrastive": MAX_VIOLATION, "token": OFF, "mlm": OFF, "distill": OFF}, True),
    "sum_hinge": ({"contrastive": SUM_HINGE, "token": OFF, "mlm": OFF, "distill": OFF}, True),
    "sigmoid": ({"contrastive": SIGMOID, "token": OFF, "mlm": OFF, "distill": OFF}, False),
    "all": ({"contrastive": EMA, "token": TOKEN, "mlm": MLM, "distill": DISTILL}, False),
}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


# ------------------------------------------------------------------------------------ one objective set, any rank
def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    b = len(CAPTIONS)

    def teachers(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([F.normalize(torch.randn(b, d, generator=g), dim=-1) for d in REINFORCEMENT["dims"]],
                         1).half()

    return {"images": torch.randn(b, 3, 32, 32, generator=gen, dtype=torch.float64),
            "tokens": tokenize(CAPTIONS, MODEL["text"]["context_length"]),
            "extras": {"syn_tokens": tokenize(SYNTHETIC, MODEL["text"]["context_length"]),
                       "teacher_image_emb": teachers(10), "teacher_text_emb": teachers(20),
                       "teacher_syn_text_emb": teachers(30)}}


def _rows(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's consecutive share of the batch, captions trimmed to its own longest one (as the trainer does)."""
    b = batch["images"].shape[0] // world_size
    part = slice(rank * b, (rank + 1) * b)
    return {"images": batch["images"][part], "tokens": trim_padding(batch["tokens"][part]),
            "extras": {k: v[part] for k, v in batch["extras"].items()}}


def _training_loss(case: str) -> TrainingLoss:
    """The same initialisation in every process: model, objectives, an EMA copy that differs from the model, fusion
    blocks that are not the identity; BatchNorm in eval mode, everything else training."""
    objectives, _ = CASES[case]
    cfg = Config.model_validate({"model": MODELS.get(case, MODEL), "objectives": objectives})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    module = TrainingLoss(model, build_objectives(cfg, model, REINFORCEMENT))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for objective in module.objectives.modules():  # with distillation on, the contrastive one is inside it
            if isinstance(objective, ContrastiveObjective) and objective.ema is not None:
                for p in objective.ema.module.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            if isinstance(objective, MaskedLanguageObjective):
                for block in objective.fusion:
                    block.attn.out_proj.weight.copy_(0.3 * torch.randn(block.attn.out_proj.weight.shape, generator=gen))
    module.double().train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def _step(module: nn.Module, rows: dict) -> tuple[torch.Tensor, dict[str, float]]:
    total, terms, _ = module(rows["images"], rows["tokens"], STEP, TOTAL_STEPS, rows["extras"])
    total.backward()
    return total.detach(), terms


def _grads(module: TrainingLoss) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient (zeros where none arrived)."""
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.to_dense()).detach().clone()
            for n, p in module.named_parameters() if p.requires_grad}


def _open_clip_comparison(rank: int) -> dict[str, torch.Tensor]:
    """Our contrastive objective and open_clip's ClipLoss (local loss, gather with grad) on this rank's slice of the
    same random features: the local loss and the gradients each sends to this rank's features and scale."""
    gen = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)[rank * 4:(rank + 1) * 4]
    text = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)[rank * 4:(rank + 1) * 4]
    out = {}
    for tag in ("ours", "open_clip"):
        img, txt, scale = (t.clone().requires_grad_() for t in (image, text, torch.tensor(14.0)))
        if tag == "ours":
            loss = ContrastiveObjective()({"image_features": img, "text_features": txt, "logit_scale": scale})[
                "contrastive_loss"]
        else:
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)(img, txt, scale)
        loss.backward()
        out.update({f"{tag}_loss": loss.detach(), f"{tag}_image_grad": img.grad, f"{tag}_text_grad": txt.grad,
                    f"{tag}_scale_grad": scale.grad})
    return out


def _siglip_features() -> tuple[torch.Tensor, ...]:
    """The whole batch's features (float64, normalised), scale (the multiplier) and bias for the SigLIP comparison."""
    gen = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(8, 16, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(8, 16, generator=gen, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def _siglip_comparison(rank: int) -> dict[str, torch.Tensor]:
    """Our sigmoid objective (this rank's images against the gathered texts) and open_clip's SigLipLoss (texts passed
    between neighbouring ranks) on this rank's slice of the same features: the rank's loss and the gradients each
    sends to this rank's features, the scale and the bias."""
    image, text, scale, bias = _siglip_features()
    part = slice(rank * 4, (rank + 1) * 4)
    out = {}
    for tag in ("ours", "open_clip"):
        img, txt, s, b = (t.clone().requires_grad_() for t in (image[part], text[part], scale, bias))
        if tag == "ours":
            loss = ContrastiveObjective(soft_targets="none", loss="sigmoid")(
                {"image_features": img, "text_features": txt, "logit_scale": s, "logit_bias": b})["contrastive_loss"]
        else:
            loss = SigLipLoss(rank=rank, world_size=WORLD)(img, txt, s, b)
        loss.backward()
        out.update({f"{tag}_loss": loss.detach(), f"{tag}_image_grad": img.grad, f"{tag}_text_grad": txt.grad,
                    f"{tag}_scale_grad": s.grad, f"{tag}_bias_grad": b.grad})
    return out


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results: dict = {"open_clip": _open_clip_comparison(rank), "siglip": _siglip_comparison(rank)}
        batch = _rows(_batch(), rank, world_size)
        for case, (_, some_unused) in CASES.items():
            module = _training_loss(case)
            total, terms = _step(DDP(module, find_unused_parameters=some_unused), batch)
            results[case] = {"total": total, "terms": terms, "grads": _grads(module)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(case: str, batch: dict) -> dict:
    module = _training_loss(case)
    total, terms = _step(module, batch)
    return {"total": total, "terms": terms, "grads": _grads(module)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict[str, dict]]:
    """(both ranks' results {case: {total, terms, grads}, "open_clip": {...}}, the single-process references on the
    whole batch {case: {total, terms, grads}}); the references are computed here while the ranks run."""
    out = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_rank_main, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = _rows(_batch(), 0, 1)
        references = {case: _reference(case, batch) for case in CASES}
    finally:
        torch.set_num_threads(before)
        while not context.join():
            pass
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], references


@pytest.fixture(scope="module")
def ranks(runs) -> list[dict]:
    return runs[0]


@pytest.fixture(scope="module")
def references(runs) -> dict[str, dict]:
    return runs[1]


# ------------------------------------------------------------------------------------ the checks
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_loss_and_terms(case, ranks, references):
    ref = references[case]
    assert ref["terms"]["loss"] == pytest.approx(float(ref["total"]), rel=1e-12)
    local_totals = [float(r[case]["total"]) for r in ranks]
    assert sum(local_totals) / WORLD == pytest.approx(float(ref["total"]), rel=1e-5, abs=1e-5)
    for r in ranks:
        assert set(r[case]["terms"]) == set(ref["terms"])
        for name, value in ref["terms"].items():
            assert r[case]["terms"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_gradients(case, ranks, references):
    ref = references[case]["grads"]
    reached = {n for n, g in ref.items() if g.abs().sum() > 0}  # the comparison is not between zeros:
    assert {n for n in ref if n.startswith("objectives.")} <= reached  # every objective parameter,
    assert len([n for n in reached if n.startswith("model.")]) >= 0.4 * len(ref)  # and much of the model
    for rank, r in enumerate(ranks):
        assert set(r[case]["grads"]) == set(ref)
        off = {name: float((r[case]["grads"][name] - grad).abs().max()) for name, grad in ref.items()
               if not torch.allclose(r[case]["grads"][name], grad, **TOLERANCE)}
        assert not off, f"rank {rank}: {len(off)} of {len(ref)} gradients differ (max abs difference): {off}"


def test_every_objective_parameter_is_covered():
    """The cases above reach the parameters of each objective and the masked pass reads pairs on both ranks
    (two on rank 0, one on rank 1) in "mlm", on rank 0 only in "mlm_one_rank_reads_nothing"."""
    module = _training_loss("all")
    trained = {n.split(".")[1] for n, p in module.named_parameters() if n.startswith("objectives.") and p.requires_grad}
    assert [o.name for o in module.objectives] == ["token", "mlm", "distill"]  # contrastive: distill's CLIP part
    assert module.objectives[2].clip.ema is not None
    # token (projections), mlm (fusion, head, mask row), distill (the feature distillation's projections, on by
    # default); contrastive's EMA is frozen
    assert trained == {"0", "1", "2"}
    losses = {o["contrastive"].get("loss", "infonce") for o, _ in CASES.values() if o["contrastive"] is not OFF}
    assert losses == set(LOSSES)  # every instance-level loss has a case
    assert "logit_bias" in dict(_training_loss("sigmoid").model.named_parameters())
    assert [selected_rows(4 * r, 4, MLM["batch_fraction"]) for r in range(WORLD)] == [[0, 2], [1]]
    assert [selected_rows(4 * r, 4, 0.125) for r in range(WORLD)] == [[0], []]


def test_contrastive_matches_open_clip_local_loss_with_gathered_features(ranks):
    for r in ranks:
        got = r["open_clip"]
        for what in ("loss", "image_grad", "text_grad", "scale_grad"):
            torch.testing.assert_close(got[f"ours_{what}"], got[f"open_clip_{what}"], rtol=1e-6, atol=1e-7)
        assert got["ours_image_grad"].abs().sum() > 0


def test_sigmoid_matches_open_clip_siglip_with_neighbour_exchange(ranks):
    for r in ranks:
        got = r["siglip"]
        for what in ("loss", "image_grad", "text_grad", "scale_grad", "bias_grad"):
            torch.testing.assert_close(got[f"ours_{what}"], got[f"open_clip_{what}"], rtol=1e-10, atol=1e-12,
                                       msg=what)
        assert got["ours_text_grad"].abs().sum() > 0 and got["ours_bias_grad"] != 0


def test_sigmoid_rank_losses_average_to_single_process_siglip(ranks):
    """The mean over ranks of the rank losses is open_clip's SigLipLoss on the whole batch in one process, and the mean
    of the ranks' scale and bias gradients is its gradient."""
    image, text, scale, bias = _siglip_features()
    scale, bias = scale.requires_grad_(), bias.requires_grad_()
    whole = SigLipLoss(rank=0, world_size=1)(image, text, scale, bias)
    whole.backward()
    mean = sum(r["siglip"]["ours_loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean, whole.detach(), rtol=1e-12, atol=1e-12)
    for name, leaf in (("scale", scale), ("bias", bias)):
        torch.testing.assert_close(sum(r["siglip"][f"ours_{name}_grad"] for r in ranks) / WORLD, leaf.grad,
                                   rtol=1e-12, atol=1e-12, msg=name)
