"""The probes' parts: the heads' maths against loops, what they read from every backbone, the grid trained at once
equal to its heads trained alone, the schedules, the held-out split, and learning where position matters."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODEL, backbone_of

from dino_sparo.distributed import DistributedContext
from dino_sparo.errors import UserError
from dino_sparo.eval.probes.batches import CachedBatches
from dino_sparo.eval.probes.grid import GridPoint, ProbeGrid, choose
from dino_sparo.eval.probes.heads import CrossAttentionProbe, EfficientProbe, build_head
from dino_sparo.eval.probes.holdout import holdout_size, split_holdout
from dino_sparo.eval.probes.inputs import FeatureSet, LinearInputs, ProbeFeatures, ProbeTokens
from dino_sparo.eval.probes.recipes import RECIPES, build_optimizer, lr_factor
from dino_sparo.eval.probes.train import score, train_epoch


def test_efficient_probe_keeps_only_the_value_projection_and_matches_a_loop():
    torch.manual_seed(1)
    dim, queries, batch, tokens_per_image = 8, 4, 3, 5
    probe = EfficientProbe(dim, num_labels=3, num_queries=queries)
    assert {name: tuple(p.shape) for name, p in probe.named_parameters()} == {
        "queries": (1, queries, dim), "value.weight": (dim, dim), "linear.weight": (3, dim), "linear.bias": (3,)}
    with torch.no_grad():
        probe.queries.normal_()  # away from the 0.02 initialisation, so the attention is far from uniform
        probe.norm.running_mean.normal_()
        probe.norm.running_var.uniform_(0.5, 2.0)
    probe.eval()
    tokens = torch.randn(batch, tokens_per_image, dim)
    width = dim // queries
    pooled = torch.zeros(batch, dim)
    for b in range(batch):
        for q in range(queries):
            logits = torch.stack([probe.queries[0, q] @ tokens[b, n] for n in range(tokens_per_image)]) / math.sqrt(dim)
            weights = logits.exp() / logits.exp().sum()
            for n in range(tokens_per_image):
                value = probe.value.weight @ tokens[b, n]
                pooled[b, q * width:(q + 1) * width] += weights[n] * value[q * width:(q + 1) * width]
    with torch.no_grad():
        torch.testing.assert_close(probe.pool(tokens), pooled)
        normed = (pooled - probe.norm.running_mean) / torch.sqrt(probe.norm.running_var + 1e-6)
        torch.testing.assert_close(probe(tokens), normed @ probe.linear.weight.T + probe.linear.bias)


def test_cross_attention_probe_matches_a_loop():
    torch.manual_seed(2)
    dim, heads, queries, batch, tokens_per_image = 8, 2, 2, 2, 4
    probe = CrossAttentionProbe(dim, num_labels=3, num_heads=heads, num_queries=queries).eval()
    tokens = torch.randn(batch, tokens_per_image, dim)
    head_dim = dim // heads
    k_weight, v_weight = probe.kv.weight[:dim], probe.kv.weight[dim:]
    k_bias, v_bias = probe.kv.bias[:dim], probe.kv.bias[dim:]
    expected = []
    for b in range(batch):
        x = F.layer_norm(tokens[b], (dim,), probe.norm1.weight, probe.norm1.bias)
        outputs = []
        for q in range(queries):
            query = probe.queries[0, q]
            projected = probe.q.weight @ query + probe.q.bias
            attended = []
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                keys = x @ k_weight[part].T + k_bias[part]
                values = x @ v_weight[part].T + v_bias[part]
                weights = torch.softmax(keys @ projected[part] / math.sqrt(head_dim), dim=0)
                attended.append(weights @ values)
            y = query + probe.proj.weight @ torch.cat(attended) + probe.proj.bias
            hidden = F.gelu(probe.mlp.fc1.weight @ F.layer_norm(y, (dim,), probe.norm2.weight, probe.norm2.bias)
                            + probe.mlp.fc1.bias)
            outputs.append(y + probe.mlp.fc2.weight @ hidden + probe.mlp.fc2.bias)
        expected.append(probe.linear.weight @ torch.cat(outputs) + probe.linear.bias)
    with torch.no_grad():
        torch.testing.assert_close(probe(tokens), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_build_head_refuses_impossible_shapes():
    with pytest.raises(UserError, match="--probe_queries 5 does not divide the token width 192"):
        build_head("attentive", 192, 10, num_queries=5)
    with pytest.raises(UserError, match="--probe_queries must be >= 1"):
        build_head("attentive", 192, 10, num_queries=0)
    with pytest.raises(UserError, match="--probe_heads 5 does not divide"):
        build_head("cross_attention", 192, 10, num_heads=5)
    assert build_head("attentive", 192, 10).num_queries == 32  # Efficient Probing's default
    assert build_head("cross_attention", 192, 10).num_heads == 3  # width / 64, as V-JEPA's poolers


@pytest.mark.parametrize("arch", ["vit_tiny", "dinov2_vits14_reg", "dinov3_vits16"])
@pytest.mark.parametrize("readout", ["cls", "sparo"])
def test_probe_tokens_of_every_backbone(arch, readout):
    tiny = arch == "vit_tiny"  # the others keep their arch's patch size and registers (None: the arch's)
    backbone = backbone_of(**dict(TINY_MODEL, arch=arch, depth=2, readout=readout, patch_size=8 if tiny else None,
                                   num_registers=2 if tiny else None, sparo_slots=4, sparo_slot_dim=8)).eval()
    patch = backbone.patch_embed.patch_size[0]
    images = torch.randn(2, 3, 2 * patch, 2 * patch)
    with torch.no_grad():
        tokens = backbone.tokens(images)
    prefix = backbone.num_prefix_tokens
    assert prefix > 1  # every case here has registers
    torch.testing.assert_close(ProbeTokens(backbone)(images)[0], torch.cat([tokens[:, :1], tokens[:, prefix:]], 1))
    torch.testing.assert_close(ProbeTokens(backbone, registers=True)(images)[0], tokens)
    torch.testing.assert_close(ProbeTokens(backbone, cls=False)(images)[0], tokens[:, prefix:])
    head = build_head("attentive", backbone.embed_dim, 5, num_queries=4).eval()
    assert head(ProbeTokens(backbone)(images)[0]).shape == (2, 5)


def test_probe_tokens_refuse_registers_a_model_does_not_have():
    backbone = backbone_of(**dict(TINY_MODEL, depth=2, readout="cls"))
    with pytest.raises(UserError, match="no register tokens"):
        ProbeTokens(backbone, registers=True)


def test_linear_inputs_are_the_feature_sets_from_one_backbone_pass():
    backbone = backbone_of(**dict(TINY_MODEL, depth=4)).eval()  # SPARO: 3 blocks left
    images = torch.randn(2, 3, 16, 16)
    sets = [FeatureSet(0), FeatureSet(1, True), FeatureSet(3)]
    inputs = LinearInputs(backbone, sets)
    calls = []
    real = backbone.get_intermediate_layers
    backbone.get_intermediate_layers = lambda x, n: calls.append(n) or real(x, n)
    features = inputs(images)
    assert calls == [3]
    del backbone.get_intermediate_layers
    for feature_set, feature in zip(sets, features):
        alone = ProbeFeatures(backbone, feature_set.n_last_blocks, feature_set.avgpool_patchtokens)
        torch.testing.assert_close(feature, alone(images))
    assert inputs.dims == [96, 96 + 2 * 192, 96 + 3 * 192]
    assert [str(s) for s in sets] == ["0", "1+avgpool", "3"] and FeatureSet.parse("4+avgpool") == FeatureSet(4, True)


def _position_task(count: int, seed: int, dim: int = 32, positions: int = 8, classes: int = 4):
    """Tokens where only position carries the class: fixed position embeddings plus noise, a marker added to the
    patch at a random position, label = that position mod ``classes``; the first ("CLS") token is noise. The mean
    token holds the marker whatever its position: a linear probe on CLS + mean sees no class."""
    fixed = torch.Generator().manual_seed(1234)
    embeddings, marker = torch.randn(positions, dim, generator=fixed), 2 * torch.randn(dim, generator=fixed)
    generator = torch.Generator().manual_seed(seed)
    where = torch.randint(0, positions, (count,), generator=generator)
    patches = embeddings.expand(count, -1, -1) + 0.5 * torch.randn(count, positions, dim, generator=generator)
    patches[torch.arange(count), where] += marker
    return torch.cat([torch.randn(count, 1, dim, generator=generator), patches], dim=1), where % classes


def _train_grid(probe: str, inputs, rates, epochs: int, recipe: str = "dino", seed: int = 0, batch: int = 64):
    """Trains a grid with the production epoch loop on cached inputs; returns (grid, held-out and val scores)."""
    context = DistributedContext()
    (train, train_labels), (held, held_labels), (val, val_labels) = inputs
    batches = CachedBatches((train, train_labels), {"holdout": (held, held_labels), "val": (val, val_labels)},
                            batch, context, seed)
    points = [GridPoint(0, rate) for rate in rates]
    grid = ProbeGrid(lambda _: build_head(probe, train[0].shape[-1], 4, num_queries=4 if probe == "attentive"
                                          else None), points, seed)
    optimizer = build_optimizer(RECIPES[recipe], [{"params": list(head.parameters()), "base_lr": p.lr * batch / 256}
                                                  for head, p in zip(grid.heads, points)])
    for epoch in range(epochs):
        train_epoch(grid, grid, optimizer, batches, epoch, RECIPES[recipe], epochs, 1 if recipe != "dino" else 0)
    return grid, score(grid, batches.evaluation("holdout")), score(grid, batches.evaluation("val"))


def test_attentive_probes_learn_where_position_matters_and_the_linear_probe_cannot():
    sets = [_position_task(512, 0), _position_task(128, 1), _position_task(256, 2)]
    token_inputs = [([tokens], labels) for tokens, labels in sets]
    linear_inputs = [([torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)], labels)
                     for tokens, labels in sets]
    rates = (0.05, 0.2, 1.0)
    results = {}
    for probe, inputs in (("linear", linear_inputs), ("attentive", token_inputs), ("cross_attention", token_inputs)):
        _, holdout, val = _train_grid(probe, inputs, rates, epochs=40)
        results[probe] = val[choose(holdout)].acc1  # chosen on held-out, read on val
    assert results["linear"] < 45  # chance is 25%
    assert results["attentive"] > 95
    assert results["cross_attention"] > results["linear"] + 15


def test_a_grid_trains_each_head_as_if_alone():
    """Heads trained at once (losses summed, one optimiser with a group per head) equal heads trained one by one:
    with Efficient Probing under LARS (per-parameter trust ratios, BatchNorm statistics per head)."""
    tokens, labels = _position_task(96, 3, dim=16)
    inputs = [([tokens], labels)] * 3
    together, _, _ = _train_grid("attentive", inputs, (0.1, 1.0), epochs=3, recipe="efficient_probing", batch=32)
    for index, rate in enumerate((0.1, 1.0)):
        alone, _, _ = _train_grid("attentive", inputs, (rate,), epochs=3, recipe="efficient_probing", batch=32)
        for (name, value), expected in zip(together.heads[index].state_dict().items(),
                                           alone.heads[0].state_dict().values()):
            torch.testing.assert_close(value, expected, msg=name)
    assert not torch.equal(together.heads[0].value.weight, together.heads[1].value.weight)


def test_schedules_are_dino_cosine_and_mae_warmup_cosine():
    # dino: torch's CosineAnnealingLR(eta_min=0) stepped once per epoch, as DINO's eval_linear.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 7, eta_min=0)
    for epoch in range(7):
        assert lr_factor(epoch, 7, 0) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # efficient_probing: MAE's lr_sched.adjust_learning_rate, 10 warm-up epochs of 90, at fractional epochs.
    assert RECIPES["efficient_probing"].warmup_epochs(90) == 10
    for progress in (0.0, 0.25, 9.5, 10.0, 33.3, 89.9):
        expected = progress / 10 if progress < 10 else 0.5 * (1 + math.cos(math.pi * (progress - 10) / 80))
        assert lr_factor(progress, 90, 10) == pytest.approx(expected)


def test_holdout_split():
    assert holdout_size(0.1, 95) == 10 and holdout_size(0.001, 95) == 1 and holdout_size(30, 95) == 30
    assert holdout_size(0, 95) == 0
    kept, held = split_holdout(95, 10, seed=4)
    assert len(held) == 10 and sorted(kept + held) == list(range(95))
    assert split_holdout(95, 10, seed=4) == (kept, held) and split_holdout(95, 10, seed=5)[1] != held
    with pytest.raises(UserError, match="--val_split 95 holds out 95 of the 95 training images"):
        holdout_size(95, 95)
    with pytest.raises(UserError, match="whole number"):
        holdout_size(2.5, 95)
    with pytest.raises(UserError, match="--val_split must be"):
        holdout_size(-0.1, 95)
