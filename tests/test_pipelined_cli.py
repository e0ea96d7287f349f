"""`dsv3 train` on a composed pipeline mesh (data=2, pipeline=2, expert=2; DualPipe): it trains,
checkpoints the stage-owned state, and the run moves off the pipeline and back onto it (both
--resume) with the straight run's losses. (SIGTERM and kill -9 resumes are mesh-independent loop
behaviour: tests/test_train_cli.py, and 2 processes on a mesh in tests/test_multiprocess.py.)"""

import json
import shutil

import numpy as np
import pytest

from tests.test_train_cli import SMALL, dsv3, losses

STEPS = 8
CHANGES = {"model.n_layers=2": "model.n_layers=5",  # 4 MoE layers: 2 stages
           "train.batch_size=4": "train.batch_size=16"}  # 4 micro-batches of 4 rows: 1 per batch shard
COMPOSED = [CHANGES.get(a, a) for a in SMALL] + [
    "--set", "train.microbatches=4", "--set", "train.checkpoint_every=2", "--set", "train.pipeline_schedule=dualpipe",
    "--set", "train.keep_checkpoints=3",
    # The lr schedule does not depend on train.steps (constant after warm-up), so a run resumed with a
    # smaller --steps and then the full one takes the straight run's steps.
    "--set", "train.decay_start_fraction=1.0",
    "--mesh", "data=2,pipeline=2,expert=2", "--host-devices", "8"]


def test_composed_pipeline_run_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(straight), *COMPOSED)
    assert out.returncode == 0, out.stderr
    assert [step for step, _ in losses(straight)] == list(range(1, STEPS + 1))

    # pipeline=2 -> none -> pipeline=2: the stage-owned stack is the same [L, ...] array on any mesh
    # (its layer axis split over pipeline ranks or not), so checkpoint 4 restores off the pipeline,
    # and that run's checkpoint 6 back onto it.
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    for step in (6, 8):
        shutil.rmtree(moved / "checkpoints" / str(step))
    out = dsv3("train", "--steps", "6", "--run-dir", str(moved), "--resume", *COMPOSED, "--mesh", "data=2,expert=2",
               "--host-devices", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(moved), "--resume", *COMPOSED)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [step for step, _ in losses(moved)] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([loss for _, loss in losses(moved)], [loss for _, loss in losses(straight)], rtol=1e-5)
    changes = [(c["step"], c["to"]["mesh"]["pipeline"]) for c in map(json.loads, open(moved / "mesh_changes.jsonl"))]
    assert changes == [(4, 1), (6, 2)]


@pytest.mark.parametrize("changes, message", [
    (["--mesh", "pipeline=3", "--set", "model.n_layers=7", "--set", "train.batch_size=6", "--set",
      "train.microbatches=6"], "dualpipe needs an even number of ranks and of micro-batches (got 3, 6)"),
    (["--set", "train.microbatches=2", "--set", "train.batch_size=8"],
     "dualpipe needs at least 4 micro-batches for 2 ranks (got 2)"),
    (["--set", "model.n_layers=4"], "3 MoE layers must split into 2 equal pipeline stages"),
    (["--set", "train.batch_size=8"], "a micro-batch of train.batch_size / train.microbatches = 2 rows must split "
                                      "over the 4 batch shards"),
    (["--set", "train.microbatches=6"], "train.batch_size=16 must be divisible by train.microbatches=6"),
    (["--mesh", "pipeline=2,expert=3", "--host-devices", "6", "--set", "train.batch_size=24"],
     "model.n_routed_experts=8 must be divisible by mesh.expert=3"),
])
def test_invalid_pipeline_requests_one_line_exit_2(tmp_path, changes, message):
    out = dsv3("train", "--steps", "2", "--run-dir", str(tmp_path / "r"), *COMPOSED, *changes)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "r").exists()
