"""Weighting methods: each on a tiny problem with a known answer, the shared contract (any
subset of tasks, heads get their own task's gradient), typed hyperparameters, and a short
end-to-end run of every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ranker.config import (
    CAGradParams,
    DWAParams,
    FAMOParams,
    GradientParams,
    GradNormParams,
    MGDAParams,
    TaskSpec,
    load_config,
    parse_config,
)
from ranker.errors import RankerError
from ranker.training.weighting import WEIGHTINGS, GradientWeighting, StepContext, build_weighting
from ranker.training.weighting.cagrad import CAGrad, cagrad_weights
from ranker.training.weighting.dwa import DWA
from ranker.training.weighting.famo import FAMO
from ranker.training.weighting.gradnorm import GradNorm
from ranker.training.weighting.mgda import MGDA, min_norm_weights
from ranker.training.weighting.pcgrad import PCGrad
from ranker.training.weighting.rlw import RLW
from tests.datagen import write_logs


def _tasks(*names: str) -> list[TaskSpec]:
    return [TaskSpec(name=n, type="binary", label=n) for n in names]


def _linear_losses(p: nn.Parameter, grads: list[list[float]], offsets: list[float] | None = None) -> dict[str, torch.Tensor]:
    """L_t = g_t . p + offset_t: gradient g_t on the shared ``p``, value set by the offset."""
    offsets = offsets or [1.0] * len(grads)
    return {f"t{i}": torch.tensor(g) @ p + o for i, (g, o) in enumerate(zip(grads, offsets, strict=True))}


# ----- PCGrad ----------------------------------------------------------------------------------
def test_pcgrad_removes_the_conflicting_component_of_opposed_gradients() -> None:
    p = nn.Parameter(torch.zeros(2))
    g1, g2 = [1.0, 0.0], [-1.0, 1.0]  # g1 . g2 = -1: they conflict
    PCGrad(_tasks("t0", "t1")).backward(_linear_losses(p, [g1, g2]), StepContext(shared=[p]))
    # g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5);  g2' = g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    assert torch.allclose(p.grad, torch.tensor([0.5, 1.5]))
    for proj, other in (([0.5, 0.5], g2), ([0.0, 1.0], g1)):
        assert np.dot(proj, other) == pytest.approx(0.0)  # conflicting component gone


def test_pcgrad_leaves_agreeing_gradients_alone() -> None:
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])  # positive inner product
    assert torch.allclose(PCGrad(_tasks("a", "b")).direction(grads), grads.sum(0))


# ----- MGDA ------------------------------------------------------------------------------------
def test_mgda_min_norm_point_matches_the_two_task_closed_form() -> None:
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    a = min_norm_weights(g @ g.T)
    # a1 = (g2 - g1) . g2 / |g1 - g2|^2 = 4 / 5
    assert a == pytest.approx([0.8, 0.2])


@pytest.mark.parametrize("seed", range(5))
def test_mgda_direction_has_non_negative_inner_product_with_every_task(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = 2 + seed % 4
    grads = rng.standard_normal((t, 6)) * rng.uniform(0.1, 10.0, (t, 1))
    grads[1] -= 1.5 * grads[0]  # at least one strong conflict
    d = MGDA(_tasks(*"abcde"[:t]), MGDAParams(normalization="none")).direction(torch.from_numpy(grads)).numpy()
    dots = grads @ d
    assert (dots >= (1 - 1e-6) * (d @ d)).all()  # d . g_t >= |d|^2 >= 0 at the min-norm point
    assert (d @ d) <= min((g @ g) for g in grads) + 1e-9  # no longer than any single gradient


# ----- CAGrad ----------------------------------------------------------------------------------
def test_cagrad_with_c_zero_is_the_mean_gradient() -> None:
    grads = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 2.0], [0.2, 0.2, -1.0]], dtype=torch.float64)
    d = CAGrad(_tasks("a", "b", "c"), CAGradParams(c=0.0)).direction(grads)
    assert torch.allclose(d, grads.mean(0))


def test_cagrad_is_scale_free_and_resumes_from_its_warm_start() -> None:
    """An absolute 1e-8 inside its square roots moved the coefficients once gradients were
    small (1e-8 times: [0.434, 0.287, 0.287] -> [0.530, 0.287, 0.390]); and the warm start of
    the dual solve was not in the checkpoint, so a resumed run solved from another point."""
    rng = np.random.default_rng(0)
    tasks = [TaskSpec(name=n, type="binary", label=n) for n in "abc"]
    grams = [(a := rng.normal(size=(3, 40))) @ a.T for _ in range(4)]
    ones = np.ones(3)
    base = CAGrad(tasks).coefficients(grams[0], ones)
    for s in (1e-8, 1e-12):
        assert np.allclose(CAGrad(tasks).coefficients(grams[0] * s * s, ones), base, rtol=1e-9, atol=0)
    first = CAGrad(tasks)
    for g in grams[:2]:
        first.coefficients(g, ones)
    resumed = CAGrad(tasks)
    resumed.load_state_dict(first.state_dict())
    for g in grams[2:]:
        assert np.array_equal(first.coefficients(g, ones), resumed.coefficients(g, ones))


def test_cagrad_improves_the_worst_task_over_the_mean_gradient() -> None:
    grads = torch.tensor([[4.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)  # the mean hurts task 2
    g0 = grads.mean(0)
    c = 0.5
    d = CAGrad(_tasks("a", "b"), CAGradParams(c=c)).direction(grads) * (1 + c**2)  # undo the rescale
    assert float((grads @ g0).min()) < 0
    assert float((grads @ d).min()) > float((grads @ g0).min())
    assert float((d - g0).norm()) == pytest.approx(c * float(g0.norm()), rel=1e-4)  # on the ball's edge


def _cagrad_dual(gram: np.ndarray, c: float, w: np.ndarray) -> np.ndarray:
    """CAGrad's dual objective w . G 1/T + c |g0| sqrt(w^T G w) at the simplex points ``w`` (N, T) or (T,)."""
    radius = c * math.sqrt(gram.mean())  # c |g0|, |g0|^2 = 1/T^2 sum_ij G_ij
    w = np.atleast_2d(w)
    quad = np.einsum("ni,ij,nj->n", w, gram, w)
    return w @ gram.mean(axis=1) + radius * np.sqrt(np.maximum(quad, 0.0))


def _assert_cagrad_dual_optimal(gram: np.ndarray, c: float, w: np.ndarray, seed: int) -> None:
    """Checked without trusting the solver: w is on the simplex and no vertex, no random simplex
    point and no small feasible move from w has a lower objective (the objective is convex, so the
    moves are a first-order optimality check)."""
    t = len(gram)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    tol = 1e-9 * float(np.abs(np.diag(gram)).max())  # the objective scales with G
    f = float(_cagrad_dual(gram, c, w)[0])
    rng = np.random.default_rng(seed)
    eye = np.eye(t)
    moves = [(1 - eps) * w + eps * eye[i] for eps in (1e-2, 1e-3, 1e-4) for i in range(t)]
    moves += [w + eps * (eye[i] - eye[j]) for eps in (1e-3, 1e-5) for i in range(t) for j in range(t) if i != j and w[j] >= eps]
    for name, points in (("vertices", eye), ("random simplex points", rng.dirichlet(np.ones(t), 2000)), ("moves from w", np.array(moves))):
        others = _cagrad_dual(gram, c, points)
        assert f <= float(others.min()) + tol, f"{name} beat w={w}: {others.min()} < {f}"


# audit case: the old exponentiated-gradient solver stopped at w ~ (0.068, 0, 0.932), objective
# 0.233 (above the vertex e3's 0.092), and its direction made task 3's loss go up
_AUDIT_GRAM = np.array([[114.5964, -163.633, 1.0968], [-163.633, 523.0274, -3.7285], [1.0968, -3.7285, 0.155]])


def test_cagrad_weights_reach_the_dual_optimum_on_an_ill_conditioned_gram() -> None:
    c = 0.4
    w = cagrad_weights(_AUDIT_GRAM, c)
    _assert_cagrad_dual_optimal(_AUDIT_GRAM, c, w, seed=0)
    assert float(_cagrad_dual(_AUDIT_GRAM, c, w)[0]) == pytest.approx(0.0070635, abs=1e-6)  # scipy SLSQP: 0.00706
    assert w == pytest.approx([0.019696, 0.0, 0.980304], abs=1e-5)


def test_cagrad_direction_does_not_hurt_any_task_on_the_audit_gram() -> None:
    c, t = 0.4, len(_AUDIT_GRAM)
    coef = CAGrad(_tasks("a", "b", "c"), CAGradParams(c=c)).coefficients(_AUDIT_GRAM, np.ones(t))
    # d = sum_j coef_j g_j, so g_i . d = (G coef)_i
    dots = _AUDIT_GRAM @ coef
    assert float(dots.min()) >= 0.0  # the old solver's: -0.22 (task 3)
    # the same as the paper's d = g0 + c |g0| g_w / |g_w| (up to the 1 / (1 + c^2) rescale), w from the solver
    w = cagrad_weights(_AUDIT_GRAM, c)
    paper = _AUDIT_GRAM @ (np.full(t, 1.0 / t) + c * math.sqrt(_AUDIT_GRAM.mean()) * w / math.sqrt(w @ _AUDIT_GRAM @ w))
    assert dots * (1 + c**2) == pytest.approx(paper, abs=1e-6)  # the code adds 1e-8 to |g0|^2 and |g_w|


@pytest.mark.parametrize("seed", range(24))
def test_cagrad_weights_reach_the_dual_optimum_on_random_grams(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = 2 + seed % 4
    grads = rng.standard_normal((t, 8)) * rng.uniform(0.1, 10.0, (t, 1))  # gradient norms 0.1-10x apart
    gram = grads @ grads.T
    c = (0.2, 0.4, 0.8)[seed % 3]
    _assert_cagrad_dual_optimal(gram, c, cagrad_weights(gram, c), seed)
    _assert_cagrad_dual_optimal(gram, c, cagrad_weights(gram, c, start=np.eye(t)[seed % t]), seed)  # from a vertex


# ----- GradNorm --------------------------------------------------------------------------------
def _gradnorm_steps(m: GradNorm, grads: list[list[float]], offsets_per_step: list[list[float]]) -> torch.Tensor:
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    p = nn.Parameter(torch.zeros(2))
    for offsets in offsets_per_step:
        m.backward(_linear_losses(p, grads, offsets), StepContext(shared=[p]))
        opt.step()
        opt.zero_grad()
    return m.weights().detach()


def test_gradnorm_raises_the_weight_of_the_task_that_learns_slower() -> None:
    m = GradNorm(_tasks("t0", "t1"), GradNormParams(alpha=1.5, gradients="parameters"))
    # equal gradient norms; t0's loss halves, t1's does not move: t1 trains slower
    w = _gradnorm_steps(m, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]] + [[0.5, 1.0]] * 50)
    assert w[1] > 1.05 > 0.95 > w[0]
    assert float(w.sum()) == pytest.approx(2.0)  # weights always sum to the task count


def test_gradnorm_equalises_gradient_norms_when_rates_are_equal() -> None:
    m = GradNorm(_tasks("t0", "t1"), GradNormParams(alpha=1.5, gradients="parameters"))
    # same training rate; t0's gradient is 4x t1's, so G_t = w_t |g_t| balances at w0/w1 = 1/4
    w = _gradnorm_steps(m, [[4.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]] * 150)
    assert float(w[0] * 4) == pytest.approx(float(w[1]), rel=0.1)


# ----- DWA -------------------------------------------------------------------------------------
def test_dwa_weights_follow_the_softmax_of_loss_ratios() -> None:
    temperature = 2.0
    m = DWA(_tasks("a", "b", "c"), DWAParams(temperature=temperature))
    p = nn.Parameter(torch.zeros(1))
    epoch_losses = [[1.0, 1.0, 1.0], [0.5, 0.9, 1.0], [0.4, 0.9, 0.5]]
    seen = []
    for epoch, ls in enumerate(epoch_losses + [[1.0, 1.0, 1.0]]):
        for _ in range(3):  # several steps per epoch; the epoch mean is what counts
            w = m.backward({t: p.sum() * 0 + v for t, v in zip("abc", ls, strict=True)}, StepContext(shared=[p], epoch=epoch))
        seen.append(w)
    assert seen[0] == seen[1] == {"a": 1.0, "b": 1.0, "c": 1.0}  # no history for two epochs
    for e in (2, 3):
        r = np.array(epoch_losses[e - 1]) / np.array(epoch_losses[e - 2])
        expected = 3 * np.exp(r / temperature) / np.exp(r / temperature).sum()
        assert [seen[e][t] for t in "abc"] == pytest.approx(expected.tolist())
    assert seen[3]["c"] < seen[3]["a"] < seen[3]["b"]  # ratios 0.5, 0.8, 1.0: the fastest learner gets least


# ----- RLW -------------------------------------------------------------------------------------
def test_rlw_weights_are_random_per_step_sum_to_task_count_and_follow_the_seed() -> None:
    p = nn.Parameter(torch.zeros(1))

    def draws(seed: int) -> list[dict[str, float]]:
        torch.manual_seed(seed)
        m = RLW(_tasks("a", "b", "c"))
        return [m.backward({t: p.sum() + 1 for t in "abc"}, StepContext(shared=[p])) for _ in range(5)]

    first = draws(7)
    for w in first:
        assert sum(w.values()) == pytest.approx(3.0)
        assert all(v > 0 for v in w.values())
    assert len({round(w["a"], 9) for w in first}) == 5  # a fresh draw every step
    assert draws(7) == first  # and reproducible from the seed
    assert draws(8) != first


# ----- FAMO ------------------------------------------------------------------------------------
def test_famo_decreases_all_losses_at_the_same_rate_in_log_space() -> None:
    """Two decoupled quadratics of very different scale: plain summing shrinks the steep one's
    log-loss far faster; FAMO keeps the two log-loss decreases close."""

    def run(weighting: nn.Module | None) -> np.ndarray:
        theta = nn.Parameter(torch.tensor([1.0, 1.0]))
        opt = torch.optim.SGD([theta], lr=0.004)
        first = None
        for _ in range(150):
            losses = {"a": 100 * theta[0] ** 2 + 1e-3, "b": 0.5 * theta[1] ** 2 + 1e-3}
            now = np.array([float(v.detach()) for v in losses.values()])
            first = now if first is None else first
            if weighting is None:
                sum(losses.values()).backward()
            else:
                weighting.backward(losses, StepContext(shared=[theta]))
            opt.step()
            opt.zero_grad()
        return np.log(first) - np.log(now)  # log-loss decrease per task

    plain = run(None)
    famo = run(FAMO(_tasks("a", "b")))
    assert plain[0] / plain[1] > 5  # the steep task runs away under a plain sum
    assert 0.5 < famo[0] / famo[1] < 2.0  # FAMO: comparable rates
    assert (famo > 0.5).all()  # and both actually decrease


def test_famo_same_batch_updates_from_the_after_losses_of_the_same_step() -> None:
    """``after_loss: same_batch``: the logits move once per step, from log L(before) - log
    L(after) of that step (the paper's update); ``next_batch`` never asks for the extra
    forward and moves them from one step's losses to the next's."""
    theta = nn.Parameter(torch.tensor([1.0, 1.0]))
    losses = {"a": 4 * theta[0] ** 2 + 1e-3, "b": theta[1] ** 2 + 1e-3}
    same = FAMO(_tasks("a", "b"), FAMOParams(after_loss="same_batch", gamma=0.0))
    same.backward(losses, StepContext(shared=[theta]))
    assert torch.equal(same.xi.detach(), torch.zeros(2))  # nothing until the step is known
    same.after_step(lambda: {"a": 0.5, "b": 0.9})
    # the update is an Adam step on the gradient J_softmax(xi)^T delta, delta = log(before / after)
    delta = torch.tensor([math.log(4.001 / 0.5), math.log(1.001 / 0.9)])
    z = torch.softmax(torch.zeros(2), 0)
    grad = z * (delta - (z * delta).sum())
    want = -FAMOParams().lr * torch.sign(grad)  # Adam's first step: lr in the gradient's sign
    np.testing.assert_allclose(same.xi.detach().numpy(), want.numpy(), rtol=1e-4)
    assert same.xi[0] < same.xi[1]  # the task whose log-loss fell more gets less weight next

    nxt = FAMO(_tasks("a", "b"))
    nxt.backward({"a": 4 * theta[0] ** 2 + 1e-3, "b": theta[1] ** 2 + 1e-3}, StepContext(shared=[theta]))
    nxt.after_step(lambda: pytest.fail("next_batch must not run the extra forward"))
    assert torch.equal(nxt.xi.detach(), torch.zeros(2))


def test_trainer_gives_famo_the_same_batch_losses_after_the_step(tmp_path) -> None:  # noqa: ANN001
    """Through the real trainer: with ``same_batch`` every step calls the extra forward once
    and its losses are those of the same batch under the updated weights (lower than before
    the step on average), and the run trains."""
    from ranker.training.trainer import Trainer

    path = write_logs(tmp_path, rows=600, train={"epochs": 1, "batch_size": 64, "weighting": "famo",
                                                 "weighting_params": {"famo": {"after_loss": "same_batch"}}})
    cfg = load_config(path)
    pairs: list[tuple[dict, dict]] = []
    original = FAMO.after_step

    def spy(self: FAMO, losses_after) -> None:  # noqa: ANN001
        before = dict(self.prev)
        after = losses_after()
        pairs.append((before, after))
        original(self, lambda: after)

    FAMO.after_step = spy
    try:
        Trainer(cfg, progress=False).run(tmp_path / "bundle")
    finally:
        FAMO.after_step = original
    assert len(pairs) == math.ceil(600 / 64)  # one call a step
    assert all(set(a) == set(b) and all(math.isfinite(v) for v in b.values()) for a, b in pairs)
    gain = [math.log(a[t]) - math.log(b[t]) for a, b in pairs for t in a]
    assert np.mean(gain) > 0  # the step lowered the loss it descended, measured on its own batch


# ----- the shared contract: any subset of tasks, heads keep their own gradient -------------------
class _Toy(nn.Module):
    """encoder (shared) -> one linear head per task."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in tasks})
        self.x = torch.randn(16, 4)
        self.y = {t: torch.randn(16) for t in tasks}

    def losses(self, present: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rep = self.enc(self.x)  # (B, 3)
        return {t: ((self.heads[t](rep).squeeze(-1) - self.y[t]) ** 2).mean() for t in present}, rep


def _grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params, strict=True)])


ALL_TASKS = ["a", "b", "c"]


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("present", [["b"], ["a", "c"], ALL_TASKS])
def test_every_method_copes_with_any_subset_of_tasks(name: str, present: list[str]) -> None:
    toy = _Toy(ALL_TASKS)
    m = build_weighting(name, _tasks(*ALL_TASKS))
    shared = list(toy.enc.parameters())
    specific = list(toy.heads.parameters())
    for step in range(3):  # stateful methods (DWA, FAMO, GradNorm) see a history
        for q in toy.parameters():
            q.grad = None
        losses, rep = toy.losses(present)
        own = {t: _grad(losses[t], list(toy.heads[t].parameters())) for t in present}
        g_shared = {t: _grad(losses[t], shared) for t in present}
        w = m.backward(losses, StepContext(shared=shared, specific=specific, rep=rep, epoch=step, step=step))
        assert set(w) == set(present) and all(math.isfinite(v) for v in w.values())
        assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in shared)
        for t in ALL_TASKS:
            head_grad = [q.grad for q in toy.heads[t].parameters()]
            if t not in present:
                assert all(g is None for g in head_grad)  # an absent task's head is untouched
            elif isinstance(m, GradientWeighting):  # gradient methods: own task's gradient only
                assert torch.allclose(torch.cat([g.flatten() for g in head_grad]), own[t], atol=1e-6)
        if isinstance(m, GradientWeighting):  # the shared gradient is sum_t c_t g_t, c as returned
            expected = sum(w[t] * g_shared[t] for t in present)
            got = torch.cat([q.grad.flatten() for q in shared])
            assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "params"),
    [(PCGrad, GradientParams(gradients="representation")), (CAGrad, CAGradParams(gradients="representation")), (MGDA, MGDAParams())],
)
def test_gradient_methods_run_on_the_representation_too(cls: type, params: GradientParams) -> None:
    toy = _Toy(ALL_TASKS)
    m = cls(_tasks(*ALL_TASKS), params)
    assert m.gradients == "representation"
    losses, rep = toy.losses(ALL_TASKS)
    with pytest.raises(ValueError, match="StepContext.rep"):
        m.backward(losses, StepContext(shared=list(toy.enc.parameters())))
    m.backward(losses, StepContext(shared=list(toy.enc.parameters()), rep=rep))
    assert toy.enc.weight.grad is not None and torch.isfinite(toy.enc.weight.grad).all()


# ----- typed hyperparameters ------------------------------------------------------------------
def _raw(train: dict) -> dict:
    return {
        "data": {"train": "x", "val": "y"},
        "features": [{"name": "p", "type": "dense"}],
        "tasks": [{"name": "ctr", "type": "binary", "label": "click"}],
        "train": train,
    }


def test_weighting_hyperparameters_are_typed_and_reach_the_method() -> None:
    cfg = parse_config(_raw({"weighting": "cagrad", "weighting_params": {"cagrad": {"c": 0.0}, "dwa": {"temperature": 5}}}))
    m = build_weighting(cfg.train.weighting, cfg.tasks, cfg.train.weighting_params)
    assert isinstance(m, CAGrad) and m.c == 0.0
    dwa = build_weighting("dwa", cfg.tasks, cfg.train.weighting_params)
    assert isinstance(dwa, DWA) and dwa.temperature == 5


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gradnorm": {"alpha": -1}}, "train.weighting_params.gradnorm.alpha"),
        ({"cagrad": {"cc": 1}}, "train.weighting_params.cagrad.cc: unknown key"),
        ({"pcgrad": {"gradients": "everywhere"}}, "train.weighting_params.pcgrad.gradients"),
        ({"nash": {}}, "train.weighting_params.nash: unknown key"),
    ],
)
def test_bad_weighting_hyperparameter_is_an_error_naming_the_key(params: dict, message: str) -> None:
    with pytest.raises(RankerError, match=message.replace(".", r"\.")):
        parse_config(_raw({"weighting_params": params}), "cfg.yaml")


def test_unknown_weighting_lists_the_valid_ones() -> None:
    from ranker.training.trainer import Trainer

    cfg = parse_config(_raw({"weighting": "nash_mtl"}))
    with pytest.raises(RankerError, match=r"train\.weighting: unknown weighting 'nash_mtl'; valid: static, uncertainty, gradnorm"):
        Trainer(cfg, progress=False)


# ----- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_logs(tmp_path_factory: pytest.TempPathFactory):
    path = write_logs(tmp_path_factory.mktemp("wlogs"), rows=1200)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"architecture": "mmoe", "experts": 2, "expert_dims": [8], "tower_dims": [4]}
    raw["train"].update({"epochs": 1, "batch_size": 300, "threads": 1, "diagnostics_batches": 1, "patience": 1})
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_every_method_trains_end_to_end(name: str, small_logs, tmp_path) -> None:
    from ranker.training.trainer import Trainer

    cfg = load_config(small_logs)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"weighting": name})})
    res = Trainer(cfg, progress=False, log=lambda s: None).run(tmp_path / "b")
    h = res.history[0]
    assert set(h["weights"]) == {"ctr", "cvr", "watch"}
    assert all(math.isfinite(v) and v >= 0 for v in h["weights"].values())
    assert all(math.isfinite(v) for v in h["train_loss"].values())
    assert 0.0 <= res.metrics["test"]["ctr"]["auc"] <= 1.0


def test_a_task_with_a_dead_gradient_does_not_freeze_mgda_or_gradnorm() -> None:
    p = nn.Parameter(torch.zeros(2))
    grads = [[0.0, 0.0], [1.0, 0.5], [0.2, 1.0]]  # t0: a dead tower, no gradient at all
    w = MGDA(_tasks("t0", "t1", "t2"), MGDAParams(gradients="parameters", normalization="l2")).backward(
        _linear_losses(p, grads), StepContext(shared=[p]))
    assert w["t0"] == 0.0 and w["t1"] + w["t2"] == pytest.approx(1.0)
    assert float(p.grad.norm()) > 0.1  # the live tasks still move the shared parameters
    m = GradNorm(_tasks("t0", "t1", "t2"), GradNormParams(gradients="parameters"))
    m.backward(_linear_losses(p, grads), StepContext(shared=[p]))
    assert torch.isfinite(m.logits.grad).all()


# ----- row-sparse tables (train.sparse_embeddings) ---------------------------------------------
@pytest.mark.parametrize(("name", "params"), [
    ("pcgrad", None), ("cagrad", CAGradParams()), ("mgda", MGDAParams(gradients="parameters")),
    ("gradnorm", GradNormParams(gradients="parameters"))])
def test_gradient_methods_keep_row_sparse_tables_sparse_and_exact(name: str, params: GradientParams | None) -> None:
    """On the shared parameters a method sees the tables' task gradients as the rows a batch
    touched: the same Gram, the same coefficients and the same update as with dense tables,
    and the tables' gradient stays row-sparse (rows 1, 3 and 4 of each feature's table only)."""
    from ranker.config import FeatureSpec, ModelConfig
    from ranker.model import MultiTaskRanker

    feats = [FeatureSpec(name="u", type="categorical", buckets=9, dim=4), FeatureSpec(name="v", type="categorical", buckets=5, dim=4),
             FeatureSpec(name="tags", type="multi_hot", buckets=6, dim=4), FeatureSpec(name="p", type="dense", encoding="standard")]
    tasks = _tasks("a", "b", "c")
    batch = {"cat": torch.tensor([[1, 3], [3, 4], [4, 1], [1, 1]]), "dense": torch.randn(4, 1, generator=torch.Generator().manual_seed(1)),
             "bag:tags": torch.tensor([[0, 2], [2, 7], [5, 7], [7, 7]])}  # 7 = padding
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    grads, weights = {}, {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = MultiTaskRanker(feats, tasks, ModelConfig(experts=2, expert_dims=[8], tower_dims=[4]))
        tables = model.encoder.sparse_tables() if sparse else []
        shared = list(model.encoder.parameters()) + list(model.trunk.parameters())
        specific = [p for p in model.parameters() if all(p is not q for q in shared)]
        out = model(batch)
        losses = {t: nn.functional.binary_cross_entropy_with_logits(out[t], y * (i + 1) / 3) for i, t in enumerate(out)}
        method = build_weighting(name, tasks, None) if params is None else WEIGHTINGS[name](tasks, params)  # type: ignore[call-arg]
        weights[sparse] = method.backward(losses, StepContext(shared=shared, specific=specific, rep=model.last_encoding, tables=tables))
        grads[sparse] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if sparse:
            cat, bag = tables  # the two categoricals share one table (offsets); the bag has its own
            assert cat.grad is not None and cat.grad.is_sparse and bag.grad is not None and bag.grad.is_sparse
            assert sorted(cat.grad.coalesce().indices()[0].tolist()) == [1, 3, 4, 10 + 1, 10 + 3, 10 + 4]
            assert sorted(bag.grad.coalesce().indices()[0].tolist()) in ([0, 2, 5], [0, 2, 5, 7])  # the padding row gets zeros
    assert weights[True] == pytest.approx(weights[False], rel=1e-5)
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[False].items():
        s = grads[True][n]
        torch.testing.assert_close(s.to_dense() if s.is_sparse else s, g, rtol=1e-5, atol=1e-7, msg=n)
