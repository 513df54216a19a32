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

The ratio in the table: wrong captions in the synthetic batch without the filter over with it at --margin (> 1: the
filter leaves fewer wrong captions).

    python benchmarks/caption_filter.py [--data artifacts/reinforced/train] [--margin 0.05]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, publish  # noqa: E402

from lightclip_core.data.caption_attributes import ATTRIBUTES, parse_caption  # noqa: E402
from lightclip_core.data.caption_filter import teacher_scores  # noqa: E402
from lightclip_core.data.reinforced import decode_reinforcement  # noqa: E402
from lightclip_core.data.shards import decode_caption, iter_raw_samples, read_manifest, shard_refs  # noqa: E402
from lightclip_core.data.reader import decode_meta  # noqa: E402

MARGINS = (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


def is_right(caption: str, truth: dict[str, Any]) -> bool:
    named = parse_caption(caption)
    return all(getattr(named, a) is None or getattr(named, a) == truth[a] for a in ATTRIBUTES)


def collect(data: Path) -> dict[str, np.ndarray]:
    """Per (sample, view, synthetic caption): the score difference and whether the caption is right; per sample:
    whether the ground-truth caption is right."""
    dims = read_manifest(data)["reinforcement"]["dims"]
    diffs, syn_right, real_right = [], [], []
    for raw in iter_raw_samples(shard_refs(data)):
        truth, r = decode_meta(raw), decode_reinforcement(raw)
        if not all(a in truth for a in ATTRIBUTES):
            raise SystemExit(f"{data}: sample {raw['__key__']!r} has no true attributes in its json member; this "
                             f"measurement needs the embedded synthetic data")
        real_right.append(is_right(decode_caption(raw), truth))
        syn_right.append([is_right(t, truth) for t in r.syn_texts])
        diffs.append([teacher_scores(view, r.syn_text_emb, dims) - teacher_scores(view, r.text_emb, dims)[0]
                      for view in r.image_emb])
    return {"diff": np.array(diffs), "syn_right": np.array(syn_right), "real_right": np.array(real_right)}


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
             "margins": rows},
            f"margin {args.margin}: {100 * chosen['wrong_in_synthetic_batch']:.2f}% wrong captions in the synthetic "
            f"batch ({100 * chosen['kept']:.1f}% of synthetic captions kept, {100 * chosen['wrong_caught']:.1f}% of "
            f"the wrong ones dropped; score AUC right over wrong {auc:.3f}); the dataset's own captions "
            f"{100 * real_wrong:.1f}% wrong",
            f"no filter: {100 * unfiltered:.2f}% wrong synthetic captions", unfiltered /
            max(chosen["wrong_in_synthetic_batch"], 1e-12), command)


if __name__ == "__main__":
    main()
