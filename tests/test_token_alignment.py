"""Token-level alignment (LightCLIP): assignments against brute force, batching against per-pair calls, losses
against hand-written references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightclip_core.losses.token import assign_words_to_patches, match_batch, token_alignment_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sim(n_words: int, n_patches: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_words, 8))
    p = rng.standard_normal((n_patches, 8))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return w @ p.T


def _brute_force_best(sim: np.ndarray) -> float:
    """The largest total similarity of a one-to-one matching of min(rows, cols) rows and columns."""
    n, m = sim.shape
    if n <= m:
        return max(sum(sim[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return max(sum(sim[i, j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n), m))


def _feats(b: int, n: int, d: int, seed: int, requires_grad: bool = False, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1).to(device)
    return x.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------ assignment
@pytest.mark.parametrize("shape", [(3, 5), (4, 4), (2, 6), (1, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_hungarian_matches_brute_force_and_is_one_to_one(shape, seed):
    sim = _sim(*shape, seed)
    w, p = assign_words_to_patches(sim)
    assert w.dtype == np.int64 and p.dtype == np.int64
    assert sorted(w.tolist()) == list(range(shape[0]))  # every word matched once
    assert len(set(p.tolist())) == len(p)  # distinct patches
    assert sim[w, p].sum() == pytest.approx(_brute_force_best(sim))


@pytest.mark.parametrize("seed", range(3))
def test_more_words_than_patches_matches_n_patches(seed):
    sim = _sim(5, 3, seed)
    w, p = assign_words_to_patches(sim)
    assert len(w) == 3 and sorted(p.tolist()) == [0, 1, 2]
    assert len(set(w.tolist())) == 3
    assert sim[w, p].sum() == pytest.approx(_brute_force_best(sim))


@pytest.mark.parametrize(("n_words", "n_patches", "k"), [(2, 5, 2), (3, 6, 2), (2, 7, 3), (3, 4, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_patches_per_word(n_words, n_patches, k, seed):
    sim = _sim(n_words, n_patches, seed)
    w, p = assign_words_to_patches(sim, patches_per_word=k)
    assert len(w) == min(n_words * k, n_patches)
    assert np.bincount(w, minlength=n_words).max() <= k
    assert len(set(p.tolist())) == len(p)
    assert w.min() >= 0 and w.max() < n_words
    assert sim[w, p].sum() == pytest.approx(_brute_force_best(np.repeat(sim, k, axis=0)))


@pytest.mark.parametrize("matcher", ["hungarian", "max"])
@pytest.mark.parametrize("threshold", [-0.2, 0.0, 0.3])
@pytest.mark.parametrize("seed", range(3))
def test_threshold_keeps_exactly_the_passing_pairs(matcher, threshold, seed):
    sim = _sim(4, 6, seed)
    w_all, p_all = assign_words_to_patches(sim, matcher=matcher, patches_per_word=2)
    w, p = assign_words_to_patches(sim, matcher=matcher, threshold=threshold, patches_per_word=2)
    assert (sim[w, p] >= threshold).all()
    expected = {(i, j) for i, j in zip(w_all.tolist(), p_all.tolist()) if sim[i, j] >= threshold}
    assert set(zip(w.tolist(), p.tolist())) == expected and len(w) == len(expected)


@pytest.mark.parametrize("seed", range(3))
def test_max_matcher_takes_argmax_and_top_k(seed):
    sim = _sim(5, 4, seed)  # more words than patches: not one-to-one
    w, p = assign_words_to_patches(sim, matcher="max")
    assert w.tolist() == list(range(5)) and p.tolist() == sim.argmax(1).tolist()
    w, p = assign_words_to_patches(sim, matcher="max", patches_per_word=3)
    for i in range(5):
        assert set(p[w == i].tolist()) == set(np.argsort(-sim[i])[:3].tolist())
    w, p = assign_words_to_patches(sim, matcher="max", patches_per_word=10)  # k capped at n_patches
    assert all(sorted(p[w == i].tolist()) == [0, 1, 2, 3] for i in range(5))


@pytest.mark.parametrize("matcher", ["hungarian", "max"])
def test_no_words_gives_empty_arrays(matcher):
    w, p = assign_words_to_patches(np.zeros((0, 5), dtype=np.float32), matcher=matcher)
    assert w.shape == (0,) and p.shape == (0,) and w.dtype == np.int64 and p.dtype == np.int64


def test_assignment_bad_arguments():
    sim = _sim(2, 3, 0)
    with pytest.raises(ValueError, match="matcher"):
        assign_words_to_patches(sim, matcher="sinkhorn")
    with pytest.raises(ValueError, match="patches_per_word"):
        assign_words_to_patches(sim, patches_per_word=0)
    with pytest.raises(ValueError, match="matcher"):
        assign_words_to_patches(np.zeros((0, 3)), matcher="bogus")  # validated even when there is nothing to match


# ------------------------------------------------------------------------------------------ batching
def _batch(device: str = "cpu", requires_grad: bool = False, seed: int = 0):
    b, length, n_patches, d = 3, 7, 6, 8
    words = _feats(b, length, d, seed, requires_grad, device)
    patches = _feats(b, n_patches, d, seed + 100, requires_grad, device)
    lengths = [5, 2, 7]  # tokens incl. start and end; the rest is padding
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 1:n - 1] = True  # not the start token, not the end token, not padding
    return words, mask.to(device), patches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("matcher", "threshold", "k"), [("hungarian", None, 1), ("hungarian", 0.1, 2),
                                                         ("max", None, 1), ("max", 0.0, 3)])
def test_match_batch_equals_per_pair_assignment(device, matcher, threshold, k):
    words, mask, patches = _batch(device, requires_grad=True)
    bi, wi, pi = match_batch(words, mask, patches, matcher=matcher, threshold=threshold, patches_per_word=k)
    for t in (bi, wi, pi):
        assert t.dtype == torch.int64 and t.device.type == device and not t.requires_grad and t.grad_fn is None
    assert mask[bi, wi].all()  # start, end and padding rows never appear
    sim = torch.bmm(words.detach(), patches.detach().transpose(1, 2)).float().cpu().numpy()
    host_mask = mask.cpu().numpy()
    expected = set()
    for b in range(sim.shape[0]):
        rows = np.flatnonzero(host_mask[b])
        w, p = assign_words_to_patches(sim[b][rows], matcher, threshold, k)
        expected |= {(b, int(rows[i]), int(j)) for i, j in zip(w, p)}
    got = list(zip(bi.tolist(), wi.tolist(), pi.tolist()))
    assert set(got) == expected and len(got) == len(expected)


def test_match_batch_copies_to_host_once(monkeypatch):
    words, mask, patches = _batch()
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    match_batch(words, mask, patches)
    assert len(calls) == 1


def test_match_batch_with_no_real_words_and_bad_shapes():
    words, mask, patches = _batch()
    bi, wi, pi = match_batch(words, torch.zeros_like(mask), patches)
    assert bi.numel() == wi.numel() == pi.numel() == 0 and bi.dtype == torch.int64
    with pytest.raises(ValueError, match="word_mask"):
        match_batch(words, mask[:, :-1], patches)
    with pytest.raises(ValueError, match="patch_feats"):
        match_batch(words, mask, patches[:2])


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("device", DEVICES)
def test_cosine_loss_equals_hand_loop_and_gradients_reach_both(device):
    words, mask, patches = _batch(device, requires_grad=True)
    bi, wi, pi = match_batch(words, mask, patches)
    loss = token_alignment_loss(words, patches, bi, wi, pi, loss="cosine")
    pairs = list(zip(bi.tolist(), wi.tolist(), pi.tolist()))
    reference = sum(1 - torch.dot(words[b, i], patches[b, j]) for b, i, j in pairs) / len(pairs)
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert torch.isfinite(words.grad).all() and torch.isfinite(patches.grad).all()
    assert words.grad[bi, wi].abs().sum() > 0 and patches.grad[bi, pi].abs().sum() > 0
    assert words.grad[~mask].abs().sum() == 0  # unmatched (masked) words get nothing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_softmax_loss_equals_cross_entropy_by_hand(device, temperature):
    words, mask, patches = _batch(device, requires_grad=True, seed=3)
    bi, wi, pi = match_batch(words, mask, patches, patches_per_word=2)
    loss = token_alignment_loss(words, patches, bi, wi, pi, loss="softmax", temperature=temperature)
    terms = []
    for b, i, j in zip(bi.tolist(), wi.tolist(), pi.tolist()):
        logits = torch.stack([torch.dot(words[b, i], patches[b, q]) for q in range(patches.shape[1])]) / temperature
        terms.append(F.cross_entropy(logits[None], torch.tensor([j], device=device)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert torch.isfinite(words.grad).all() and torch.isfinite(patches.grad).all()
    assert words.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["cosine", "softmax"])
def test_no_matched_pairs_gives_zero_with_working_backward(kind):
    words, mask, patches = _batch(requires_grad=True)
    bi, wi, pi = match_batch(words, mask, patches, threshold=2.0)  # cosines never reach 2: nothing kept
    assert bi.numel() == 0
    loss = token_alignment_loss(words, patches, bi, wi, pi, loss=kind)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert words.grad is not None and patches.grad is not None
    assert words.grad.abs().sum() == 0 and patches.grad.abs().sum() == 0


def test_loss_bad_arguments():
    words, mask, patches = _batch()
    idx = match_batch(words, mask, patches)
    with pytest.raises(ValueError, match="loss"):
        token_alignment_loss(words, patches, *idx, loss="l2")
    for t in (0.0, -0.5):
        with pytest.raises(ValueError, match="temperature"):
            token_alignment_loss(words, patches, *idx, loss="softmax", temperature=t)
