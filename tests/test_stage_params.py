"""One list says which parameters each stage reads (lightclip_core/stages/params.py): DVC's `params:` in dvc.yaml
must say the same, and the Kubeflow cache locations that follow from it must stay where they were."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightclip_core.config import Config, load_config, validate
from lightclip_core.stages.params import READS, UPSTREAM, fingerprint, lineage_reads, stage_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def dvc_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("params", []) for name, stage in stages.items()}


def test_dvc_yaml_declares_exactly_the_parameters_each_stage_reads() -> None:
    declared = dvc_params()
    assert sorted(declared) == sorted(READS)
    for stage, keys in declared.items():
        assert sorted(keys) == sorted(READS[stage]), stage


@pytest.mark.parametrize("stage", sorted(READS))
def test_every_listed_key_exists_in_the_schema(stage: str) -> None:
    dumped = Config().model_dump(mode="json")
    for key in READS[stage]:
        node = dumped
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: {key}"
            node = node[part]


def test_upstream_stages_form_the_pipeline_order() -> None:
    order = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    for stage, above in UPSTREAM.items():
        assert all(order.index(a) < order.index(stage) for a in above), stage


def test_lineage_collapses_a_section_whose_every_field_is_read() -> None:
    # reinforce reads teacher.ensemble/captioner/second/gate, the teacher stage above it teacher.train: the whole
    # section; the teacher stage's caption-sampling keys are inside `reinforce`, which reinforce reads whole
    assert lineage_reads("reinforce") == ["data", "evaluate.templates", "model.image.mean", "model.image.std",
                                          "reinforce", "teacher"]
    assert lineage_reads("teacher") == ["data", "evaluate.templates", "model.image.mean", "model.image.std",
                                        "reinforce.max_caption_tokens", "reinforce.num_captions", "reinforce.seed",
                                        "reinforce.temperature", "reinforce.top_p", "teacher.second", "teacher.train"]


# The locations the Kubeflow stages used before the stage list existed (written by hand in each component body;
# computed with that code on the commit before this list): caches and object stores made then must still be found.
# The reinforce locations moved once on purpose, with the stored views (issue #15: `reinforce.ops` and the
# caption-keeping crop and op defaults store different views; they were 73dfc4b09c8136b4 and a0ddef5d6599f457).
# The teacher locations moved once on purpose too: the stage measures its teachers' quality (it reads
# evaluate.templates and the caption-sampling keys) and teacher sections have new fields (baef3fb9fccda3ac and
# bb21bb49d5379fcd before), which moves reinforce again (d8e30be8c23977c6 and 066111f28378ae9f before).
# All three moved once more on purpose with issue #18: data.ingest.max_skip_fraction became data.max_skip_fraction, the
# one limit of every stage that reads samples (prepare e4f82c2f5102a48b / e4eead3306cbb9fc, teacher bd9ef83ea2bd5f38 /
# 7d4661f91456c295, reinforce 7d35c3695d4dbb45 / 05a0e4bf9287436a before, default / tiny).
# Teacher and reinforce moved once more on purpose with issue #15's LiT teacher: teacher sections have the pretrain_*
# and lock_tower fields, and the default teacher, second and gate changed (teacher ebc181e9ab809ff7 / 04f95728f823ea48,
# reinforce 497bd65fa39f7856 / d40a000c39c65591 before).
BEFORE = {
    "default": {"prepare": "04fb48a12a8cb62c", "teacher": "0c9be45e71ff9b49", "reinforce": "e2f9b6fa06a070ba"},
    "tiny": {"prepare": "2392c39365c06cd3", "teacher": "79168348c27795ea", "reinforce": "11d5ec1db9eaab47"},
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_pure_stage_locations_are_unchanged(name: str) -> None:
    from helpers_tiny import TINY

    cfg = load_config(ROOT / "params.yaml") if name == "default" else validate(TINY)
    assert {stage: stage_fingerprint(cfg, stage) for stage in BEFORE[name]} == BEFORE[name]


def test_a_location_changes_with_a_parameter_upstream_and_not_downstream() -> None:
    base = validate({})
    changed = validate({"teacher": {"train": {"steps": 7}}})
    assert stage_fingerprint(base, "prepare") == stage_fingerprint(changed, "prepare")
    assert stage_fingerprint(base, "teacher") != stage_fingerprint(changed, "teacher")
    assert stage_fingerprint(base, "reinforce") != stage_fingerprint(changed, "reinforce")
    assert fingerprint(base, "data") == stage_fingerprint(base, "prepare")


def test_every_pure_stage_writes_its_metrics_file_to_git_not_to_the_cache() -> None:
    """`dvc metrics diff` compares commits: each stage's figures and wall time are a `cache: false` metrics file
    that its command writes (`--metrics`), committed with dvc.lock."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if name == "register":  # a side effect on the registry; its record is an uncached output already
            continue
        path = f"metrics/{name}.json"
        assert f"--metrics {path}" in " ".join(stage["cmd"].split()), name
        assert stage["metrics"] == [{path: {"cache": False}}], name
