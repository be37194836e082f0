"""DCN-v2 cross layers: the formula, shapes, gradients, low rank, and in front of every trunk."""

from __future__ import annotations

import pytest
import torch

from ranker.config import FeatureSpec, ModelConfig, TaskSpec, parse_config
from ranker.model import MultiTaskRanker
from ranker.model.crosses import CrossNet


def test_cross_layer_matches_the_formula() -> None:
    torch.manual_seed(0)
    net = CrossNet(5, layers=2)
    x0 = torch.randn(3, 5)
    x = x0
    for w, b in zip(net.w, net.b, strict=True):
        x = x0 * (x @ w.T + b) + x  # x_{l+1} = x_0 * (W x_l + b) + x_l
    torch.testing.assert_close(net(x0), x)
    low = CrossNet(5, layers=1, rank=2)
    x1 = x0 * ((x0 @ low.v[0]) @ low.u[0].T + low.b[0]) + x0  # W = U V^T
    torch.testing.assert_close(low(x0), x1)


def test_shapes_parameters_and_gradients() -> None:
    full, low = CrossNet(64, layers=3), CrossNet(64, layers=3, rank=8)
    assert sum(p.numel() for p in full.parameters()) == 3 * (64 * 64 + 64)
    assert sum(p.numel() for p in low.parameters()) == 3 * (2 * 64 * 8 + 64)
    x = torch.randn(10, 64, requires_grad=True)
    for net in (full, low):
        out = net(x)
        assert out.shape == (10, 64)
        out.pow(2).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(CrossNet(4, layers=0)(x[:, :4]), x[:, :4])


FEATURES = [FeatureSpec(name="u", type="categorical", buckets=20, dim=4), FeatureSpec(name="p", type="dense", dim=8)]  # width pinned: the toy is init-sensitive
TASKS = [TaskSpec(name="a", type="binary", label="a"), TaskSpec(name="b", type="regression", label="b")]


@pytest.mark.parametrize("architecture", ["shared_bottom", "mmoe", "ple"])
@pytest.mark.parametrize("rank", [None, 3])
def test_cross_layers_in_front_of_any_trunk_learn_an_interaction(architecture: str, rank: int | None) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture=architecture, experts=2, expert_dims=[8], tower_dims=[4], cross_layers=2, cross_rank=rank)
    m = MultiTaskRanker(FEATURES, TASKS, cfg)
    assert m.encoder.cross is not None and m.encoder.cross.dim == m.encoder.out_dim == 4 + 8
    # the encoder owns the cross layers: gradient methods count them among the shared parameters
    assert all(any(p is q for q in m.encoder.parameters()) for p in m.encoder.cross.parameters())
    g = torch.Generator().manual_seed(1)
    u = torch.randint(1, 21, (512, 1), generator=g)
    q = torch.rand(512, 1, generator=g) * 32
    batch = {"cat": u, "dense": q}
    target = ((u.squeeze(1) % 2 == 0) ^ (q.squeeze(1) > 16)).float()  # an XOR of two features
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(batch)["a"], target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_cross_config_is_validated() -> None:
    raw = {"data": {"train": "t", "val": "v"}, "features": [{"name": "p", "type": "dense"}],
           "tasks": [{"name": "y", "type": "binary", "label": "y"}], "model": {"cross_layers": -1}}
    with pytest.raises(Exception, match=r"model\.cross_layers"):
        parse_config(raw, "c.yaml")
    with pytest.raises(Exception, match=r"model\.cross_rank"):
        parse_config({**raw, "model": {"cross_layers": 1, "cross_rank": 0}}, "c.yaml")
