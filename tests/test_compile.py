"""``--compile`` (each transformer block compiled by inductor, here with the machine's C compiler): one graph per
crop size and gradient mode serves every block, the compiled step computes what the eager one does, and training,
resuming and a retrofit work with it. Slow: compiling takes about a minute on 2 cores; inductor's artefacts are
shared by every test of the session (the ``inductor_cache`` fixture of conftest.py)."""
import json

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import make_images, tiny_config
from torch._dynamo.utils import counters

from dino_sparo.models import vit_tiny
from dino_sparo.models.backbone import DropPath
from dino_sparo.train import train_dino
from dino_sparo.train.build import build_models, build_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("inductor_cache")]


def graphs_of_one_step(arch: str, depth: int, *extra: str) -> int:
    """Dynamo graphs compiled (by the cheap "eager" backend: the count is what matters) for one training step's
    forward and backward passes: the teacher on the global crops, the student on global and local crops."""
    args = tiny_config("unused", "unused", "--arch", arch, "--depth", depth, "--patch_size", "8", "--drop_path_rate",
                     "0.2", "--precision", "fp32", *extra)
    student, teacher = build_models(args, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    for model in (student, teacher):
        model.backbone.compile_blocks(backend="eager")
    assert torch._dynamo.config.optimize_ddp is False  # no split of a block at DDP's bucket boundaries
    global_crops = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    local_crops = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    frozen = None if "--freeze_blocks" not in extra else int(extra[extra.index("--freeze_blocks") + 1])
    for _ in range(2):  # the second step must find every graph it needs
        shared = {} if frozen is None else {"frozen_tokens": student.frozen_tokens(global_crops + local_crops, frozen),
                                            "frozen_blocks": frozen}
        with torch.no_grad():
            teacher(global_crops, **shared)
        student(global_crops + local_crops, **shared).square().sum().backward()
    torch._dynamo.reset()
    return counters["stats"]["unique_graphs"]


def test_drop_path_keeps_timms_rates_and_state_keys_and_drops_whole_samples_at_its_rate():
    model = vit_tiny(patch_size=8, depth=4, drop_path_rate=0.3, sparo_slots=4, sparo_slot_dim=8)
    # timm's rates over the full depth (0, 0.1, 0.2, 0.3), of which SPARO keeps the first three blocks
    assert [round(float(block.drop_path2.drop_prob), 6) for block in model.blocks] == [0.0, 0.1, 0.2]
    assert not any("drop_prob" in key for key in model.state_dict())
    drop_path = DropPath(0.25)
    out = drop_path(torch.ones(20000, 3, 2))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(dim=1).values, per_sample.max(dim=1).values)  # a sample is kept or dropped
    assert set(per_sample[:, 0].tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # kept: scaled by 1 / keep
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.015  # 5 binomial standard deviations
    x = torch.randn(4, 3, 2)
    assert drop_path.eval()(x) is x


@pytest.mark.parametrize("arch", ["vit_tiny", "dinov3_vits16"])
def test_one_graph_per_crop_size_and_gradient_mode_serves_every_block(arch):
    """Each block has its own stochastic-depth rate; were the rates constants to Dynamo, each block would compile
    graphs of its own (and past the recompile limit run eagerly). Three graphs: the student's global and local
    crops, the teacher's global crops without gradients, whatever the depth."""
    assert graphs_of_one_step(arch, 6) == 3


def test_a_retrofit_compiles_graphs_per_kind_of_block_not_per_block():
    """With 2 blocks frozen: the frozen blocks (no stochastic depth, no gradients) on both crop sizes, which the
    teacher's blocks on the global crops share; the first trainable block of the student, whose input (the frozen
    tokens) needs no gradient, on both sizes; the other trainable blocks on both sizes. Six, whatever the depth."""
    assert graphs_of_one_step("vit_tiny", 5, "--freeze_blocks", "2") == 6
    assert graphs_of_one_step("vit_tiny", 8, "--freeze_blocks", "2") == 6


def one_step(readout: str, compiled: bool):
    args = tiny_config("unused", "unused", "--readout", readout, "--precision", "fp32", "--drop_path_rate", "0",
                     "--compile", str(compiled).lower(), "--patch_size", "8")
    torch.manual_seed(0)
    step = build_training(args)
    for group in step.optimizer.param_groups:
        group["lr"] = 1e-3
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    loss = step([crops], epoch=1, momentum=0.99)["loss"]
    return loss, torch.cat([p.grad.flatten() for p in step.student_module.parameters() if p.grad is not None])


@pytest.mark.parametrize("readout", ["cls", "sparo"])
def test_the_compiled_step_equals_the_eager_step(readout):
    eager_loss, eager_grads = one_step(readout, compiled=False)
    compiled_loss, compiled_grads = one_step(readout, compiled=True)
    assert abs(float(compiled_loss - eager_loss)) <= 1e-4 * abs(float(eager_loss))
    assert compiled_grads.shape == eager_grads.shape
    assert float(F.cosine_similarity(compiled_grads, eager_grads, dim=0)) > 0.999


def test_training_resuming_and_a_retrofit_work_compiled(tmp_path):
    images = make_images(tmp_path / "images", count=8, size=32)
    out = tmp_path / "out"
    common = ("--precision", "fp32", "--compile", "true", "--patch_size", "8")
    train_dino(tiny_config(images, out, "--epochs", "1", *common))
    resumed = train_dino(tiny_config(images, out, "--epochs", "2", *common))
    assert resumed.start_epoch == 1
    with open(out / "log.txt") as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [0, 1]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    eager, _ = build_models(tiny_config(images, out, "--patch_size", "8"), torch.device("cpu"))
    assert saved["student"].keys() == eager.state_dict().keys()  # compiling leaves the parameter names alone

    retrofit = train_dino(tiny_config(images, tmp_path / "retrofit", "--epochs", "1", "--init_from",
                                    str(out / "checkpoint.pth"), "--freeze_blocks", "all", *common))
    frozen = retrofit.student.backbone.blocks[0].attn.qkv.weight
    torch.testing.assert_close(frozen, saved["teacher"]["backbone.blocks.0.attn.qkv.weight"])
