"""Is a network's never-married gap to the trees real? A paired bootstrap on the census test split.

    python bench/census.py --style plain --architectures mmoe --seeds 0   # writes bundles
    python bench/census_gap.py bench/out/census/bundles/plain-mmoe-0 [more bundles]

Refits the single-task HistGradientBoosting at a fixed point of its grid (by default the point
`bench/census.py --gbdt` chose for never-married on this split: learning rate 0.1, 15 leaves,
L2 10, 80 trees), scores the test split with each bundle, and prints for each bundle the test
AUC difference (network minus trees) with a 95% interval from resampling the test rows, then
the AUC of both within each group of `det_hh_fam_stat` that holds both classes and within age
bands. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import census  # noqa: E402

LABEL = "never_married"


def tree_scores(tables: dict, mats: dict, is_cat: np.ndarray, lr: float, leaves: int, l2: float, trees: int) -> np.ndarray:
    """Test probabilities of the trees fitted on train with the bench's inputs (``census.gbdt_inputs``)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(learning_rate=lr, max_leaf_nodes=leaves, l2_regularization=l2, max_iter=trees, early_stopping=False,
                                         categorical_features=is_cat, random_state=0)
    clf.fit(mats["train"], tables["train"].column(LABEL).to_numpy())
    return clf.predict_proba(mats["test"])[:, 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "census", help="the census split (bench/census.py --prepare-only)")
    ap.add_argument("--gbdt", default="0.1,15,10,80", help="learning rate, leaves, L2, trees")
    ap.add_argument("--resamples", type=int, default=500)
    args = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from ranker.bundle import load_bundle

    lr, leaves, l2, trees = (float(x) for x in args.gbdt.split(","))
    tables, mats, is_cat = census.gbdt_inputs(args.out, ("train", "test"))
    test = tables["test"]
    y = test.column(LABEL).to_numpy().astype(int)
    trees_p = tree_scores(tables, mats, is_cat, lr, int(leaves), l2, int(trees))
    print(f"trees (lr {lr:g}, {int(leaves)} leaves, L2 {l2:g}, {int(trees)} trees): test AUC {roc_auc_score(y, trees_p):.5f}")
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(args.resamples)]
    household = np.array(test.column("det_hh_fam_stat").to_pylist(), dtype=object)
    age = test.column("age").to_numpy()
    for path in args.bundles:
        b = load_bundle(path)
        task = next(t.name for t in b.config.tasks if t.label == LABEL)
        with torch.inference_mode():
            net = b.model.predict(b.featurizer.transform(test, bias=False), [task])[task].float().numpy()
        diffs = np.array([roc_auc_score(y[i], net[i]) - roc_auc_score(y[i], trees_p[i]) for i in draws])
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        print(f"\n{path.name}: test AUC {roc_auc_score(y, net):.5f}, network - trees {roc_auc_score(y, net) - roc_auc_score(y, trees_p):+.5f} "
              f"(95% interval {lo:+.5f} to {hi:+.5f}; {np.mean(diffs < 0):.0%} of resamples favour the trees)")
        groups = [(f"det_hh_fam_stat = {g}", household == g) for g in sorted(set(household), key=lambda g: -np.sum(household == g))]
        bands = [(f"age {a}-{b_}", (age >= a) & (age < b_)) for a, b_ in ((15, 18), (18, 30), (30, 40), (40, 60), (60, 200))]
        for name, m in groups + bands:
            if m.sum() and y[m].min() != y[m].max():
                print(f"  {name[:60]:<60} rows {int(m.sum()):6,}  AUC network {roc_auc_score(y[m], net[m]):.4f}  trees {roc_auc_score(y[m], trees_p[m]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
