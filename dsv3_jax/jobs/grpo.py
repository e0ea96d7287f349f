"""The GRPO run: rollouts, rewards, several optimisation passes, metrics, checkpoints, resume.

A GRPO run starts from a trained run (usually an SFT run) and keeps the same run-directory layout
(jobs/train.py): config.json (train.objective="grpo", the grpo section), tokenizer.json,
metrics.jsonl, checkpoints/, plots. Each step: N problems from the task's train split (drawn from
a generator seeded by (train.seed, step), so the data position is the step), G samples each,
rewards, advantages (eq. 28), `grpo.passes` updates on the batch. The checkpoint holds the policy's
train state and the frozen reference, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.checkpoint import Checkpointer, restore_target
from dsv3_jax.config import Config, apply_overrides, config_from_json
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.errors import UsageError
from dsv3_jax.jobs.train import (ProgressReporter, check_finite, checked_run_config, has_checkpoint,
                                 resolve_run_config)
from dsv3_jax.post.grpo import group_advantages, make_grpo_fns, sample_rollouts, task_accuracy
from dsv3_jax.post.sft import init_from_run
from dsv3_jax.post.tasks import TASKS, held_out
from dsv3_jax.report import write_report
from dsv3_jax.run_dir import RunLock, StopSignals, truncate_jsonl, write_atomic
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.state import TrainState, create_train_state


@flax.struct.dataclass
class GRPOState:
    policy: TrainState
    reference: Any  # nnx.State of the frozen reference policy's Params (the starting weights)
    reference_bias: Any


def grpo_config(from_dir: str | Path, task: str, overrides: list[str]) -> Config:
    """A new GRPO run's config from the run it starts from (same model and tokenizer): GRPO
    defaults (constant lr, evaluation every 10 steps), `grpo.task`, then `overrides`."""
    from_dir = Path(from_dir).absolute()
    if not (from_dir / "config.json").is_file():
        raise UsageError(f"--from {str(from_dir)!r} is not a dsv3 run directory (no config.json)")
    if not has_checkpoint(from_dir):
        raise UsageError(f"--from {str(from_dir)!r} has no checkpoint to start from (train or fine-tune it first)")
    base = config_from_json((from_dir / "config.json").read_text())
    train = dataclasses.replace(base.train, objective="grpo", init_from=str(from_dir), steps=50, lr=base.train.lr / 3,
                                warmup_steps=0, decay_start_fraction=1.0, eval_every=10, checkpoint_every=10,
                                ema_decay=0.0)  # GRPO keeps no parameter EMA
    data = dataclasses.replace(base.data, tokenizer=base.data.tokenizer or str(from_dir / "tokenizer.json"))
    grpo = dataclasses.replace(base.grpo, task=task)
    return apply_overrides(dataclasses.replace(base, train=train, data=data, grpo=grpo), overrides)


def grpo(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
         saved: Config | None = None) -> int:
    """Run (or continue) GRPO. Returns the exit status (0, or 128 + signal when stopped). `saved`:
    the run's config.json on resume, if the caller has read it."""
    run_dir = Path(run_dir)
    config = checked_run_config(config, run_dir, resume, saved)
    if config.train.objective != "grpo":
        raise UsageError(f"{str(run_dir)!r} is not a GRPO run (train.objective={config.train.objective}); "
                         "start one with dsv3 grpo --from RUN --task NAME")
    if config.train.ema_decay:
        raise UsageError(f"train.ema_decay={config.train.ema_decay}: dsv3 grpo keeps no parameter EMA (dsv3 train "
                         "and dsv3 sft do); leave it at 0")
    own_tokenizer = run_dir / "tokenizer.json"
    tokenizer = load_tokenizer(own_tokenizer if resume and own_tokenizer.is_file() else config.data.tokenizer)
    graphdef, optimizer, policy = create_train_state(per_update(config), config.train.seed)
    if not (resume and has_checkpoint(run_dir)):
        policy = init_from_run(policy, config)
    # The reference is a copy: the update donates the policy's buffers.
    state = GRPOState(policy, reference=jax.tree.map(jnp.copy, policy.params),
                      reference_bias=jax.tree.map(jnp.copy, policy.routing_bias))

    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        resolve_run_config(config, run_dir, resume)
        if not own_tokenizer.exists() or not resume:
            write_atomic(own_tokenizer, tokenizer.to_str())
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
        try:
            return _run(config, run_dir, resume, progress, tokenizer, graphdef, optimizer, state, checkpointer)
        finally:
            checkpointer.close()


def _run(config: Config, run_dir: Path, resume: bool, progress: bool, tokenizer, graphdef, optimizer,
         state: GRPOState, checkpointer: Checkpointer) -> int:
    tc, gc = config.train, config.grpo
    task = TASKS[gc.task]
    metrics_path = run_dir / "metrics.jsonl"
    reporter = ProgressReporter(enabled=progress, total=tc.steps)
    start = 0
    if resume and checkpointer.latest_step() is not None:
        abstract = restore_target(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
        state, _, start = checkpointer.restore_newest_good(abstract, run_dir / "damaged_checkpoints",
                                                           say=reporter.warn)
        truncate_jsonl(metrics_path, start)
    else:
        metrics_path.unlink(missing_ok=True)
    write_atomic(run_dir / "config.json", config.to_json())
    reference_logprobs, update = make_grpo_fns(config, graphdef, optimizer)
    eval_problems = held_out(task, gc.eval_problems)
    ood_problems = held_out(task, gc.eval_problems, split="ood") if task.has_ood else []

    reporter.start(start)
    reporter.message(f"run directory: {run_dir} (GRPO on {task.name}, steps {start + 1}..{tc.steps})")
    status = 0
    try:
        with StopSignals() as stop, open(metrics_path, "a") as metrics_file:
            for step in range(start + 1, tc.steps + 1):
                state, record = grpo_step(config, task, tokenizer, graphdef, state, step, reference_logprobs, update)
                check_finite(record, step, checkpointer, run_dir)
                if step % tc.eval_every == 0 or step == tc.steps:
                    model = nnx.merge(graphdef, state.policy.params, state.policy.routing_bias)
                    record["val_accuracy"] = task_accuracy(model, tokenizer, task, eval_problems, gc.max_new_tokens)
                    if ood_problems:
                        record["ood_accuracy"] = task_accuracy(model, tokenizer, task, ood_problems, gc.max_new_tokens)
                if step % tc.log_every == 0 or "val_accuracy" in record:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                reporter.update(step, record)
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop.received:
                    checkpointer.save(step, state, {"next_step": step + 1})
                if stop.received:
                    status = reporter.stopped(stop.received[0], step, run_dir, "grpo")
                    break
    finally:
        reporter.close()
    if status == 0:
        write_report(run_dir)
    return status


def grpo_step(config: Config, task, tokenizer, graphdef, state: GRPOState, step: int, reference_logprobs, update
              ) -> tuple[GRPOState, dict]:
    """One GRPO step: problems, rollouts, rewards, advantages, `grpo.passes` updates. A batch in
    which no group has reward variance is counted (`skipped`) and changes nothing but the step."""
    tc, gc = config.train, config.grpo
    rng = np.random.default_rng([tc.seed, step])  # the data position is the step: exact on resume
    problems = [task.sample(rng, "train") for _ in range(gc.prompts_per_step)]
    policy_model = nnx.merge(graphdef, state.policy.params, state.policy.routing_bias)
    t0 = time.perf_counter()
    rollouts = sample_rollouts(policy_model, tokenizer, task, problems, config, seed=int(rng.integers(2 ** 31)))
    rollout_s = time.perf_counter() - t0
    advantages_NG, has_variance_N = group_advantages(rollouts.rewards_NG, gc.advantage_norm)
    record = {"step": step, "reward_mean": float(rollouts.rewards_NG.mean()),
              "reward_max": float(rollouts.rewards_NG.max()), "correct_mean": float(rollouts.correct_NG.mean()),
              "well_formed_mean": float(rollouts.well_formed_NG.mean()),
              "groups_with_variance": float(has_variance_N.mean()),
              "response_length": float(rollouts.response_lengths_B.mean()),
              "rollout_tokens_per_s": float(rollouts.response_lengths_B.sum() / rollout_s)}
    policy = state.policy
    if has_variance_N.any():
        mask_BT = rollouts.mask_BT * np.repeat(has_variance_N, gc.group_size)[:, None]  # skipped groups
        batch = (jnp.asarray(rollouts.tokens_BS), jnp.asarray(mask_BT), jnp.asarray(rollouts.old_logp_BT))
        ref_logp_BT = reference_logprobs(state.reference, state.reference_bias, batch[0])
        t0 = time.perf_counter()
        for _ in range(gc.passes):
            policy, metrics = update(policy, *batch, ref_logp_BT, jnp.asarray(advantages_NG.reshape(-1)))
        metrics = jax.device_get(metrics)  # the last pass's
        train_s = time.perf_counter() - t0
        record.update({k: float(v) for k, v in metrics.items()})
        record["train_tokens_per_s"] = float(gc.passes * rollouts.tokens_BS.size / train_s)
        record["skipped"] = 0.0
    else:
        record.update({"loss": 0.0, "grad_norm": 0.0, "nonfinite_state": 0.0, "skipped": 1.0})
    record["lr"] = float(lr_schedule(per_update(config).train)((step - 1) * gc.passes))
    policy = policy.replace(step=policy.step + 1)
    state = state.replace(policy=policy)
    if gc.ref_refresh_every and step % gc.ref_refresh_every == 0:  # the KL's anchor moves to the policy
        state = state.replace(reference=jax.tree.map(jnp.copy, policy.params),
                              reference_bias=jax.tree.map(jnp.copy, policy.routing_bias))
    return state, record


def per_update(config: Config) -> Config:
    """The config whose lr schedule counts optimizer updates (`grpo.passes` per step), as optax does:
    train.steps and train.warmup_steps are given in GRPO steps."""
    passes = config.grpo.passes
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, steps=config.train.steps * passes, warmup_steps=config.train.warmup_steps * passes))
