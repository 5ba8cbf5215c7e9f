"""Host time of a training step's batch indices: each epoch's order made at every step, as the trainer did until
2026-12-07 (`micro_batch_indices`, one call each), against once per epoch (`DataOrder`, the trainer's now).

    python -m bench.data_order                    # 3,414 rows (the demo's data) and 100,000, shuffled and stratified

A GPU step at small batches waits for its host: a shuffle of every row at every step is host time the step pays.
Prints one JSON object per (rows, order): microseconds per step, the best of `--repeats` timings of an epoch's
first `--steps` steps of 8 rows.
"""

from __future__ import annotations

import argparse
import json

from bench.host_time import best_us
from fastprompt.train.data import DataOrder, micro_batch_indices

BATCH = 8


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[3414, 100_000])
    parser.add_argument("--steps", type=int, default=100, help="steps per timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings, the best kept (default: %(default)s)")
    args = parser.parse_args(argv)
    for rows in args.rows:
        labels = [(None, "positive" if row % 3 else "negative") for row in range(rows)]   # two labels, 2 to 1
        for order, strata in (("shuffled", None), ("stratified", labels)):
            def every_step():
                for step in range(args.steps):
                    micro_batch_indices(rows, BATCH, 0, step, strata=strata)

            def once_per_epoch():
                data_order = DataOrder(rows, 0, strata=strata)
                for step in range(args.steps):
                    data_order.indices(BATCH, step)

            per_step = {name: round(best_us(call, 1, args.repeats) / args.steps, 2)
                        for name, call in (("every_step_us", every_step), ("once_per_epoch_us", once_per_epoch))}
            print(json.dumps({"rows": rows, "order": order, **per_step}))


if __name__ == "__main__":
    main()
