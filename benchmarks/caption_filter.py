"""How well does the synthetic-caption filter (issue #16; lightclip_core/data/caption_filter.py) tell right synthetic
captions from wrong ones? Measured on a stored reinforced split whose images carry their true attributes (the
embedded synthetic data's `json` member), with no model run: the filter reads only the stored teacher embeddings.

A caption is *right* when every attribute it names (colour, shape, size, position; data/caption_attributes.py) is
the image's. For each stored view and each synthetic caption the filter keeps the caption when the teachers' score
of it is at least their score of the ground-truth caption minus the margin; a sample none of whose synthetic captions
is kept puts its ground-truth caption in the synthetic caption batch. So what a student's synthetic batch holds is
measured as the share of wrong captions in it, over every (view, synthetic caption) pair: a kept synthetic caption,
or the ground truth standing in for a dropped one. Also: the AUC with which the score difference (synthetic minus
ground truth) ranks right synthetic captions above wrong ones (scipy's Mann-Whitney U), and the share of the dataset's
own captions that are wrong (`data.synthetic.noise_fraction` puts one wrong attribute in a tenth of them).

And what the distillation targets already do with a wrong caption (`teacher_targets`): in random batches of
`train.batch_size` (first stored views), the teachers' target probabilities (image -> text rows, at the scales
training uses) on a row's own caption when it is right and when it is wrong, and on the captions of the batch that
are true of the row's image, for the real and for the synthetic caption batch.

The ratio in the table: wrong captions in the synthetic batch without the filter over with it at --margin (> 1: the
filter leaves fewer wrong captions).

    python benchmarks/caption_filter.py [--data artifacts/reinforced/train] [--margin 0.05]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, publish  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.data.caption_attributes import ATTRIBUTES, UNNAMED, NamedAttributes, parse_caption  # noqa: E402
from lightclip_core.data.caption_filter import teacher_scores  # noqa: E402
from lightclip_core.data.reinforced import decode_reinforcement  # noqa: E402
from lightclip_core.data.shards import decode_caption, iter_raw_samples, read_manifest, shard_refs  # noqa: E402
from lightclip_core.data.reader import decode_meta  # noqa: E402
from lightclip_core.losses.distill import teacher_probabilities  # noqa: E402
from lightclip_core.losses.objective import teacher_scales  # noqa: E402

MARGINS = (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


def consistent(caption_codes: np.ndarray, image_codes: np.ndarray) -> np.ndarray:
    """Whether every attribute a caption names is the image's (the rule of attribute-consistent retrieval); the
    `[..., 4]` codes broadcast against each other."""
    return ((caption_codes == UNNAMED) | (caption_codes == image_codes)).all(axis=-1)


def collect(data: Path) -> dict[str, np.ndarray]:
    """Per sample: the attribute codes of its image (`truth`), of its own caption and of its synthetic captions;
    per (view, synthetic caption) the teachers' score difference; the teachers' embeddings of its first view and of
    its own and first synthetic caption. Also whether each caption is right (`real_right`, `syn_right`)."""
    dims = read_manifest(data)["reinforcement"]["dims"]
    rows: dict[str, list] = {k: [] for k in ("diff", "truth", "real_codes", "syn_codes", "image", "real_emb",
                                             "syn_emb")}
    for raw in iter_raw_samples(shard_refs(data)):
        truth, r = decode_meta(raw), decode_reinforcement(raw)
        if not all(a in truth for a in ATTRIBUTES):
            raise SystemExit(f"{data}: sample {raw['__key__']!r} has no true attributes in its json member; this "
                             f"measurement needs the embedded synthetic data")
        rows["diff"].append([teacher_scores(view, r.syn_text_emb, dims) - teacher_scores(view, r.text_emb, dims)[0]
                             for view in r.image_emb])
        rows["truth"].append(NamedAttributes(**{a: truth[a] for a in ATTRIBUTES}).codes())
        rows["real_codes"].append(parse_caption(decode_caption(raw)).codes())
        rows["syn_codes"].append([parse_caption(t).codes() for t in r.syn_texts])
        rows["image"].append(r.image_emb[0])
        rows["real_emb"].append(r.text_emb[0])
        rows["syn_emb"].append(r.syn_text_emb[0])
    m = {k: np.array(v) for k, v in rows.items()}
    m["real_right"] = consistent(m["real_codes"], m["truth"])
    m["syn_right"] = consistent(m["syn_codes"], m["truth"][:, None, :])
    m["syn_codes"] = m["syn_codes"][:, 0]  # the caption whose embedding `syn_emb` holds
    return m


def target_mass(m: dict[str, np.ndarray], batch: str, dims: list[int], scales: list[float], batch_size: int,
                seed: int = 0) -> dict[str, float]:
    """What the distillation targets (the product's `teacher_probabilities`, image -> text rows) hold for the
    caption batch `batch` ("real" or "syn"), over random batches of `batch_size` samples (first views): the mean
    target mass on a row's own caption when it is right and when it is wrong, and on the batch's captions that are
    true of the row's image (every attribute they name is the image's)."""
    codes, emb = m[f"{batch}_codes"], m[f"{batch}_emb"]
    order = np.random.default_rng(seed).permutation(len(codes))
    own = {True: [], False: []}
    true_mass = {True: [], False: []}
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        p, _ = teacher_probabilities(torch.from_numpy(m["image"][idx]), torch.from_numpy(emb[idx]), dims, scales)
        fits = consistent(codes[idx][None, :, :], m["truth"][idx][:, None, :])  # [image, caption]
        p = p.numpy()
        for i in range(len(idx)):
            own[bool(fits[i, i])].append(p[i, i])
            true_mass[bool(fits[i, i])].append(p[i][fits[i]].sum())
    return {"own_caption_right": float(np.mean(own[True])), "own_caption_wrong": float(np.mean(own[False])),
            "true_captions_own_right": float(np.mean(true_mass[True])),
            "true_captions_own_wrong": float(np.mean(true_mass[False])), "rows_wrong": len(own[False])}


def at_margin(m: dict[str, np.ndarray], margin: float) -> dict[str, float]:
    """What the filter does at `margin`, over every (sample, view, synthetic caption)."""
    diff = m["diff"]  # [samples, views, n_syn]
    wrong = np.broadcast_to(~m["syn_right"][:, None, :], diff.shape)
    kept = diff >= -margin
    # a view whose synthetic captions are all dropped trains on the ground truth in their place
    stand_in = np.broadcast_to(~kept.any(axis=2, keepdims=True), diff.shape)
    real_wrong = np.broadcast_to(~m["real_right"][:, None, None], diff.shape)
    batch_wrong = np.where(kept, wrong, np.where(stand_in, real_wrong, False))
    in_batch = kept | stand_in
    return {"margin": margin, "kept": float(kept.mean()), "wrong_caught": float((~kept)[wrong].mean()),
            "right_dropped": float((~kept)[~wrong].mean()),
            "wrong_among_kept": float(wrong[kept].mean()) if kept.any() else 0.0,
            "wrong_in_synthetic_batch": float(batch_wrong[in_batch].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "artifacts" / "reinforced" / "train")
    parser.add_argument("--margin", type=float, default=0.05, help="the margin the table's row reads")
    args = parser.parse_args()
    m = collect(args.data)
    cfg, reinforcement = load_config(ROOT / "params.yaml"), read_manifest(args.data)["reinforcement"]
    dims = [int(d) for d in reinforcement["dims"]]
    scales = teacher_scales(cfg.objectives.distill, reinforcement)
    targets = {batch: target_mass(m, batch, dims, scales, cfg.train.batch_size) for batch in ("real", "syn")}
    wrong = np.broadcast_to(~m["syn_right"][:, None, :], m["diff"].shape)
    right_scores, wrong_scores = m["diff"][~wrong], m["diff"][wrong]
    auc = float(mannwhitneyu(right_scores, wrong_scores).statistic / (right_scores.size * wrong_scores.size))
    unfiltered = float(wrong.mean())
    rows = [at_margin(m, margin) for margin in sorted({*MARGINS, args.margin})]
    chosen = next(r for r in rows if r["margin"] == args.margin)
    real_wrong = float((~m["real_right"]).mean())
    synthetic_right_where_real_wrong = float(m["syn_right"][~m["real_right"]].mean())
    command = f"python benchmarks/caption_filter.py --margin {args.margin}"
    publish("caption_filter",
            {"data": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
             "samples": int(m["diff"].shape[0]), "views_per_sample": int(m["diff"].shape[1]),
             "synthetic_per_sample": int(m["diff"].shape[2]), "real_captions_wrong": real_wrong,
             "synthetic_captions_wrong": unfiltered,
             "synthetic_right_where_real_wrong": synthetic_right_where_real_wrong, "auc_right_over_wrong": auc,
             "margins": rows, "teacher_targets": targets, "teacher_scales": scales},
            f"margin {args.margin}: {100 * chosen['wrong_in_synthetic_batch']:.2f}% wrong captions in the synthetic "
            f"batch ({100 * chosen['kept']:.1f}% of synthetic captions kept, {100 * chosen['wrong_caught']:.1f}% of "
            f"the wrong ones dropped; score AUC right over wrong {auc:.3f}); the dataset's own captions "
            f"{100 * real_wrong:.1f}% wrong, the teachers' targets on such a caption "
            f"{targets['real']['own_caption_wrong']:.3f} (on a right one {targets['real']['own_caption_right']:.3f})",
            f"no filter: {100 * unfiltered:.2f}% wrong synthetic captions", unfiltered /
            max(chosen["wrong_in_synthetic_batch"], 1e-12), command)


if __name__ == "__main__":
    main()
