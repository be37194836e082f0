"""Featurize stage in a tight loop: the training featurizer on one request's rows.

    python bench/bench_featurize.py --bundle B --data test.parquet   # a bundle's schema and rows
    python bench/bench_featurize.py --synthetic 3,34                 # K string columns, 1,000 rows

The second form builds featurizers of K categorical string columns (100 distinct values each,
as census-like codes have) and shows how the cost grows with K. Figures are printed (median
of ``--runs``), never asserted; on a shared machine they move with its load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def median_ms(fn, runs: int) -> float:  # noqa: ANN001
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def synthetic(k: int, rows: int, seed: int = 0) -> tuple[object, pa.Table]:
    from ranker.config import FeatureSpec
    from ranker.features import Featurizer

    rng = np.random.default_rng(seed)
    feats = [FeatureSpec(name=f"s{i}", type="categorical", buckets=1000, dim=8) for i in range(k)]
    feats += [FeatureSpec(name=f"x{i}", type="dense", encoding="standard") for i in range(6)]  # standardised: no edges to fit
    table = pa.table({**{f"s{i}": pa.array([f"v{v}" for v in rng.integers(0, 100, rows)]) for i in range(k)},
                      **{f"x{i}": pa.array(rng.normal(size=rows)) for i in range(6)}})
    return Featurizer(feats, {f"s{i}": "str" for i in range(k)}, {f"x{i}": (0.0, 1.0) for i in range(6)}), table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--data", type=Path, help="Parquet rows (with --bundle)")
    p.add_argument("--synthetic", default=None, help="comma-separated string-column counts, e.g. 3,34")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--runs", type=int, default=200)
    a = p.parse_args()
    if a.bundle:
        from ranker.bundle import load_bundle

        b = load_bundle(a.bundle)
        table = pq.read_table(a.data, columns=list(dict.fromkeys(b.featurizer.columns))).slice(0, a.rows)
        f = b.featurizer
        print(f"{a.bundle}: {len(f.categorical)} categorical ({sum(v == 'str' for v in f.kinds.values())} string), "
              f"{len(f.dense)} dense, {len(f.multi_hot)} multi-hot; {table.num_rows} rows: "
              f"featurize {median_ms(lambda: f.transform(table), a.runs):.3f} ms (median of {a.runs})")
    for k in [int(x) for x in (a.synthetic or "").split(",") if x]:
        fz, rows = synthetic(k, a.rows)
        ms = median_ms(lambda fz=fz, rows=rows: fz.transform(rows), a.runs)
        print(f"{k:>3} string columns + 6 dense, {a.rows} rows: featurize {ms:.3f} ms")


if __name__ == "__main__":
    main()
