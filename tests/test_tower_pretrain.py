"""A trained teacher's tower pretrained supervised on the split's labels, then locked (LiT): the labels it reads, that
it learns them, that a locked tower is published exactly as pretrained, and the configurations it refuses."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch

from lightclip_core.config import CocaTeacherConfig, Config, ConfigError
from lightclip_core.data.prepare import prepare
from lightclip_core.reinforce import coca_teacher as ct
from lightclip_core.reinforce.tower_pretrain import label_classes, pretrain_tower

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def tiny(**overrides) -> CocaTeacherConfig:
    values = dict(kind="clip", tower="mobilenetv2_050", embed_dim=32, image_size=32, text_width=32, text_layers=1,
                  text_heads=2, context_length=16, steps=4, batch_size=32, lr=3e-3, warmup_steps=1, seed=0,
                  pretrain_steps=8)
    return CocaTeacherConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    cfg = Config.model_validate({"data": {"samples_per_shard": 128, "synthetic": {
        "num_train": 256, "num_val": 16, "num_test": 16, "image_size": 32}}})
    prepare(cfg.data, root / "data")
    return root / "data" / "train"


def metadata(train_dir: Path) -> list[dict]:
    """Every sample's json, read with tarfile (not this package's reader)."""
    out = []
    for shard in sorted(train_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [json.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()
                    if m.name.endswith(".json")]
    return out


def test_label_classes_are_the_sorted_values_of_every_samples_metadata(train_dir):
    labels = ["colour", "shape", "size", "position"]
    metas = metadata(train_dir)
    assert len(metas) == 256
    assert label_classes(train_dir, labels) == {k: sorted({str(m[k]) for m in metas}) for k in labels}


def test_a_label_the_metadata_lacks_is_one_error_naming_it(train_dir):
    with pytest.raises(ConfigError, match="'texture' is not in the training samples' metadata"):
        label_classes(train_dir, ["colour", "texture"])


def test_pretraining_learns_the_labels_on_the_trunk(train_dir):
    """The tower's training accuracy after 40 steps on colour (8 classes, chance 12.5%) and position (5, 20%); the
    trunk's weights change."""
    c = tiny(tower="resnet10t", pretrain_steps=40)
    trunk = ct.create_from_dir(_config_dir(train_dir.parent.parent / "cfg", c), torch.device("cpu")).visual.trunk
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    figures = pretrain_tower(trunk, c, train_dir, MEAN, STD, "bicubic", torch.device("cpu"), 0.0)
    assert figures["pretrain/train_accuracy/colour"] > 0.5 and figures["pretrain/train_accuracy/position"] > 0.5
    assert figures["pretrain/skipped/total"] == 0
    assert not trunk.training
    assert any(not torch.equal(before[k], v) for k, v in trunk.state_dict().items())


def _config_dir(path: Path, c: CocaTeacherConfig) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ct.write_config(path, ct.model_config(c), ct.preprocess_config(c.image_size, MEAN, STD))
    return path


@pytest.mark.parametrize("lock", [True, False])
def test_a_locked_tower_is_published_exactly_as_pretrained(train_dir, tmp_path, monkeypatch, lock):
    """LiT: with lock_tower the contrastive steps leave the trunk's weights and batch-norm statistics as pretraining
    left them (the projection and text tower train); without it they move on."""
    pretrained = {}

    def recording(trunk, *args):
        figures = pretrain_tower(trunk, *args)
        pretrained.update({k: v.clone() for k, v in trunk.state_dict().items()})
        return figures

    monkeypatch.setattr(ct, "pretrain_tower", recording)
    result = ct.train_coca_teacher(tiny(lock_tower=lock), train_dir, tmp_path, MEAN, STD, device="cpu")
    assert result.metrics["pretrain/wall_time_s"] > 0
    published = open_clip.create_model(f"local-dir:{result.model_dir}", device="cpu")
    trunk = published.visual.trunk.state_dict()
    assert set(trunk) == set(pretrained)
    assert all(torch.equal(trunk[k], pretrained[k]) for k in trunk) is lock
    torch.manual_seed(0)  # the projection as the teacher's model started (seed 0, the first draws)
    start = ct.create_from_dir(result.model_dir, torch.device("cpu")).visual.head.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in published.visual.head.state_dict().items())


@pytest.mark.parametrize("overrides,fragment", [
    (dict(kind="coca", tower=None, embed_dim=32, text_width=32), "tower pretraining is for a timm tower"),
    (dict(pretrain_steps=0, lock_tower=True), "lock_tower=true needs pretrain_steps > 0"),
])
def test_refused_configurations(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny(**overrides)
