"""Data-vs-data FID floor on the embedded digits (split "a" vs split "b", same N).

Writes rows in the DESIGN.md §8 format to ``benchmarks/results/eval_floor.json`` (rows of other
methods already in the file, e.g. teacher samplers, are kept)::

    python benchmarks/eval_floor.py                 # cached digits detector (trained on first use)
    python benchmarks/eval_floor.py --n 200 500 896 --heldout

The FID here is FID-digits (features of the package's digits classifier), not Inception FID.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "eval_floor.json"
BENCHMARK = "eval_floor"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help="numbers of images per side (default: 200, 500 and all of split a)")
    ap.add_argument("--detector-weights", default=None, help="digits detector folder (default: cached)")
    ap.add_argument("--heldout", action="store_true",
                    help="also train a detector on split a and report its accuracy on split b")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)

    from stepdistill.eval.detectors import get_detector, train_digits_detector
    from stepdistill.eval.inputs import load_dataset_images
    from stepdistill.eval.metrics import class_accuracy, compute_fid

    t0 = time.perf_counter()
    det = get_detector("digits", weights=args.detector_weights)
    detector_seconds = time.perf_counter() - t0
    n_all = load_dataset_images("digits-a")[0].shape[0]
    ns = args.n or [200, 500, n_all]
    xb, yb = load_dataset_images("digits-b")
    acc_b = class_accuracy(xb, yb, det)["class_accuracy"]  # split b is inside the detector's training set
    heldout = None
    if args.heldout:
        with tempfile.TemporaryDirectory() as d:
            info = train_digits_detector(Path(d) / "heldout", split="a", eval_split="b")
            heldout = {"accuracy": info["eval"]["accuracy"], "train_seconds": info["train"]["seconds"]}

    command = "python benchmarks/eval_floor.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                   if (argv or sys.argv[1:]) else "")
    commit = git_commit()
    rows = []
    for n in ns:
        t = time.perf_counter()
        res = compute_fid("digits-a", "digits-b", det, num_images=n, num_images_b=n, progress=False)
        row = {
            "benchmark": BENCHMARK,
            "teacher": "digits",
            "method": "data",
            "nfe": 0,
            "fid": round(res.fid, 6),
            "fid_detector": res.fid_detector,
            "n_samples": res.n_a,
            "metric": res.metric,
            "compare": "digits-a vs digits-b (first N of each)",
            "n_reference": res.n_b,
            "detector_id": det.id,
            "class_accuracy": round(acc_b, 6),
            "class_accuracy_note": "digits-b under the detector (b is in its training set)",
            "fid_seconds": round(time.perf_counter() - t, 3),
            "commit": commit,
            "command": command,
        }
        if heldout:
            row["detector_heldout_accuracy"] = round(heldout["accuracy"], 6)
            row["detector_heldout_note"] = "same recipe trained on split a, evaluated on split b"
            row["detector_train_seconds"] = heldout["train_seconds"]
        rows.append(row)
        print(f"{res.metric}: {res.fid:.4f}  ({row['fid_seconds']:.2f}s)", file=sys.stderr)

    out = Path(args.output)
    old = json.loads(out.read_text()) if out.is_file() else []
    kept = [r for r in old if not (r.get("benchmark") == BENCHMARK and r.get("method") == "data")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept + rows, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"rows": len(rows), "output": str(out), "detector_seconds": round(detector_seconds, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
