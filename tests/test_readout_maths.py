"""The attention-pooling read-outs against independent computations of their papers' maths (float64, loops)."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.reference_readouts import reference_forward
from dino_sparo.models.readouts import MAPReadout, SimPoolReadout


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


@pytest.mark.parametrize("heads", [1, 3])
def test_map_is_multi_head_attention_of_a_latent_query_then_a_residual_mlp(heads):
    readout = MAPReadout(embed_dim=12, num_heads=heads, mlp_ratio=2.0).double().eval()
    pool = readout.pool
    torch.nn.init.normal_(pool.latent)  # its default init is tiny: make every head's attention far from uniform
    tokens = torch.randn(2, 7, 12, dtype=torch.float64)
    d = 12 // heads
    expected, maps = [], []
    for image in tokens:
        query = pool.latent[0, 0] @ pool.q.weight.T + pool.q.bias  # (12,)
        kv = image @ pool.kv.weight.T + pool.kv.bias  # (7, 24): keys then values
        keys, values = kv[:, :12], kv[:, 12:]
        outputs, image_maps = [], []
        for head in range(heads):
            part = slice(head * d, (head + 1) * d)
            weights = torch.softmax(keys[:, part] @ query[part] / math.sqrt(d), dim=0)
            outputs.append(weights @ values[:, part])
            image_maps.append(weights)
        pooled = torch.cat(outputs) @ pool.proj.weight.T + pool.proj.bias
        hidden = F.gelu(layer_norm(pooled, pool.norm) @ pool.mlp.fc1.weight.T + pool.mlp.fc1.bias)
        expected.append(pooled + hidden @ pool.mlp.fc2.weight.T + pool.mlp.fc2.bias)
        maps.append(torch.stack(image_maps))
    torch.testing.assert_close(readout(tokens), torch.stack(expected))
    torch.testing.assert_close(reference_forward(readout, tokens), torch.stack(expected))
    torch.testing.assert_close(readout.attention_maps(tokens), torch.stack(maps))


@pytest.mark.parametrize("gamma", [1.25, 2.0, 0.0])
@pytest.mark.parametrize("heads", [1, 2])
def test_simpool_is_a_gap_queried_attention_with_generalised_mean_pooling(gamma, heads):
    readout = SimPoolReadout(embed_dim=8, num_heads=heads, gamma=gamma).double().eval()
    with torch.no_grad():
        readout.norm.weight.uniform_(0.5, 1.5)
        readout.norm.bias.normal_()
        readout.query_proj.weight.normal_()
        readout.key_proj.weight.normal_()
    tokens = torch.randn(3, 1 + 6, 8, dtype=torch.float64)  # CLS, then 6 patches
    d = 8 // heads
    expected, maps = [], []
    for image in tokens:
        patches = image[1:]  # SimPool discards the CLS token
        query = patches.mean(dim=0) @ readout.query_proj.weight.T
        normed = layer_norm(patches, readout.norm)
        keys = normed @ readout.key_proj.weight.T
        pooled, image_maps = [], []
        for head in range(heads):
            part = slice(head * d, (head + 1) * d)
            weights = torch.softmax(keys[:, part] @ query[part] / math.sqrt(d), dim=0)
            values = normed[:, part]
            if gamma:
                shifted = values - values.min(dim=0).values + 1e-6
                pooled.append(sum(w * v ** gamma for w, v in zip(weights, shifted)) ** (1 / gamma))
            else:
                pooled.append(sum(w * v for w, v in zip(weights, values)))
            image_maps.append(torch.cat([torch.zeros(1, dtype=torch.float64), weights]))
        expected.append(torch.cat(pooled))
        maps.append(torch.stack(image_maps))
    torch.testing.assert_close(readout(tokens), torch.stack(expected))
    torch.testing.assert_close(readout.attention_maps(tokens), torch.stack(maps))


def test_simpool_encoding_of_an_image_does_not_depend_on_its_batch():
    readout = SimPoolReadout(embed_dim=8).eval()
    tokens = torch.randn(4, 5, 8)
    torch.testing.assert_close(readout(tokens)[:1], readout(tokens[:1]))


@pytest.mark.parametrize("readout, message", [(lambda: MAPReadout(10, num_heads=3), "must divide"),
                                              (lambda: SimPoolReadout(10, num_heads=4), "must divide"),
                                              (lambda: SimPoolReadout(8, gamma=-1), ">= 0")])
def test_impossible_options_are_errors(readout, message):
    with pytest.raises(ValueError, match=message):
        readout()
