"""Structural reparameterization: every foldable block, ours and timm's, gives the same outputs folded and unfolded
(with non-trivial BatchNorm statistics and layer scales), and the walker refuses a model in training mode."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers_reparam import randomize_statistics
from timm.models.fastvit import MobileOneBlock, ReparamLargeKernelConv, RepConditionalPosEnc
from timm.models.fastvit import RepMixer as TimmRepMixer
from torch import nn

from lightclip_core.export.reparam import ReparameterizationError, parameter_count, reparameterize
from lightclip_core.models.repmixer import ConvFFN, RepMixer, RepMixerBlock

TOLERANCE = 1e-5
IMAGE, TOKENS = (2, 16, 9, 9), (2, 16, 1, 20)  # an image map, and a 20-token sequence laid out as [B, C, 1, L]

# name -> (block factory, input shape)
BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "repmixer_3x3_image": (lambda: RepMixer(16, 3), IMAGE),
    "repmixer_1x11_tokens": (lambda: RepMixer(16, (1, 11)), TOKENS),
    "repmixer_without_scale_branch": (lambda: RepMixer(16, 5, scale_branch=False), IMAGE),
    "convffn_1x11_tokens": (lambda: ConvFFN(16, (1, 11)), TOKENS),
    "repmixer_block_3x3_image": (lambda: RepMixerBlock(16, 3), IMAGE),
    "repmixer_block_1x11_tokens": (lambda: RepMixerBlock(16, (1, 11)), TOKENS),
    "timm_mobileone_block": (lambda: MobileOneBlock(16, 16, 3, num_conv_branches=4, use_se=True), IMAGE),
    "timm_repmixer": (lambda: TimmRepMixer(16, 3), IMAGE),
    "timm_large_kernel_conv": (lambda: ReparamLargeKernelConv(16, 16, 7, 1, 1, small_kernel=3), IMAGE),
    "timm_conditional_pos_enc": (lambda: RepConditionalPosEnc(16, spatial_shape=(7, 7)), IMAGE),
}


def folded_and_unfolded(build: Callable[[], nn.Module], *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          nn.Module]:
    torch.manual_seed(0)
    block = randomize_statistics(build()).eval()
    with torch.no_grad():
        unfolded = block(*inputs)
        reparameterize(block)
        return unfolded, block(*inputs), block


@pytest.mark.parametrize("name", BLOCKS)
def test_folded_block_matches_unfolded(name: str) -> None:
    build, shape = BLOCKS[name]
    before = parameter_count(build())
    unfolded, folded, block = folded_and_unfolded(build, torch.randn(shape))
    diff = (folded - unfolded).abs().max().item()
    assert diff <= TOLERANCE and diff <= TOLERANCE * unfolded.abs().max().item()  # also relative: outputs vary
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
    assert parameter_count(block) <= before


def test_masked_token_mixing_ignores_padding_folded_and_unfolded() -> None:
    """Real positions see zeros beyond the sequence, whether the map ends there or padding follows."""
    torch.manual_seed(0)
    block = randomize_statistics(RepMixerBlock(16, (1, 11))).eval()
    real = torch.randn(2, 16, 1, 7)
    padded = torch.cat([real, torch.randn(2, 16, 1, 13)], dim=-1)  # padding holds garbage, not zeros
    mask = (torch.arange(20) < 7).float().view(1, 1, 1, 20)
    for _ in ("unfolded", "folded"):
        with torch.no_grad():
            torch.testing.assert_close(block(padded, mask)[..., :7], block(real), atol=1e-6, rtol=0)
        reparameterize(block)


@pytest.mark.parametrize("tower", ["mobileone_s0", "repvit_m0_9"])  # timm's reparameterize() and fuse() hooks
def test_timm_tower_folds_through_the_walker(tower: str) -> None:
    import timm

    def build() -> nn.Module:
        return timm.create_model(tower, num_classes=0)

    before = parameter_count(build())
    unfolded, folded, model = folded_and_unfolded(build, torch.randn(2, 3, 64, 64))
    assert (folded - unfolded).abs().max().item() <= TOLERANCE * unfolded.abs().max().item()
    assert parameter_count(model) < before


def test_training_mode_is_refused_with_one_line() -> None:
    block = RepMixerBlock(16, 3).train()
    with pytest.raises(ReparameterizationError, match="training mode.*call model.eval") as err:
        reparameterize(block)
    assert "\n" not in str(err.value)
    assert block.token_mixer.reparam_conv is None  # nothing was folded


def test_a_submodule_left_in_training_mode_is_refused() -> None:
    model = nn.Sequential(RepMixer(8, 3), RepMixer(8, 3)).eval()
    model[1].train()
    with pytest.raises(ReparameterizationError, match="module '1'"):
        reparameterize(model)


def test_reparameterizing_twice_changes_nothing() -> None:
    _, _, block = folded_and_unfolded(lambda: RepMixerBlock(16, (1, 11)), torch.randn(TOKENS))
    state = {k: v.clone() for k, v in block.state_dict().items()}
    reparameterize(block)
    assert block.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


def test_odd_kernels_only() -> None:
    with pytest.raises(ValueError, match="odd"):
        RepMixer(8, (1, 10))
