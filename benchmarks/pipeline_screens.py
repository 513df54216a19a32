"""Issue #15 item 5's speed levers that change the teacher or the data, screened end to end against the committed run.

Each arm is the default recipe (`params.yaml`) with its overrides, run through the product's own stages in order
(prepare when the arm changes the data, teacher, reinforce, train, export, evaluate), each timed, into a scratch
directory. The reference is the committed `dvc repro` run: its stage times from `metrics/*.json` and its student
from the distillation screens' kept run of the default on the same stored views (test and validation splits). A lever
is adopted only when its student loses nothing beyond the noise (issue #15: colour+shape and shape on the validation
split) and the teacher stays above its gate.

    python benchmarks/pipeline_screens.py --arms teacher_steps_150 [--work DIR]

One arm at a time (on 2 cores two trainings at once each take 4x longer). A finished arm is kept under `--work` as
`<arm>-<key>.json`, the key hashing the resolved configuration: a rerun skips it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_screens  # noqa: E402
from common import ROOT, config_key, publish, replace_section  # noqa: E402

from lightclip_core.config import load_config  # noqa: E402
from lightclip_core.infra.storage import write_json_atomic  # noqa: E402
from lightclip_core.stages.data import run_prepare, run_reinforce, run_teacher  # noqa: E402
from lightclip_core.stages.evaluation import run_evaluate  # noqa: E402
from lightclip_core.stages.model import run_export, run_train  # noqa: E402

ARMS: dict[str, list[str]] = {  # overrides of params.yaml
    # the teacher is at 99.7% colour+shape against its 85% gate after 300 + 300 steps: half of each
    "teacher_steps_150": ["teacher.train.steps=150", "teacher.train.pretrain_steps=150"],
    # half the images, twice the epochs: the student's steps stay, prepare and reinforce halve
    "images_10000": ["data.synthetic.num_train=10000", "train.epochs=6.0"],
}
STAGES = ("prepare", "teacher", "reinforce", "train", "export", "evaluate")
TEACHER = {"teacher_colour_shape": "quality/model/zeroshot/colour_shape/top1",
           "teacher_shape": "quality/model/zeroshot/shape/top1",
           "caption_shape": "quality/captioner/captions/shape"}
TITLE = "## Pipeline speed screens, end to end (issue #15 item 5; benchmarks/pipeline_screens.py)"


def arm_config(arm: str):
    return load_config(ROOT / "params.yaml", [*ARMS[arm], "tracking.enabled=false"])


def run_key(cfg) -> str:
    """An arm's key: its resolved configuration only (it rebuilds its own teacher and views)."""
    return config_key(cfg)


def run_stages(cfg, changes_data: bool, work: Path) -> dict:
    """The product's stages in `dvc repro`'s order into `work`; the committed prepared data unless the arm changes
    it. Each stage's wall time (seconds), the teacher's quality and the student's scores."""
    seconds: dict[str, float] = {}

    def timed(stage: str, fn, **kwargs):
        start = time.perf_counter()
        out = fn(cfg=cfg, **kwargs)
        seconds[stage] = time.perf_counter() - start
        print(f"{stage}: {seconds[stage]:.0f} s", flush=True)
        return out

    data = work / "data" if changes_data else ROOT / "artifacts" / "data"
    if changes_data:
        timed("prepare", run_prepare, out=data)
    teacher = timed("teacher", run_teacher, data=data / "train", val=data / "val", out=work / "teacher")
    timed("reinforce", run_reinforce, data=data / "train", teacher=work / "teacher", out=work / "reinforced")
    trained = timed("train", run_train, data=work / "reinforced", out=work / "train")
    timed("export", run_export, checkpoint=trained.checkpoint, out=work / "export")
    row = {"seconds": seconds, **{k: teacher.metrics[name] for k, name in TEACHER.items()}}
    for prefix, split in (("", "test"), ("val_", "val")):
        scores = timed(f"evaluate_{split}", run_evaluate, model=work / "export", data=data / split,
                       out=work / f"eval-{split}").metrics
        row.update(distill_screens.metric_row(scores, prefix))
    seconds["evaluate"] = seconds.pop("evaluate_test")  # the pipeline evaluates the test split only
    seconds.pop("evaluate_val")
    return row


def reference() -> dict:
    """The committed `dvc repro` run: stage times from metrics/*.json, the student from its kept screen run."""
    seconds = {stage: json.loads((ROOT / "metrics" / f"{stage}.json").read_text())["wall_time_s"] for stage in STAGES}
    teacher = json.loads((ROOT / "metrics" / "teacher.json").read_text())
    key = distill_screens.run_key(distill_screens.arm_config("default", 0))
    kept = distill_screens.kept_run(ROOT / "benchmarks" / "results" / "distill-runs", 0, key)
    if kept is None:
        sys.exit("no kept run of the default on the committed stored views: "
                 "run `python benchmarks/distill_screens.py --arms default --seeds 0` first")
    student = {k: v for k, v in json.loads(kept.read_text()).items() if k in distill_screens.METRICS
               or k.removeprefix("val_") in distill_screens.METRICS}
    return {"seconds": seconds, **{k: teacher[name] for k, name in TEACHER.items()}, **student}


def run_arm(arm: str, work: Path) -> dict:
    cfg = arm_config(arm)
    kept = work / f"{arm}-{run_key(cfg)}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    scratch = Path(tempfile.mkdtemp(prefix=f"pipeline-{arm}-"))
    try:
        row = run_stages(cfg, any(o.startswith("data.") for o in ARMS[arm]), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    row.update(arm=arm, overrides=ARMS[arm])
    write_json_atomic(kept, row)
    return row


def total_s(row: dict, committed: dict) -> float:
    """All stages' seconds; an arm that reuses the committed prepared data counts the committed `prepare`."""
    return sum(row["seconds"].values()) + (0.0 if "prepare" in row["seconds"] else committed["seconds"]["prepare"])


def write_section(rows: dict[str, dict]) -> None:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = [TITLE, "",
             "Each arm runs the product's stages in `dvc repro`'s order with its overrides (prepare only where it "
             "changes the data); `committed run` is the `dvc repro -f` of the speed work (metrics/*.json), its student "
             "the kept screen run on the same views. Stage wall times in seconds, one run each, on the same machine; "
             "teacher figures on the validation split, the student's on test (validation in brackets). The total "
             "counts the committed `prepare` where an arm reuses its data.", "",
             "| arm | overrides | " + " | ".join(STAGES) + " | total | teacher colour+shape | captions' shape | "
             "student colour+shape | student shape | strict R@1 i2t / t2i |",
             "|---|---|" + "---|" * len(STAGES) + "---|---|---|---|---|---|"]
    for arm, r in rows.items():
        s = r["seconds"]
        overrides = ", ".join(f"`{o}`" for o in r.get("overrides", [])) or "(params.yaml)"
        lines.append(
            f"| {arm} | {overrides} | " + " | ".join(f"{s[k]:.0f}" if k in s else "-" for k in STAGES)
            + f" | {total_s(r, rows['committed run']):.0f} | {pct(r['teacher_colour_shape'])} | "
            f"{pct(r['caption_shape'])} | {pct(r['colour_shape'])} ({pct(r['val_colour_shape'])}) | "
            f"{pct(r['shape'])} ({pct(r['val_shape'])}) | {100 * r['i2t_R@1']:.1f} / {100 * r['t2i_R@1']:.1f}% |")
    replace_section("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["teacher_steps_150"], choices=list(ARMS))
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline-runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {"committed run": reference(), **{arm: run_arm(arm, args.work) for arm in args.arms}}
    write_section(rows)
    committed = rows["committed run"]
    ref = total_s(committed, committed)
    fastest = min(args.arms, key=lambda arm: total_s(rows[arm], committed))
    total = total_s(rows[fastest], committed)
    publish("pipeline_screens", {"rows": rows}, measured=f"{fastest}: {total:.0f} s over the stages, student "
            f"colour+shape {100 * rows[fastest]['colour_shape']:.1f}%",
            reference=f"committed run: {ref:.0f} s, colour+shape {100 * rows['committed run']['colour_shape']:.1f}%",
            ratio=ref / total, command="python benchmarks/pipeline_screens.py --arms " + " ".join(args.arms))


if __name__ == "__main__":
    main()
