"""The training objectives (LightCLIP): masked language modelling with multi-level image-text fusion checked against
hand-written references (masked positions only, BERT's 80/10/10, identity fusion at init, tied head, causal
option), training-only parameters that never reach `final.pt` or an export, the objective API of the trainer
(weighted sum, log columns, switching objectives off, field-naming errors) and the EMA similarity source."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightclip_core.config import Config, ConfigError, validate
from lightclip_core.data.prepare import prepare
from lightclip_core.export.exporter import export, model_from_checkpoint
from lightclip_core.export.load import load_exported
from lightclip_core.losses import StepContext
from lightclip_core.losses.instance import ContrastiveObjective, eps_at
from lightclip_core.losses.fusion import FusionBlock
from lightclip_core.losses.mlm import MaskedLanguageObjective, mask_tokens
from lightclip_core.losses.objective import TrainingLoss, build_objectives, forward_needs
from lightclip_core.models import build_model
from lightclip_core.models.tokenizer import special_token_ids, tokenize, trim_padding, vocab_size, word_mask
from lightclip_core.train.checkpoint import list_checkpoints, load_checkpoint
from lightclip_core.train.trainer import TrainingDiverged, build_optimizer, train

MODEL = {"embed_dim": 16, "image": {"tower": "mobilenetv2_050", "size": 32},
         "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 4}}
# mobilenetv2_050 at 32 px: stride 8 -> 16 channels (4x4), stride 16 -> 48 (2x2), stride 32 -> 160 (1x1)
FUSION = [(0, 8), (2, 16), (3, 32)]
OBJECTIVES = {
    "distill": {"enabled": False},  # plain shards here; distillation is tested in test_distill.py / test_reinforce.py
    "contrastive": {"weight": 0.5, "soft_targets": "uniform", "eps_schedule": "linear", "eps_start": 0.05,
                    "eps_end": 0.2},
    "token": {"enabled": True, "weight": 2.0, "image_stride": 16},
    "mlm": {"enabled": True, "weight": 1.5, "mask_prob": 0.15, "causal": False, "batch_fraction": 1.0,
            "fusion": [{"text_layer": layer, "image_stride": stride} for layer, stride in FUSION]},
}
TINY = {
    "data": {"samples_per_shard": 32, "synthetic": {"num_train": 32, "num_val": 4, "num_test": 4, "image_size": 32}},
    "model": MODEL,
    "train": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "checkpoint_every": 2, "keep_checkpoints": 2,
              "workers": 0, "shuffle_buffer": 16, "threads": 1},
    "objectives": OBJECTIVES,
    "export": {"onnx": False, "parity_batch": 2},
    "tracking": {"enabled": False},
}
CAPTIONS = [
    "a photo of a red circle on a blue background",
    "two green triangles next to a small yellow star",
    "a purple square",
    "an orange ellipse at the bottom left of the picture with some noise around it",
    "cat and dog",
    "a large white hexagon in the middle of a dark grey field",
]
SOT, EOT = special_token_ids()["sot"], special_token_ids()["eot"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**objectives: dict) -> Config:
    """TINY with some objective sections replaced (merged into the defaults of TINY's objectives)."""
    merged = {name: {**OBJECTIVES[name], **objectives.get(name, {})} for name in OBJECTIVES}
    return Config.model_validate({**TINY, "objectives": merged})


@pytest.fixture
def setup():
    """A tiny model in eval mode, its objectives (contrastive, token, mlm), a batch and the model's outputs."""
    cfg = config()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    objectives = build_objectives(cfg, model)
    tokens = trim_padding(tokenize(CAPTIONS, cfg.model.text.context_length))
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    outputs = model(images, tokens, **forward_needs(objectives))
    return cfg, model, objectives, images, tokens, outputs


def _mlm(objectives) -> MaskedLanguageObjective:
    mlm = objectives[-1]
    assert isinstance(mlm, MaskedLanguageObjective)
    return mlm


def _randomise_fusion(mlm: MaskedLanguageObjective) -> None:
    """Give the fusion blocks a non-zero output projection, so that the fused pass differs from the plain one."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for block in mlm.fusion:
            block.attn.out_proj.weight.copy_(0.3 * torch.randn(block.attn.out_proj.weight.shape, generator=gen))
            block.attn.out_proj.bias.copy_(0.1 * torch.randn(block.attn.out_proj.bias.shape, generator=gen))


def _hand_pass(model, mlm: MaskedLanguageObjective, inputs, use_mask_row, image_maps, causal: bool,
               fused: bool = True) -> torch.Tensor:
    """The masked pass written out from the config's fusion points (not the objective's own bookkeeping)."""
    blocks = dict(zip(FUSION, mlm.fusion))

    def after_layer(i: int, x: torch.Tensor) -> torch.Tensor:
        for (layer, stride), block in blocks.items():
            if layer == i:
                x = block(x, image_maps[stride][:x.shape[0]])
        return x

    return model.text.forward_tokens(inputs, replace=(use_mask_row, mlm.mask_embedding),
                                     after_layer=after_layer if fused else None, causal=causal)[1]


def _hand_logits(mlm: MaskedLanguageObjective, hidden: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """dense + GELU + LayerNorm, then the given decoder matrix (the token embedding) and the head's bias."""
    h = F.gelu(F.linear(hidden, mlm.head.dense.weight, mlm.head.dense.bias))
    h = F.layer_norm(h, (h.shape[-1],), mlm.head.norm.weight, mlm.head.norm.bias, mlm.head.norm.eps)
    return h @ decoder.T + mlm.head.bias


def _replay(tokens: torch.Tensor, seed: int, prob: float = 0.15, sample_index=None):
    """The masks the objective draws at step 0 with this seed (keyed per sample, drawn at the context length)."""
    return mask_tokens(tokens, word_mask(tokens), prob, min(SOT, EOT), seed=seed, step=0, sample_index=sample_index,
                       draw_length=MODEL["text"]["context_length"])


def _run(mlm, outputs, tokens, images, model, seed: int) -> dict:
    mlm.seed = seed
    return mlm(outputs, StepContext(step=0, total_steps=1, images=images, tokens=tokens, model=model))


# ------------------------------------------------------------------------------------ 1. masked positions only
def test_mlm_loss_is_cross_entropy_over_exactly_the_chosen_positions(setup):
    _, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    _randomise_fusion(mlm)
    seed = 7
    terms = _run(mlm, outputs, tokens, images, model, seed)
    inputs, use_mask_row, chosen = _replay(tokens, seed)
    words = word_mask(tokens)
    assert 2 <= int(chosen.sum()) < int(words.sum())
    assert terms["mlm_masked"] == float(chosen.sum())

    hidden = _hand_pass(model, mlm, inputs, use_mask_row, outputs["image_maps"], causal=False)
    logits = _hand_logits(mlm, hidden, model.text.token_embedding.weight)  # [B, L, vocab]
    expected = F.cross_entropy(logits[chosen], tokens[chosen])
    torch.testing.assert_close(terms["mlm_loss"], expected, rtol=1e-5, atol=1e-6)
    accuracy = (logits[chosen].argmax(-1) == tokens[chosen]).float().mean()
    torch.testing.assert_close(terms["mlm_accuracy"], accuracy)
    # what the loss would be over every word position (the chosen ones included): not what is computed
    every_word = F.cross_entropy(logits[words], tokens[words])
    assert abs(float(every_word.detach()) - float(terms["mlm_loss"].detach())) > 1e-3


def test_mlm_loss_ignores_the_targets_at_unchosen_positions(setup):
    """With causal attention a token changed at an unchosen position j reaches no chosen position before j; where
    every chosen position of the row lies before j, the loss is unchanged. Changing a chosen target changes it."""
    _, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    _randomise_fusion(mlm)
    mlm.fusion.causal = True  # the attention of the fused pass lives in the (shared) fusion module
    seed = 11
    _, _, chosen = _replay(tokens, seed)
    base = _run(mlm, outputs, tokens, images, model, seed)["mlm_loss"]

    last_word = word_mask(tokens).int().cumsum(1).argmax(1)  # the last word position of every row
    rows = [b for b in range(len(tokens)) if not chosen[b, last_word[b]]]
    assert rows, "the seed chose every row's last word"
    unchosen = tokens.clone()
    for b in rows:
        unchosen[b, last_word[b]] = (tokens[b, last_word[b]] + 1) % min(SOT, EOT)
    assert torch.equal(_replay(unchosen, seed)[2], chosen)  # the same positions are chosen
    torch.testing.assert_close(_run(mlm, outputs, unchosen, images, model, seed)["mlm_loss"], base,
                               rtol=0, atol=1e-6)

    b, j = torch.nonzero(chosen)[0].tolist()
    changed = tokens.clone()
    changed[b, j] = (tokens[b, j] + 1) % min(SOT, EOT)
    with torch.no_grad():
        assert abs(float(_run(mlm, outputs, changed, images, model, seed)["mlm_loss"]) - float(base.detach())) > 1e-4


def test_batch_fraction_masks_an_evenly_spread_share_of_the_batch(setup):
    """fraction 1/4 of 6 pairs reads ceil(1.5) = 2 pairs, every 4th global index (0 and 4), masked as those samples."""
    _, model, _, images, tokens, outputs = setup
    cfg = config(mlm={"batch_fraction": 0.25})
    torch.manual_seed(0)
    mlm = _mlm(build_objectives(cfg, model))
    read = [0, 4]
    assert len(read) == math.ceil(0.25 * len(tokens))
    seed = 4
    terms = _run(mlm, outputs, tokens, images, model, seed)
    _, _, chosen = _replay(tokens[read], seed, sample_index=read)
    assert chosen.shape[0] == len(read) and terms["mlm_masked"] == float(chosen.sum()) > 0
    others = tokens.clone()
    unread = [i for i in range(len(tokens)) if i not in read]
    others[unread, 1:3] = 5  # the pairs not read never reach the masked pass
    torch.testing.assert_close(_run(mlm, outputs, others, images, model, seed)["mlm_loss"], terms["mlm_loss"],
                               rtol=0, atol=0)
    changed = tokens.clone()
    changed[4, 1:3] = 5  # a read pair does
    with torch.no_grad():
        assert abs(float(_run(mlm, outputs, changed, images, model, seed)["mlm_loss"]) - float(terms["mlm_loss"])) > 0


def test_mlm_pass_skipping_rows_without_targets_keeps_the_loss_and_every_gradient(setup):
    """The objective runs its fused pass only over rows with a chosen position, cut to the columns they use; the
    reference is the pass written out over every row at full length: the loss and the gradient of every parameter
    (model, fusion, head, mask row) agree."""
    _, model, objectives, images, tokens, _ = setup
    mlm = _mlm(objectives)
    _randomise_fusion(mlm)
    seed = next(s for s in range(100) if not _replay(tokens, s)[2].any(dim=1).all()
                and _replay(tokens, s)[2].any(dim=1).sum() >= 2)
    inputs, use_mask_row, chosen = _replay(tokens, seed)
    params = [p for p in (*model.parameters(), *mlm.parameters()) if p.requires_grad]

    outputs = model(images, tokens, **forward_needs(objectives))
    got = _run(mlm, outputs, tokens, images, model, seed)["mlm_loss"]
    got_grads = torch.autograd.grad(got, params, allow_unused=True)

    outputs = model(images, tokens, **forward_needs(objectives))
    hidden = _hand_pass(model, mlm, inputs, use_mask_row, outputs["image_maps"], causal=False)
    logits = _hand_logits(mlm, hidden, model.text.token_embedding.weight)
    expected = F.cross_entropy(logits[chosen], tokens[chosen])
    want_grads = torch.autograd.grad(expected, params, allow_unused=True)

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any(w is not None and w.abs().sum() > 0 for w in want_grads)
    for g, w in zip(got_grads, want_grads):
        if w is None or g is None:
            assert (g is None or not g.any()) and (w is None or not w.any())
            continue
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w.to_dense() if w.is_sparse else w,
                                   rtol=1e-4, atol=1e-6)


def test_masks_are_keyed_by_seed_step_and_sample_index():
    """A sample's mask does not depend on its batch position, its batch neighbours or its padding length (that is
    what makes the masking independent of how a global batch is split over ranks); seed and step change it."""
    tokens = _sample_tokens(8, 30, seed=5)
    words = word_mask(tokens)
    whole = mask_tokens(tokens, words, 0.5, min(SOT, EOT), seed=1, step=3, draw_length=40)
    second_half = mask_tokens(tokens[4:, :25], words[4:, :25], 0.5, min(SOT, EOT), seed=1, step=3,
                              sample_index=range(4, 8), draw_length=40)
    for got, full in zip(second_half, whole):
        assert torch.equal(got, full[4:, :25])
    for other in ({"seed": 2, "step": 3}, {"seed": 1, "step": 4}):
        changed = mask_tokens(tokens, words, 0.5, min(SOT, EOT), draw_length=40, **other)
        assert not torch.equal(changed[2], whole[2])


# ------------------------------------------------------------------------------------ 2. masking frequencies
def _sample_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    """Start, random regular ids, end-of-text at a random position, zero padding (id 0 is also a real token)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(SOT, EOT), (batch, length), generator=gen)
    end = torch.randint(3, length, (batch,), generator=gen)
    positions = torch.arange(length)[None, :]
    tokens[:, 0] = SOT
    tokens[positions == end[:, None]] = EOT
    tokens[positions > end[:, None]] = 0
    return tokens


def _within(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_mask_tokens_follows_bert_frequencies():
    tokens = _sample_tokens(7000, 64, seed=0)
    words = word_mask(tokens)
    n_words = int(words.sum())
    assert n_words > 200_000
    inputs, use_mask_row, chosen = mask_tokens(tokens, words, 0.15, min(SOT, EOT), seed=0)

    assert not (chosen & ~words).any()  # never start, end-of-text or padding
    assert not (use_mask_row & ~chosen).any()
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen positions keep their token
    assert torch.equal(inputs[use_mask_row], tokens[use_mask_row])  # the mask row replaces the embedding, not the id
    n_chosen = int(chosen.sum())
    assert _within(n_chosen, n_words, 0.15)

    rest = chosen & ~use_mask_row
    randomised = rest & (inputs != tokens)
    unchanged = rest & (inputs == tokens)
    p_same = 1 / min(SOT, EOT)  # a random id may equal the original one
    assert _within(int(use_mask_row.sum()), n_chosen, 0.8)
    assert _within(int(randomised.sum()), n_chosen, 0.1 * (1 - p_same))
    assert _within(int(unchanged.sum()), n_chosen, 0.1 + 0.1 * p_same)
    random_ids = inputs[randomised]
    assert int(random_ids.max()) < min(SOT, EOT) and int(random_ids.min()) >= 0


def test_random_replacements_are_never_start_or_end_of_text():
    """Start and end-of-text are the two largest ids; the objective draws below both, over the whole regular range."""
    assert (SOT, EOT) == (vocab_size() - 2, vocab_size() - 1)
    cfg = config()
    mlm = _mlm(build_objectives(cfg, build_model(cfg.model)))
    assert mlm.num_regular_tokens == min(SOT, EOT)
    # ~200k random draws: were start/end-of-text allowed, ~8 would appear (a miss has probability e^-8)
    tokens = _sample_tokens(20000, 100, seed=1)
    tokens[:, 1:-1] = torch.randint(0, min(SOT, EOT), (20000, 98), generator=torch.Generator().manual_seed(2))
    tokens[:, -1] = EOT
    inputs, use_mask_row, chosen = mask_tokens(tokens, word_mask(tokens), 0.999, mlm.num_regular_tokens, seed=1)
    randomised = chosen & ~use_mask_row
    drawn = inputs[randomised]
    assert drawn.numel() > 150_000
    assert not ((drawn == SOT) | (drawn == EOT)).any()
    assert int(drawn.max()) > min(SOT, EOT) - 100  # the whole regular range is drawn from


def test_special_positions_are_never_chosen_even_at_high_probability():
    tokens = _sample_tokens(2000, 40, seed=3)
    tokens[:, 5] = 0  # id 0 is a real BPE token ("!") inside the caption, and also the padding value after it
    words = word_mask(tokens)
    _, _, chosen = mask_tokens(tokens, words, 0.999, min(SOT, EOT), seed=3)
    positions = torch.arange(tokens.shape[1])[None, :]
    end = (tokens == EOT).int().argmax(1, keepdim=True)
    assert not chosen[:, 0].any()
    assert not chosen[positions >= end.expand_as(chosen)].any()  # end-of-text and padding
    inner = (positions > 0) & (positions < end)
    assert chosen[inner].float().mean() > 0.99


# ------------------------------------------------------------------------------------ 3. identity fusion at init
def test_fusion_block_is_an_exact_identity_at_init():
    torch.manual_seed(0)
    block = FusionBlock(32, 48, 2)
    x, image_map = torch.randn(3, 9, 32), torch.randn(3, 48, 2, 2)
    for mode in (block.train, block.eval):
        mode()
        assert torch.equal(block(x, image_map), x)


def test_fused_pass_equals_the_plain_pass_at_init(setup):
    cfg, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    inputs, use_mask_row, _ = _replay(tokens, 5)
    maps = outputs["image_maps"]
    with torch.no_grad():
        fused = _hand_pass(model, mlm, inputs, use_mask_row, maps, causal=False)
        plain = _hand_pass(model, mlm, inputs, use_mask_row, maps, causal=False, fused=False)
    assert torch.equal(fused, plain)

    # and the objective's loss equals that of an objective without fusion holding the same mask row and head
    plain_cfg = config(mlm={"fusion": []})
    without = _mlm(build_objectives(plain_cfg, model))
    missing, unexpected = without.load_state_dict(mlm.state_dict(), strict=False)
    assert not missing and all(k.startswith("fusion.") for k in unexpected)
    with torch.no_grad():
        assert torch.equal(_run(mlm, outputs, tokens, images, model, 5)["mlm_loss"],
                           _run(without, outputs, tokens, images, model, 5)["mlm_loss"])


def test_fusion_blocks_learn_after_one_step(setup):
    cfg, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    optimizer = build_optimizer(model, cfg, objectives)
    _run(mlm, outputs, tokens, images, model, 5)["mlm_loss"].backward()
    optimizer.step()
    for block in mlm.fusion:
        assert block.attn.out_proj.weight.abs().sum() > 0
        assert block.attn.out_proj.bias.abs().sum() > 0
    inputs, use_mask_row, _ = _replay(tokens, 5)
    with torch.no_grad():
        maps = {s: m.detach() for s, m in outputs["image_maps"].items()}
        fused = _hand_pass(model, mlm, inputs, use_mask_row, maps, causal=False)
        plain = _hand_pass(model, mlm, inputs, use_mask_row, maps, causal=False, fused=False)
    assert not torch.allclose(fused, plain)


# ------------------------------------------------------------------------------------ 4. tied head
def test_mlm_head_is_tied_to_the_token_embedding(setup):
    _, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    embedding = model.text.token_embedding.weight
    # no separate decoder matrix anywhere in the objective
    assert not any(p.shape == embedding.shape for p in mlm.parameters())
    assert mlm.head.bias.shape == (embedding.shape[0],)

    seen = {}
    handle = mlm.head.register_forward_hook(lambda module, args, out: seen.update(args=args, logits=out))
    seed = 3
    terms = _run(mlm, outputs, tokens, images, model, seed)
    handle.remove()
    assert seen["args"][1] is embedding
    torch.testing.assert_close(seen["logits"], _hand_logits(mlm, seen["args"][0], embedding))

    # a vocabulary row the masked pass never reads (neither in the caption nor drawn as a random replacement)
    inputs, _, _ = _replay(tokens, seed)
    v = next(i for i in range(1000, 2000) if not (inputs == i).any() and not (tokens == i).any())
    # the gradient of mlm_loss reaches the embedding, also at that row: only through the tied decoder
    model.zero_grad(set_to_none=True)
    terms["mlm_loss"].backward()
    grad = embedding.grad.to_dense()
    assert grad[v].abs().sum() > 0
    assert grad.abs().sum() > grad[v].abs().sum()

    # changing that row changes exactly that logit column (the hidden states do not move: the row is not read)
    hidden, logits = seen["args"][0].detach(), seen["logits"].detach()
    with torch.no_grad():
        embedding[v] += 0.5
        handle = mlm.head.register_forward_hook(lambda module, args, out: seen.update(args=args, logits=out))
        _run(mlm, outputs, tokens, images, model, seed)
        handle.remove()
    torch.testing.assert_close(seen["args"][0], hidden, rtol=0, atol=0)
    others = torch.ones(embedding.shape[0], dtype=torch.bool)
    others[v] = False
    assert torch.equal(seen["logits"][:, others], logits[:, others])
    assert (seen["logits"][:, v] - logits[:, v]).abs().min() > 0


def test_token_embedding_gradient_stays_dense_with_every_objective(setup):
    cfg, model, objectives, images, tokens, _ = setup
    model.train()
    assert [o.name for o in objectives] == ["contrastive", "token", "mlm"]
    torch.manual_seed(0)
    total, terms, _ = TrainingLoss(model, objectives)(images, tokens, step=0, total_steps=4)
    assert {"contrastive_loss", "token_loss", "mlm_loss"} <= set(terms)
    total.backward()
    grad = model.text.token_embedding.weight.grad
    assert grad is not None and not grad.is_sparse and grad.layout == torch.strided
    # the dense gradient is what AdamW and clipping accept
    optimizer = build_optimizer(model, cfg, objectives)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()


# ------------------------------------------------------------------------------------ 5. causal option
@pytest.mark.parametrize("causal", [True, False])
def test_causal_masked_pass_does_not_see_later_tokens(setup, monkeypatch, causal):
    _, model, objectives, images, tokens, outputs = setup
    mlm = _mlm(objectives)
    _randomise_fusion(mlm)
    mlm.fusion.causal = causal
    hidden = []
    real = model.text.forward_tokens

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        hidden.append(out[1])
        return out

    monkeypatch.setattr(model.text, "forward_tokens", spy)
    seed = 2
    _, _, chosen = _replay(tokens, seed)
    b = 3  # the longest caption
    j = next(p for p in range(6, int(word_mask(tokens)[b].sum())) if not chosen[b, p])
    later = tokens.clone()
    later[b, j] = (tokens[b, j] + 7) % min(SOT, EOT)
    with torch.no_grad():
        _run(mlm, outputs, tokens, images, model, seed)
        _run(mlm, outputs, later, images, model, seed)
    before, after = hidden
    # the pass reads only the rows with a chosen position, in order (row b among them), at the longest one's length
    read = chosen.any(dim=1).nonzero().flatten().tolist()
    assert b in read and before.shape[:2] == (len(read), tokens.shape[1])
    row = read.index(b)
    others = [i for i in range(len(read)) if i != row]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[row, j:], before[row, j:])
    if causal:
        torch.testing.assert_close(after[row, :j], before[row, :j], rtol=0, atol=1e-6)
    else:
        assert (after[row, :j] - before[row, :j]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ 6-7. trainer runs
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(config().data, out)
    return out / "train"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Three steps with all three objectives (weights 0.5 / 2.0 / 1.5), a checkpoint at step 2."""
    cfg = config()
    out = tmp_path_factory.mktemp("run")
    result = train(cfg, data, out)
    with open(result.train_log) as f:
        rows = list(csv.DictReader(f))
    return cfg, out, result, rows


TRAINING_ONLY = ("fusion", "mlm", "mask_embedding", "patch_proj", "word_proj", "ema", "objectives")


def test_final_checkpoint_holds_the_plain_model_only(trained):
    cfg, _, result, _ = trained
    final = load_checkpoint(result.final_checkpoint)
    assert "objectives" not in final and set(final) == {"model", "model_config", "step", "lineage"}
    json.dumps(final["lineage"])  # the lineage is plain data (what the model was trained on), no weights
    fresh = build_model(cfg.model).state_dict()
    assert list(final["model"]) == list(fresh)
    assert all(final["model"][k].shape == fresh[k].shape for k in fresh)
    assert not [k for k in final["model"] if any(word in k for word in TRAINING_ONLY)]
    fresh_params = sum(p.numel() for p in build_model(cfg.model).parameters())
    model, _ = model_from_checkpoint(result.final_checkpoint)  # strict load
    assert sum(p.numel() for p in model.parameters()) == fresh_params


def test_periodic_checkpoints_keep_the_objectives_for_resume(trained):
    cfg, out, _, _ = trained
    [ckpt] = list_checkpoints(out / "checkpoints")
    state = load_checkpoint(ckpt)
    assert state["step"] == 2 and "objectives" in state
    assert any(".fusion." in k for k in state["objectives"]) and any("mask_embedding" in k for k in state["objectives"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    objectives = build_objectives(cfg, model)
    objectives.load_state_dict(state["objectives"], strict=True)
    optimizer = build_optimizer(model, cfg, objectives)
    optimizer.load_state_dict(state["optimizer"])  # the objectives' parameters are in the saved optimizer


def test_export_of_a_run_with_every_objective_matches_the_plain_model(trained, tmp_path):
    cfg, _, result, _ = trained
    exported = export(cfg, result.final_checkpoint, tmp_path / "export")
    fresh_params = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert exported.param_count_unfused == fresh_params
    loaded = load_exported(tmp_path / "export")
    # mobilenetv2 has nothing to fold and both towers are read: the export is exactly the plain CLIP
    assert exported.param_count == fresh_params
    assert sum(p.numel() for p in loaded.model.parameters()) == fresh_params
    assert list(loaded.model.state_dict()) == list(build_model(cfg.model).state_dict())

    plain, _ = model_from_checkpoint(result.final_checkpoint)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(CAPTIONS[:3], cfg.model.text.context_length)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), plain.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(tokens), plain.encode_text(tokens), rtol=1e-4, atol=1e-5)


def test_logged_loss_is_the_weighted_sum_of_the_terms(trained):
    cfg, _, result, rows = trained
    header = list(rows[0])
    for term in ("contrastive_loss", "soft_eps", "token_loss", "token_pairs", "mlm_loss", "mlm_accuracy",
                 "mlm_masked"):
        assert term in header
    weights = {"contrastive_loss": 0.5, "token_loss": 2.0, "mlm_loss": 1.5}
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        expected = sum(w * float(r[k]) for k, w in weights.items())
        assert math.isclose(float(r["loss"]), expected, rel_tol=1e-5)
        assert math.isfinite(float(r["loss"]))
    c = cfg.objectives.contrastive
    for r in rows:
        k = int(r["step"])
        assert math.isclose(float(r["soft_eps"]), eps_at(k - 1, 3, c.eps_schedule, c.eps_start, c.eps_end),
                            rel_tol=1e-12)
    assert [float(r["soft_eps"]) for r in rows] == pytest.approx([0.05, 0.125, 0.2])


@pytest.mark.parametrize("off", ["contrastive", "token", "mlm"])
def test_each_objective_can_be_switched_off(data, tmp_path, off):
    cfg = config(**{off: {"enabled": False}})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 2})})
    result = train(cfg, data, tmp_path)
    with open(result.train_log) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    columns = set(rows[0])
    assert f"{off}_loss" not in columns
    weights = {k: v["weight"] for k, v in OBJECTIVES.items() if k != off and v.get("enabled", True)}
    assert {f"{k}_loss" for k in weights} <= columns
    for r in rows:
        assert math.isclose(float(r["loss"]), sum(w * float(r[f"{k}_loss"]) for k, w in weights.items()),
                            rel_tol=1e-5)
    final = load_checkpoint(result.final_checkpoint)["model"]
    assert list(final) == list(build_model(cfg.model).state_dict())


def test_disabling_every_objective_is_a_one_line_config_error():
    raw = {"objectives": {name: {"enabled": False} for name in OBJECTIVES}}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("objectives") and "every objective is disabled" in message


# ------------------------------------------------------------------------------------ 8. field-naming errors
def test_build_objectives_names_the_bad_field():
    model = build_model(config().model)
    with pytest.raises(ConfigError, match=r"^objectives\.mlm\.fusion\[0\]\.text_layer=4: .*4 layers") as err:
        build_objectives(config(mlm={"fusion": [{"text_layer": 4, "image_stride": 8}]}), model)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^objectives\.mlm\.fusion\[1\]\.image_stride=12: "):
        build_objectives(config(mlm={"fusion": [{"text_layer": 0, "image_stride": 8},
                                                {"text_layer": 1, "image_stride": 12}]}), model)
    with pytest.raises(ConfigError, match=r"^objectives\.token\.image_stride=12: .*\[2, 4, 8, 16, 32\]") as err:
        build_objectives(config(token={"image_stride": 12}), model)
    assert "\n" not in str(err.value)
    # the last layer is a valid fusion point
    build_objectives(config(mlm={"fusion": [{"text_layer": 3, "image_stride": 32}]}), model)


# ------------------------------------------------------------------------------------ 9. EMA similarity source
EMA = {"soft_targets": "similarity", "similarity_source": "ema", "ema_momentum": 0.9}


def _ema_setup():
    cfg = config(contrastive=EMA, token={"enabled": False}, mlm={"enabled": False})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objectives = build_objectives(cfg, model)
    [contrastive] = objectives
    assert isinstance(contrastive, ContrastiveObjective) and contrastive.ema is not None
    return cfg, model, objectives, contrastive


def _perturb(model) -> None:
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if b.is_floating_point() and "running" in name:
                b.add_(0.05 * torch.rand(b.shape, generator=gen))


def test_ema_copy_is_frozen_and_outside_the_optimizer():
    cfg, model, objectives, contrastive = _ema_setup()
    ema_params = list(contrastive.ema.parameters())
    assert ema_params and not any(p.requires_grad for p in ema_params)
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in ema_params}  # a copy, not the model's own tensors
    optimizer = build_optimizer(model, cfg, objectives)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == model_ids


def test_ema_update_follows_the_momentum_formula():
    """From a known state (the EMA after its first update), one more update is ema = m * ema + (1 - m) * model for
    every parameter and every BatchNorm statistic."""
    _, model, _, contrastive = _ema_setup()
    m = 0.9
    contrastive.after_step(model)
    _perturb(model)
    before = {k: v.clone() for k, v in contrastive.ema.module.named_parameters()}
    before_stats = {k: v.clone() for k, v in contrastive.ema.module.named_buffers() if "running" in k}
    online = dict(model.named_parameters())
    online_stats = dict(model.named_buffers())
    contrastive.after_step(model)
    after = dict(contrastive.ema.module.named_parameters())
    moved = 0
    for k, ema in after.items():
        torch.testing.assert_close(ema, m * before[k] + (1 - m) * online[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(ema, before[k]))
    assert moved == len(after)
    after_stats = dict(contrastive.ema.module.named_buffers())
    for k, ema in before_stats.items():
        torch.testing.assert_close(after_stats[k], m * ema + (1 - m) * online_stats[k], rtol=1e-5, atol=1e-6)


def test_first_ema_update_averages_the_initial_copy():
    _, model, _, contrastive = _ema_setup()
    initial = {k: v.clone() for k, v in contrastive.ema.module.named_parameters()}
    _perturb(model)
    contrastive.after_step(model)
    online = dict(model.named_parameters())
    for k, ema in contrastive.ema.module.named_parameters():
        torch.testing.assert_close(ema, 0.9 * initial[k] + 0.1 * online[k], rtol=1e-5, atol=1e-6)


def test_ema_updates_keep_the_text_towers_causal_mask():
    """The EMA copy averages buffers too; the causal attention mask (-inf above the diagonal) must stay as it is,
    and the EMA similarity must stay finite."""
    _, model, _, contrastive = _ema_setup()
    for _ in range(3):
        _perturb(model)
        contrastive.after_step(model)
    assert torch.equal(contrastive.ema.module.text.attn_mask, model.text.attn_mask)
    tokens = trim_padding(tokenize(CAPTIONS, 24))
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    ctx = StepContext(step=0, total_steps=1, images=images, tokens=tokens, model=model)
    assert all(torch.isfinite(sim).all() for sim in contrastive._ema_similarity(ctx))


def test_training_with_the_ema_similarity_source_does_not_diverge(data, tmp_path):
    cfg = config(contrastive=EMA)
    try:
        result = train(cfg, data, tmp_path)
    except TrainingDiverged as err:
        pytest.fail(f"training with similarity_source=ema diverged: {err}")
    with open(result.train_log) as f:
        assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))
