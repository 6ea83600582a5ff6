"""Build (or check) the packaged KuaiRand duration table of the default simulated world.

    python benchmarks/kuairand_duration_table.py PATH            # write the table
    python benchmarks/kuairand_duration_table.py PATH --check    # compare with the packaged one

PATH is KuaiRand-Pure's `video_features_basic_pure.csv` or the folder holding it (e.g.
../shared/data/kuairand_pure_features). The table is written to
src/dualrerank/sim/kuairand_duration_quantiles.json, beside the code that reads it, so an
installed package and a checkout simulate the same world without the data set.

What is derived, and how: of the table's `video_duration` column (milliseconds), the
positive finite values (7,344 of 7,583 videos) are converted to seconds and summarised by
257 quantiles at levels k/256, k = 0..256 (numpy.quantile, method "linear"; level 0 is the
minimum, level 1 the maximum), rounded to the millisecond. No video id and no other
column is kept. KuaiRand (Gao et al., CIKM 2022, https://kuairand.com) is
licensed CC BY-SA 4.0; the table is an adaptation and carries the same licence, stated
in its own metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from dualrerank.sim.catalogue import DURATION_TABLE, KUAIRAND_CSV, load_durations, packaged_duration_table

LEVELS = 257
OUT = Path(__file__).resolve().parents[1] / "src" / "dualrerank" / "sim" / DURATION_TABLE

ATTRIBUTION = {
    "dataset": "KuaiRand-Pure (KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly Exposed Videos)",
    "authors": "Chongming Gao, Shijun Li, Yuan Zhang, Jiawei Chen, Biao Li, Wenqiang Lei, Peng Jiang, Xiangnan He",
    "publication": "CIKM 2022, pages 3953-3957; arXiv:2208.08696",
    "url": "https://kuairand.com",
    "license": "CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/",
    "this_file_license": "CC BY-SA 4.0 (an adaptation of KuaiRand-Pure; the dualrerank code is Apache-2.0, this data file is not)",
}


def source_csv(path: Path) -> Path:
    return path / KUAIRAND_CSV if path.is_dir() else path


def build_table(path: Path) -> dict:
    """The table's JSON object from the KuaiRand CSV (or its folder)."""
    csv_path = source_csv(path)
    seconds = load_durations(csv_path)
    levels = np.arange(LEVELS) / (LEVELS - 1)
    quantiles = np.round(np.quantile(seconds, levels, method="linear"), 3)
    return {
        "name": "KuaiRand-Pure video_duration quantiles (seconds)",
        "attribution": ATTRIBUTION,
        "derived_from": f"{KUAIRAND_CSV}, column video_duration (milliseconds)",
        "source_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
        "changes": (
            f"kept the {len(seconds)} videos with a positive finite video_duration, converted ms to seconds, "
            f"took {LEVELS} quantiles at levels k/{LEVELS - 1} (numpy.quantile, method 'linear'), rounded to "
            "the millisecond (levels 0 and 1 are the shortest and longest duration); no video id and no other column is kept"
        ),
        "generated_by": "benchmarks/kuairand_duration_table.py",
        "use": "the default world's item durations: inverse-CDF sampling, linear in ln(duration) between quantiles",
        "count": int(len(seconds)),
        "median_seconds": round(float(np.median(seconds)), 3),
        "std_ln_seconds": round(float(np.log(seconds).std()), 4),
        "levels": LEVELS,
        "quantiles": [float(q) for q in quantiles],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help=f"{KUAIRAND_CSV} or the folder holding it")
    ap.add_argument("--check", action="store_true", help="compare with the packaged table instead of writing it")
    args = ap.parse_args(argv)
    table = build_table(args.path)
    if args.check:
        same = np.array_equal(np.asarray(table["quantiles"]), packaged_duration_table())
        print(f"{OUT.name}: {'matches' if same else 'DIFFERS FROM'} {source_csv(args.path)}")
        return 0 if same else 1
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {OUT} ({table['count']} videos, median {table['median_seconds']} s, {LEVELS} quantiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
