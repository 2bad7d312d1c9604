"""The benchmarks' baselines compute what they are compared with, and the torchrun launcher works.

Nothing here is timed: the per-anchor loop formulations of ``benchmarks/losses.py`` must equal the modules (loss
and input gradients) at a small size, a wrong formulation must fail that check, ``benchmarks/finetune.py``'s
baseline must run on the padded captions its "+trim padding" row cuts, and ``benchmarks/ddp_training.py`` must
train under torchrun with 2 processes.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ddp_training  # noqa: E402
import finetune  # noqa: E402
import losses  # noqa: E402

from xmr.encoders import ProjectionHead, Tower, masked_mean  # noqa: E402


@pytest.mark.parametrize("case", losses.CASES, ids=lambda case: case.name)
def test_loop_formulation_equals_the_module(case):
    leaves, constants = case.inputs(12, 16, 20, torch.Generator().manual_seed(1))
    assert losses.check(case, leaves, constants) < 1e-4


def test_check_rejects_a_loop_formulation_that_differs():
    infonce = next(case for case in losses.CASES if case.name == "InfoNCE")
    wrong = losses.Case("InfoNCE, doubled", infonce.equation, infonce.inputs, infonce.module,
                        lambda image, text: 2 * losses.loop_infonce(image, text))
    leaves, constants = wrong.inputs(12, 16, 20, torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match="InfoNCE, doubled"):
        losses.check(wrong, leaves, constants)


def test_memory_dcl_loop_uses_the_bank():
    case = next(case for case in losses.CASES if case.name.startswith("M-DCL"))
    leaves, (image_keys, text_keys, image_bank, text_bank) = case.inputs(6, 4, 10, torch.Generator().manual_seed(2))
    with_bank = losses.loop_memory_dcl(*leaves, image_keys, text_keys, image_bank, text_bank)
    other_bank = losses.loop_memory_dcl(*leaves, image_keys, text_keys, -image_bank, -text_bank)
    assert not torch.isclose(with_bank, other_bank)


def test_torchrun_launch_trains_with_two_processes():
    figures = ddp_training.launch(processes=2, threads=1, head="linear", images=64, epochs=1, batch_size=16)
    assert figures["world_size"] == 2 and figures["threads"] == 1
    assert figures["pairs_per_s"] > 0 and math.isfinite(figures["final_loss"])


def test_finetune_baseline_keeps_the_padding_that_its_trim_row_cuts():
    lengths = []

    class Upper(torch.nn.Module):  # records the caption length the top layer sees
        def forward_upper(self, hidden, mask):
            lengths.append(hidden.shape[1])
            return {"pooled": masked_mean(hidden, mask)}

    tower = Tower(ProjectionHead(8, 4), Upper())
    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[:, :4] = 1
    for trim in (False, True):
        with finetune.padding(trim):
            tower(torch.randn(3, 10, 8), mask)
    assert lengths == [10, 4]
