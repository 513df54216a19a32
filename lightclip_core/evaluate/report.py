"""The evaluation report a stakeholder reads without the code (Markdown and a self-contained HTML page), and the
model card that becomes the description of a registered model version.

Plain functions of plain data: the evaluate stage calls them without a comparison, the register stage again with
the comparison against the current champion and the lineage of the run.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightclip_core.infra.storage import write_bytes_atomic

REPORT_MD, REPORT_HTML = "report.md", "report.html"
STRICT = "retrieval"  # metric prefixes of the retrieval definitions (lightclip_core/evaluate/retrieval.py)
TEXT_EQUIVALENT = "retrieval_text_equivalent"
ATTRIBUTE = "retrieval_attribute"  # synthetic test data only, as the oracle
ORACLE = "retrieval_oracle"
RETRIEVAL_DEFINITIONS = {STRICT: "strict", TEXT_EQUIVALENT: "text-equivalent", ATTRIBUTE: "attribute-consistent",
                         ORACLE: "attribute oracle (strict)"}  # prefix -> its name in the report, in report order
HEADLINE_RETRIEVAL = f"{STRICT}/image_to_text/R@1"
WISE_FT = "wise_ft"  # metric prefix of the WiSE-FT curve: wise_ft/<alpha>/<metric>
BENCHMARK = "benchmark"  # metric prefix of the benchmark sets: benchmark/<name>/<metric>
_CSS = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}")


@dataclass
class GateFigures:
    """What a registration's gate compares: the candidate's value of the gate metric, for the registered model."""

    model_name: str
    gate_metric: str
    margin: float
    candidate_value: float


@dataclass
class Comparison(GateFigures):
    """The gate decision of a registration: the candidate against the champion it met (None: no champion)."""

    candidate_version: str
    promoted: bool
    reason: str
    champion_version: str | None = None
    champion_value: float | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ReportInputs:
    """What the report describes. `plots` maps a plot name to its path relative to the report's directory."""

    metrics: dict[str, float]
    per_class: dict[str, Any]
    export_config: dict[str, Any]  # its `lineage` says what the model was trained on and how
    test_data: dict[str, Any]  # lightclip_core.data.shards.describe_dataset of the test split
    plots: dict[str, str] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)  # steps, final loss, ... from the training log
    comparison: Comparison | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    benchmarks: dict[str, Any] = field(default_factory=dict)  # set name -> what it is (benchmarks.json)
    wise_ft: dict[str, dict[float, float]] = field(default_factory=dict)  # headline metric -> alpha -> value


# ------------------------------------------------------------------------------------------------ pieces
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_model(export_config: dict[str, Any]) -> str:
    mc = export_config.get("model_config", {})
    image, text = mc.get("image", {}), mc.get("text", {})
    params = export_config.get("param_count")
    size = f", {params / 1e6:.2f} M parameters" if params else ""
    return (f"CLIP model with a `{image.get('tower')}` image tower ({image.get('size')} px input) and a "
            f"{text.get('layers')}-layer text transformer (width {text.get('width')}, context "
            f"{text.get('context_length')} tokens), {export_config.get('embed_dim')}-d embeddings{size}")


NOT_RECORDED = "not recorded with the model (an export made before its training lineage was kept)"


def describe_data(data: dict[str, Any] | None) -> str:
    """A split as lightclip_core.data.shards.describe_dataset summarises it."""
    if not data:
        return NOT_RECORDED
    tasks = ", ".join(data.get("tasks") or []) or "none"
    count = data.get("num_samples")
    count = f"{count:,}" if isinstance(count, int) else "?"
    kind = "reinforced " if data.get("reinforced") else ""
    return (f"{count} image-text samples, {kind}`{data.get('split')}` split of the `{data.get('source')}` dataset "
            f"({_count(data.get('num_shards') or 0, 'shard')}; zero-shot tasks: {tasks})")


def trained_on(export_config: dict[str, Any]) -> dict[str, Any]:
    """The training lineage the export carries: `data`, `train` (parameters) and `objectives`; empty if none."""
    return export_config.get("lineage") or {}


def describe_training(export_config: dict[str, Any], training: dict[str, float]) -> str:
    """How the model was trained, from its own lineage (and the step log's figures)."""
    t = trained_on(export_config).get("train")
    loss = f", final loss {training['final_loss']:.3f}" if "final_loss" in training else ""
    if not t:
        steps = f"{int(training['steps'])} steps" if "steps" in training else "an unknown number of steps"
        return f"{steps}{loss}; training parameters {NOT_RECORDED}"
    steps = f"{int(training['steps'])} steps" if "steps" in training else (
        f"{t['max_steps']} steps" if t.get("max_steps") else f"{t['epochs']:g} epochs")
    objectives = ", ".join(trained_on(export_config).get("objectives") or []) or "?"
    return (f"{steps} at batch size {t['batch_size']}, learning rate {t['lr']:g} ({t['precision']}), objectives: "
            f"{objectives}{loss}")


def zero_shot_rows(metrics: dict[str, float], per_class: dict[str, Any]) -> list[list[str]]:
    rows = []
    for task in sorted({k.split("/")[1] for k in metrics if k.startswith("zeroshot/")}):
        classes = per_class.get(task, {}).get("classes", [])
        chance = 1 / len(classes) if classes else None
        rows.append([task, str(len(classes) or "?"), _pct(chance), _pct(metrics.get(f"zeroshot/{task}/top1")),
                     _pct(metrics.get(f"zeroshot/{task}/top5")),
                     _pct(metrics.get(f"zeroshot/{task}/mean_per_class_recall"))])
    return rows


def retrieval_rows(metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """One row per direction and definition of RETRIEVAL_DEFINITIONS that was measured."""
    prefixes = tuple(f"{prefix}/" for prefix in RETRIEVAL_DEFINITIONS)
    ks = sorted({int(k.rsplit("R@", 1)[1]) for k in metrics if k.startswith(prefixes)})
    rows = []
    for prefix, name in RETRIEVAL_DEFINITIONS.items():
        for direction in ("image_to_text", "text_to_image"):
            if any(k.startswith(f"{prefix}/{direction}/") for k in metrics):
                rows.append([direction.replace("_", " "), name] +
                            [_pct(metrics.get(f"{prefix}/{direction}/R@{k}")) for k in ks])
    return ["direction", "definition"] + [f"R@{k}" for k in ks], rows


def _set_metrics(metrics: dict[str, float], name: str) -> dict[str, float]:
    prefix = f"{BENCHMARK}/{name}/"
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def benchmark_tables(metrics: dict[str, float], sets: dict[str, Any]) -> list[str]:
    """A table of the classification sets and one per retrieval set (Markdown blocks), from `benchmark/<name>/...`."""
    classification, blocks = [], []
    for name, about in sorted(sets.items()):
        m = _set_metrics(metrics, name)
        where = f"`{about.get('format', '?')}` {about.get('path', '')}"
        if about.get("kind") == "classification":
            classes = about.get("classes") or []
            classification.append([name, where, str(int(m.get("num_images", 0))), str(len(classes)),
                                   _pct(1 / len(classes) if classes else None), _pct(m.get("top1")),
                                   _pct(m.get("top5")), _pct(m.get("mean_per_class_recall"))])
        else:
            header, rows = retrieval_rows(m)
            blocks += [f"**{name}** ({where}): {int(m.get('num_images', 0))} images, "
                       f"{int(m.get('num_captions', 0))} captions.", "", _table(header, rows), ""]
    if classification:
        blocks = [_table(["set", "format and path", "images", "classes", "chance", "top-1", "top-5",
                          "mean per-class recall"], classification), ""] + blocks
    return blocks


def benchmark_headline(metrics: dict[str, float], sets: dict[str, Any]) -> list[str]:
    """One phrase per benchmark set: its top-1, or its strict image-to-text R@1."""
    out = []
    for name, about in sorted(sets.items()):
        m = _set_metrics(metrics, name)
        out.append(f"**{name}** zero-shot top-1 {_pct(m.get('top1'))}" if about.get("kind") == "classification"
                   else f"**{name}** image-to-text R@1 {_pct(m.get(f'{STRICT}/image_to_text/R@1'))} strict, "
                        f"{_pct(m.get(f'{TEXT_EQUIVALENT}/image_to_text/R@1'))} text-equivalent")
    return out


def wise_ft_curves(metrics: dict[str, float]) -> dict[str, dict[float, float]]:
    """Headline metric -> alpha -> value, from the `wise_ft/<a>/...` metrics: every zero-shot top-1, the strict
    image-to-text R@1, and every benchmark set's top-1 or strict image-to-text R@1."""
    headline = re.compile(rf"^{WISE_FT}/([^/]+)/((?:{BENCHMARK}/[^/]+/)?(?:zeroshot/[^/]+/top1|top1|"
                          rf"{STRICT}/image_to_text/R@1))$")
    curves: dict[str, dict[float, float]] = {}
    for key, value in metrics.items():
        match = headline.match(key)
        if match:
            curves.setdefault(match.group(2), {})[float(match.group(1))] = value
    return {name: dict(sorted(curve.items())) for name, curve in sorted(curves.items())}


def wise_ft_section(curves: dict[str, dict[float, float]], exported_alpha: float | None, plot: str | None) -> list[str]:
    alphas = sorted({a for curve in curves.values() for a in curve})
    rows = [[f"{a:g}" + (" (exported)" if exported_alpha is not None and a == exported_alpha else "")] +
            [_pct(curves[name].get(a)) for name in curves] for a in alphas]
    out = ["## WiSE-FT", "",
           "The model's weights interpolated between the weights its training started from (alpha 0) and the "
           "fine-tuned ones (alpha 1), `(1 - alpha) * start + alpha * fine-tuned` (Wortsman et al., \"Robust "
           "fine-tuning of zero-shot models\"); `export.wise_ft_alpha` picks the one that is exported and "
           "registered. Metrics are in `metrics.json` under `wise_ft/<alpha>/`.", "",
           _table(["alpha"] + [f"`{name}`" for name in curves], rows)]
    return out + (["", f"![WiSE-FT curve]({plot})"] if plot else [])


def retrieval_headline(metrics: dict[str, float]) -> str:
    """Image-to-text R@1 by every definition measured, strict first."""
    values = [(name, metrics.get(f"{prefix}/image_to_text/R@1")) for prefix, name in RETRIEVAL_DEFINITIONS.items()]
    return "image-to-text retrieval R@1 " + ", ".join(f"{_pct(v)} {name}" for name, v in values if v is not None)


ATTRIBUTE_TEXT = (
    " *Attribute-consistent* (synthetic test data, whose images have known attributes) counts any caption all of "
    "whose named attributes (colour, shape, size, position, in any of the caption grammar's wordings) are true of the "
    "image, and any image of which all the query caption's named attributes are true. The *attribute oracle* row is "
    "not the model: it is a ranker that knows every image's attributes and ranks the captions consistent with an "
    "image first (those naming more attributes first, ties in a seeded random order) and the images consistent "
    "with a caption first (ties in a seeded random order); its strict recall shows roughly how far strict retrieval "
    "can go on this data when captions with the same content cannot be told apart.")


def comparison_section(c: Comparison, metrics: dict[str, float]) -> str:
    if c.champion_version is None:
        verdict = f"There was no champion: version {c.candidate_version} becomes the champion."
    elif c.promoted:
        verdict = (f"Version {c.candidate_version} **replaces** champion version {c.champion_version}: "
                   f"{c.reason}.")
    else:
        verdict = (f"Version {c.candidate_version} is **not promoted**; version {c.champion_version} stays the "
                   f"champion: {c.reason}.")
    parts = ["## Comparison with the current champion", "",
             f"Gate: `{c.gate_metric}` must beat the champion by more than {c.margin:g}. {verdict}", ""]
    if c.champion_metrics:
        rows = []
        for key in sorted(set(metrics) & set(c.champion_metrics)):
            if key == "num_test_samples":
                continue
            new, old = metrics[key], c.champion_metrics[key]
            mark = " (gate)" if key == c.gate_metric else ""
            rows.append([f"`{key}`{mark}", _pct(new), _pct(old), f"{100 * (new - old):+.1f} pts"])
        parts.append(_table(["metric", f"candidate v{c.candidate_version}", f"champion v{c.champion_version}",
                             "change"], rows))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ report
def build_report(r: ReportInputs, title: str) -> str:
    """The report as Markdown (plots referenced by relative path)."""
    m = r.metrics
    tasks = zero_shot_rows(m, r.per_class)
    headline = [f"zero-shot top-1 on **{row[0]}** {row[3]} (chance {row[2]})" for row in tasks]
    if HEADLINE_RETRIEVAL in m:
        headline.append(retrieval_headline(m))
    headline += benchmark_headline(m, r.benchmarks)
    out = [f"# {title}", "", "## Summary", "",
           f"- **Model:** {describe_model(r.export_config)}.",
           f"- **Trained** for {describe_training(r.export_config, r.training)}.",
           f"- **Training data:** {describe_data(trained_on(r.export_config).get('data'))}.",
           f"- **Test data:** {describe_data(r.test_data)}.",
           f"- **Results:** {'; '.join(headline)}."]
    if r.comparison is not None:
        out += ["", comparison_section(r.comparison, m)]
    out += ["", "## Zero-shot classification", "",
            "Each test image is matched against one text prompt per class (\"a photo of a {class}.\" and similar); "
            "top-1 is the share of images whose best prompt names the right class, top-5 whether it is among the "
            "five best. Chance is one over the number of classes.", "",
            _table(["task", "classes", "chance", "top-1", "top-5", "mean per-class recall"], tasks)]
    for task in sorted(r.per_class):
        if f"{task}/per_class" in r.plots:
            out += ["", f"![per-class accuracy, {task}]({r.plots[f'{task}/per_class']})"]
    header, rows = retrieval_rows(m)
    out += ["", "## Image-text retrieval", "",
            "For each test image, is one of its captions among the k captions the model ranks highest (image to "
            "text), and for each caption, is its image among the k best images (text to image)? *Strict* counts "
            "only the image's own captions (and the caption's own image). *Text-equivalent* also counts a caption "
            "of another image with the same text (case and spacing aside), and an image that has a caption with "
            "the query's text: where captions repeat across images (class names, a caption grammar), strict "
            "retrieval cannot tell identical captions apart and its ceiling is below 100%." + (
                ATTRIBUTE_TEXT if any(k.startswith(f"{ATTRIBUTE}/") for k in m) else ""), "",
            _table(header, rows)]
    for name, caption in (("retrieval", "recall at k"), ("similarity", "image-text similarity")):
        if name in r.plots:
            out += ["", f"![{caption}]({r.plots[name]})"]
    if r.benchmarks:
        out += ["", "## Benchmark sets", "",
                "Standard sets evaluated beside the test split (`evaluate.benchmarks`): zero-shot classification "
                "with the set's class names and prompt templates, retrieval by the strict and text-equivalent "
                "definitions above. Metrics are in `metrics.json` under `benchmark/<set>/`.", ""]
        out += benchmark_tables(m, r.benchmarks)
    if r.wise_ft:
        exported_alpha = (r.export_config.get("wise_ft") or {}).get("alpha")
        out += [""] + wise_ft_section(r.wise_ft, exported_alpha, r.plots.get("wise_ft"))
    if "training_curves" in r.plots:
        out += ["", "## Training", "", f"![training curves]({r.plots['training_curves']})"]
    if r.lineage:
        out += ["", "## Lineage", "", _table(["what", "value"], [[k, f"`{v}`"] for k, v in r.lineage.items()])]
    return "\n".join(out) + "\n"


def to_html(markdown: str, base_dir: Path, title: str) -> str:
    """A single HTML page: the Markdown rendered, plots embedded as data URIs (it opens anywhere, offline)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(match: re.Match) -> str:
        path = base_dir / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")


def write_report(r: ReportInputs, out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write `report.md` and `report.html` into `out_dir` (plots must already be there, at `r.plots`)."""
    out_dir = Path(out_dir)
    markdown = build_report(r, title)
    write_bytes_atomic(out_dir / REPORT_MD, markdown.encode())
    write_bytes_atomic(out_dir / REPORT_HTML, to_html(markdown, out_dir, title).encode())
    return {"markdown": out_dir / REPORT_MD, "html": out_dir / REPORT_HTML}


# -------------------------------------------------------------------------------------------- model card
def model_card(r: ReportInputs) -> str:
    """Short Markdown for the registered model version: what it is, its data, its figures, its lineage."""
    c = r.comparison
    lines = [f"**LightCLIP** {describe_model(r.export_config)}.", "",
             f"- Trained for {describe_training(r.export_config, r.training)}.",
             f"- Training data: {describe_data(trained_on(r.export_config).get('data'))}.",
             f"- Test data: {describe_data(r.test_data)}."]
    if c is not None:
        old = "no champion" if c.champion_version is None else \
            f"champion v{c.champion_version}: {_pct(c.champion_value)}"
        lines.append(f"- Gate `{c.gate_metric}` (margin {c.margin:g}): {_pct(c.candidate_value)} vs {old} -> "
                     f"{'promoted to champion' if c.promoted else 'not promoted'}.")
    lines += ["", _table(["task", "classes", "chance", "top-1", "top-5", "mean per-class recall"],
                         zero_shot_rows(r.metrics, r.per_class))]
    header, rows = retrieval_rows(r.metrics)
    lines += ["", _table(header, rows)]
    if r.benchmarks:
        lines += ["", "Benchmark sets:", ""] + benchmark_tables(r.metrics, r.benchmarks)
    if r.lineage:
        lines += ["", "Lineage: " + "; ".join(f"{k} `{v}`" for k, v in r.lineage.items()) + "."]
    lines += ["", "Use: `mlflow.pyfunc.load_model(\"models:/<name>@champion\").predict(df)` with a DataFrame of "
                  "`image` (encoded bytes or HxWx3 uint8 arrays) and/or `text`; pass "
                  "`params={\"classnames\": [...]}` for zero-shot labels."]
    return "\n".join(lines) + "\n"
