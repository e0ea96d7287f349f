"""Routing ablation: no balancing vs auxiliary losses vs DeepSeek-V3's aux-loss-free bias update,
run as one `dsv3 compare` sweep.

Command:   uv run python experiments/routing_ablation.py [--variants balancers] [--steps 300] [--seeds 1]
Runtime:   about 25 minutes on a 2-core CPU for `balancers` (six `tiny` runs of 300 steps).
Shows:     in the spirit of Wang et al. 2024 ("Auxiliary-loss-free load balancing") and report
           §2.1.2 / §4.5.2: without balancing the routing collapses (MaxVio high); an auxiliary loss
           balances the load at a price in LM loss that grows with its strength; the sign-bias
           update reaches low MaxVio without that price.
Writes:    experiments/results/routing_ablation_<variants>_<steps>x<seeds>.{md,png}: a file per
           variant set, steps and seeds, so a run of another set (add one to VARIANT_SETS) never
           overwrites this one's. The sweep's run directories stay in runs/routing_ablation_<...>
           (resumable: rerun the same command after a stop).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dsv3_jax.host_platform import default_to_cpu_without_accelerator

default_to_cpu_without_accelerator()  # as the `dsv3` command: no libtpu noise on a CPU host with the tpu extra

from dsv3_jax.jobs.compare import SweepSpec, compare  # noqa: E402

RESULTS = Path(__file__).parent / "results"

VARIANT_SETS = {  # set name -> {variant name -> its overrides}; names are directory names
    "balancers": {
        "a_no_balancing": ["model.balancer=none"],
        "b_aux_loss_0.001": ["model.balancer=aux_loss", "train.aux_loss_alpha=0.001"],
        "b_aux_loss_0.01": ["model.balancer=aux_loss", "train.aux_loss_alpha=0.01"],
        "b_aux_loss_0.1": ["model.balancer=aux_loss", "train.aux_loss_alpha=0.1"],
        "c_sign_bias": ["model.balancer=aux_free"],
        "d_sign_bias+sequence_loss": ["model.balancer=aux_free+sequence_loss"],
    },
    "routers": {  # the same sign-bias balancing under each built-in router
        "deepseek_v3": [],
        "deepseek_v2": ["model.router=deepseek_v2"],
        "switch": ["model.router=switch"],
        "expert_choice": ["model.router=expert_choice"],
        "hash": ["model.router=hash"],
    },
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="balancers", choices=sorted(VARIANT_SETS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--parallel", type=int, help="runs at a time (default: one per 2 CPU cores)")
    args = parser.parse_args()
    name = f"routing_ablation_{args.variants}_{args.steps}x{args.seeds}"
    sweep_dir = Path("runs") / name
    sweep_dir.parent.mkdir(exist_ok=True)
    spec = SweepSpec(variants=VARIANT_SETS[args.variants], preset="tiny", seeds=args.seeds, steps=args.steps)
    resume = (sweep_dir / "sweep.json").is_file()
    status = compare(None if resume else spec, sweep_dir, resume=resume, parallel=args.parallel)
    if status:
        return status
    RESULTS.mkdir(exist_ok=True)
    text = (sweep_dir / "compare.md").read_text().replace("(comparison.png)", f"({name}.png)")
    (RESULTS / f"{name}.md").write_text(f"{text}\nCommand: `uv run python experiments/routing_ablation.py "
                                        f"--variants {args.variants} --steps {args.steps} --seeds {args.seeds}` "
                                        "(tiny preset, stdlib corpus, 16 x 128 tokens per step, 2-core CPU).\n")
    shutil.copy(sweep_dir / "comparison.png", RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
