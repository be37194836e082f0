"""The model: shapes per architecture, only requested towers and gates run, batched experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranker.config import FeatureSpec, ModelConfig, TaskSpec
from ranker.model import MultiTaskRanker
from ranker.model.layers import ExpertBank

FEATURES = [
    FeatureSpec(name="u", type="categorical", buckets=50, dim=8),
    FeatureSpec(name="c", type="categorical", buckets=10, dim=4),
    FeatureSpec(name="v", type="categorical", buckets=10, dim=8),
    FeatureSpec(name="t", type="multi_hot", buckets=20, dim=4),
    FeatureSpec(name="p", type="dense", encoding="standard"),
]
TASKS = [
    TaskSpec(name="ctr", type="binary", label="click"),
    TaskSpec(name="cvr", type="binary", label="conv", mask="click"),
    TaskSpec(name="watch", type="regression", label="w", transform="log1p"),
]
CONFIGS = {
    "shared_bottom": ModelConfig(architecture="shared_bottom", expert_dims=[16, 8], tower_dims=[4]),
    "mmoe": ModelConfig(architecture="mmoe", experts=3, expert_dims=[16, 8], tower_dims=[4]),
    "ple": ModelConfig(architecture="ple", shared_experts=2, specific_experts=1, levels=1, expert_dims=[16, 8], tower_dims=[4]),
    "ple2": ModelConfig(architecture="ple", shared_experts=1, specific_experts=2, levels=2, expert_dims=[8], tower_dims=[4]),
    "cross_stitch": ModelConfig(architecture="cross_stitch", expert_dims=[16, 8], tower_dims=[4]),
    "cross_stitch1": ModelConfig(architecture="cross_stitch", expert_dims=[8], tower_dims=[4], stitch_self=0.5),
    "shared_bottom_film": ModelConfig(architecture="shared_bottom", expert_dims=[16, 8], tower_dims=[4], film=True),
    "mmoe_film_input": ModelConfig(architecture="mmoe", experts=3, expert_dims=[16, 8], tower_dims=[4], film=True, film_input=True),
}


def batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "cat": torch.stack([torch.randint(0, 51, (n,), generator=g), torch.randint(0, 11, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)], 1),
        "dense": torch.randn(n, 1, generator=g),
        "bag:t": torch.randint(0, 22, (n, 3), generator=g),
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shapes_and_scores(name: str) -> None:
    torch.manual_seed(0)
    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS[name])
    assert m.encoder.out_dim == 8 + 4 + 8 + 4 + 1
    out = m(batch())
    assert set(out) == {"ctr", "cvr", "watch"} and all(v.shape == (6,) for v in out.values())
    s = m.scores(out)
    assert ((s["ctr"] > 0) & (s["ctr"] < 1)).all() and (s["watch"] >= 0).all()
    assert list(m(batch(), ["watch"])) == ["watch"]


@pytest.mark.parametrize("name", [*CONFIGS, "ple3"])
def test_shared_parameters_are_exactly_those_several_tasks_reach(name: str) -> None:
    """Each task's loss alone, backpropagated: a trunk parameter some other task's loss also
    reaches is shared; one only its own task reaches (MMoE's gates, PLE's last two levels'
    gates) is not, and gradient methods treat it like a tower. PLE's task experts share one
    tensor with the other tasks' experts, so that tensor counts as shared."""
    cfg = CONFIGS.get(name) or ModelConfig(architecture="ple", shared_experts=1, specific_experts=1, levels=3, expert_dims=[8], tower_dims=[4])
    torch.manual_seed(0)
    m = MultiTaskRanker(FEATURES, TASKS, cfg)
    with torch.no_grad():  # FiLM's generator starts at zero, which would block every gradient below it
        for p in m.parameters():
            if not p.any():
                p.normal_()
    out = m(batch(32))
    trunk = list(m.trunk.parameters())
    reached = [0] * len(trunk)
    for t in ("ctr", "cvr", "watch"):
        grads = torch.autograd.grad(out[t].sum(), trunk, retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            reached[i] += int(g is not None and bool(g.abs().sum() > 0))
    shared = {id(p) for p in m.shared_parameters()}
    for p, n in zip(trunk, reached, strict=True):
        assert (id(p) in shared) == (n > 1), (name, p.shape, n)
    assert all(id(p) in shared for p in m.encoder.parameters())


def _spy(modules: dict[str, nn.Module]) -> list[str]:
    calls: list[str] = []
    for name, mod in modules.items():
        mod.register_forward_hook(lambda *_, n=name: calls.append(n))
    return calls


@pytest.mark.parametrize("name", CONFIGS)
def test_only_requested_towers_and_gates_run(name: str) -> None:
    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS[name])
    heads = _spy({f"head:{t}": h for t, h in m.heads.items()})
    gates = []
    if name == "mmoe":
        gates = _spy({f"gate:{t}": g for t, g in m.trunk.gates.items()})
    if name.startswith("ple"):
        gates = _spy({f"gate:{t}": g for t, g in m.trunk.levels[-1].gates.items()})
    encoder = _spy({"encoder": m.encoder})
    out = m(batch(), ["cvr"])
    assert list(out) == ["cvr"]
    assert heads == ["head:cvr"]
    assert encoder == ["encoder"]
    if name == "mmoe" or name.startswith("ple"):
        assert gates == ["gate:cvr"]


def _away_from_init(m: MultiTaskRanker) -> None:
    """FiLM starts as the identity and cross-stitch near it: move both so parity means something."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.trunk.named_parameters():
            if name.startswith(("to_film", "alpha")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_subset_outputs_equal_full_outputs() -> None:
    for cfg in CONFIGS.values():
        torch.manual_seed(1)
        m = MultiTaskRanker(FEATURES, TASKS, cfg).eval()
        _away_from_init(m)
        b = batch()
        full = m(b)
        for sub in (["ctr"], ["cvr"], ["watch"], ["watch", "ctr"]):
            out = m(b, sub)
            assert list(out) == sub
            for t in sub:
                assert torch.allclose(out[t], full[t], atol=1e-6), (cfg, t)


def test_ple_last_level_runs_only_requested_task_experts() -> None:
    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS["ple"])
    seen = []
    m.trunk.levels[-1].specific.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    m(batch(), ["ctr"])
    assert seen == [1]  # one specific expert for ctr, not three


def test_expert_bank_equals_a_loop_of_mlps() -> None:
    torch.manual_seed(0)
    bank = ExpertBank(3, 5, [7, 4])
    x = torch.randn(10, 5)
    out = bank(x)  # (3, 10, 4)
    for e in range(3):
        h = torch.relu(x @ bank.w0[:, e] + bank.b0[e])
        h = torch.relu(h @ bank.ws[0][e] + bank.bs[0][e])
        assert torch.allclose(out[e], h, atol=1e-6)
    # per-expert inputs and a subset of experts
    xs = torch.randn(2, 10, 5)
    sub = bank(xs, torch.tensor([2, 0]))
    for k, e in enumerate([2, 0]):
        h = torch.relu(xs[k] @ bank.w0[:, e] + bank.b0[e])
        h = torch.relu(h @ bank.ws[0][e] + bank.bs[0][e])
        assert torch.allclose(sub[k], h, atol=1e-6)


def test_mmoe_gates_are_distributions() -> None:
    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS["mmoe"])
    m(batch(), ["ctr", "watch"])
    g = m.trunk.last_gates
    assert set(g) >= {"ctr", "watch"} and g["ctr"].shape == (6, 3)
    assert torch.allclose(g["ctr"].sum(-1), torch.ones(6))


def test_regression_head_scores_in_label_units() -> None:
    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS["mmoe"])
    head = m.heads["watch"]
    head.target_mean.fill_(2.0)
    head.target_std.fill_(0.5)
    y = torch.tensor([0.0, 10.0, 100.0])
    assert torch.allclose(head.score(head.target(y)), y, rtol=1e-5, atol=1e-4)


def test_unknown_task_is_a_clear_error() -> None:
    from ranker.errors import RankerError

    m = MultiTaskRanker(FEATURES, TASKS, CONFIGS["mmoe"])
    with pytest.raises(RankerError, match="unknown task 'nope'; valid: ctr, cvr, watch"):
        m(batch(), ["nope"])


def test_feature_dropout_drops_whole_features_in_training_only() -> None:
    from ranker.model.encoder import Encoder

    # every kind of input: categoricals of two widths, a bag, a plain and two embedded numbers
    feats = [*FEATURES[:4], FeatureSpec(name="p", type="dense", encoding="standard"), FeatureSpec(name="q", type="dense", dim=3),
             FeatureSpec(name="r", type="dense", dim=3)]
    widths = [4, 8, 8, 4, 1, 3, 3]  # output blocks in order: dim-4 table (c), dim-8 table (u, v), bag t, plain p, embedded q, r
    p = 0.25
    torch.manual_seed(0)
    enc = Encoder(feats, ModelConfig(feature_dropout=p))
    with torch.no_grad():  # embedded numbers away from ReLU's zero, so a dropped one can be told
        for m in enc.numeric:
            m.bias.fill_(1.0)
    off = Encoder(feats, ModelConfig())
    off.load_state_dict(enc.state_dict())
    n = 4000
    g = torch.Generator().manual_seed(1)
    b = {
        "cat": torch.stack([torch.randint(1, 51, (n,), generator=g), torch.randint(1, 11, (n,), generator=g), torch.randint(1, 11, (n,), generator=g)], 1),
        "dense": torch.randn(n, 3, generator=g),
        "bag:t": torch.randint(0, 21, (n, 3), generator=g),
    }
    enc.eval()
    full = enc(b)
    assert torch.equal(full, off.eval()(b))  # evaluation and serving: every feature, unscaled
    enc.train()
    out = enc(b)
    dropped = []
    start = 0
    for w in widths:
        blk, ref = out[:, start : start + w], full[:, start : start + w]
        live = (ref != 0).any(1)  # rows where this feature says something (a ReLU can give all zeros)
        gone = (blk == 0).all(1) & live
        kept = ~gone
        # a kept feature is scaled as a whole by 1 / (1 - p); a dropped one is zero in all its values
        torch.testing.assert_close(blk[kept], ref[kept] / (1 - p), rtol=1e-5, atol=1e-6)
        assert live.float().mean() > 0.3
        dropped.append((gone.sum() / live.sum()).item())
        start += w
    assert start == enc.out_dim
    # each feature of each row drawn apart: ~p dropped per feature (4000 rows: +-0.03 is > 4 sigma)
    assert all(abs(d - p) < 0.03 for d in dropped), dropped
    assert not torch.equal(enc(b), enc(b))  # a new draw per forward
    with pytest.raises(ValueError, match="feature_dropout"):
        ModelConfig(feature_dropout=1.0)
