"""A quick look at fine-tuning settings for unet2d_nuclei_broad (real weights) on BBBC039, without the service:
n random 128 x 128 windows of the pool fields with their ground truth, the adapter's fine-tuning (its defaults
except what is given), F1 at IoU 0.5 pooled over the 10 test fields, each segmented whole by the adapter.

``--targets gapless`` trains on the former one-channel target (every labelled pixel foreground, touching objects
merged) instead of today's (a gap where objects touch). Rows go to ``results/finetune_pilot.jsonl``. This is a
pilot for choosing what ``service_al.py`` should measure, not a measure of what a user gets.

    python benchmarks/finetune_pilot.py --model <nuclei_broad rdf> --labels 2 --learning-rate 3e-4 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import pooled_f1, whole_fields  # noqa: E402

OUT = Path(__file__).parent / "results" / "finetune_pilot.jsonl"
PATCH = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the nuclei_broad rdf service_al.py prepares in its workdir "
                        "(nuclei-broad-state-dict/bioimageio.yaml)")
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--targets", choices=("gaps", "gapless"), default="gaps")
    args = parser.parse_args()

    import torch
    from skimage.measure import label

    import bioadapt.adapters.targets as targets
    from bioadapt.adapters import load_adapter

    torch.set_num_threads(1)
    if args.targets == "gapless":
        targets.touching = lambda labels: np.zeros(np.shape(labels), bool)
    pool, test = whole_fields("bbbc039")
    model = load_adapter(args.model, device="cpu")
    base = model.state_dict()

    def test_f1() -> dict:
        return pooled_f1([model.segment(f.image.astype(np.float32)) for f in test], [f.truth for f in test])

    sent = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(args.labels):
            field = pool[rng.integers(len(pool))]
            y = rng.integers(0, field.truth.shape[0] - PATCH)
            x = rng.integers(0, field.truth.shape[1] - PATCH)
            samples.append((field.image[:, y:y + PATCH, x:x + PATCH].astype(np.float32),
                            label(field.truth[y:y + PATCH, x:x + PATCH], background=0, connectivity=2)))
        model.load_state_dict(base)
        started = time.perf_counter()
        result = model.fine_tune(samples, {"seed": seed, **sent})
        row = {"targets": args.targets, "seed": seed, "labels": args.labels, "sent": sent, "test": test_f1(),
               "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
               "seconds": round(time.perf_counter() - started)}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
