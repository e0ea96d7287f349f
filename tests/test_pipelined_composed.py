"""The pipeline composed with data, tensor and expert parallelism on 8 host devices: every schedule
gives the single-device loss and gradients; the compiled loop keeps a micro-batch's rows split and its
collectives inside a pipeline rank; each rank stores only its stages."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from dsv3_jax import hlo_stats
from dsv3_jax.config import Config, MeshConfig, TrainConfig
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.pipeline import executor
from dsv3_jax.parallel.pipeline.executor import BACKWARD_CHUNK, FORWARD_CHUNK, tick_table
from dsv3_jax.parallel.pipeline.schedules import make_schedule
from dsv3_jax.parallel.sharding import DEFAULT_RULES
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_loss_and_grads, make_train_step
from dsv3_jax.validate import validate
from tests.conftest import need_devices, tiny_model_config

pytestmark = pytest.mark.multidevice

# Composed meshes: the pipeline over 2 ranks, and inside each stage the batch over data x expert
# (or expert alone) and the experts over expert, heads / FFN over tensor.
COMPOSED = {"data2-pipeline2-expert2": dict(data=2, pipeline=2, expert=2),
            "pipeline2-tensor2-expert2": dict(pipeline=2, tensor=2, expert=2)}


@pytest.fixture(scope="module")
def composed_reference():
    """16 rows: 4 micro-batches of 4 rows, one row per batch shard on data=2 x expert=2. No MTP here
    (the MTP modules on the last stage are checked by test_pipelined_training.py's train step)."""
    model = tiny_model_config(n_layers=5, first_k_dense=1, mtp_depth=0)  # 4 MoE layers: 2 or 4 stages
    config = Config(model=model, train=TrainConfig(batch_size=16, seq_len=16, warmup_steps=1, microbatches=4))
    graphdef, _, state = create_train_state(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (16, 17), 0, model.vocab_size)
    (loss, _), grads = jax.jit(make_loss_and_grads(config, graphdef))(state.params, state.routing_bias, tokens)
    return config, graphdef, state, tokens, loss, grads


def _composed_step(composed_reference, mesh_name, schedule, option=None):
    config, graphdef, state, tokens, _, _ = composed_reference
    train = dataclasses.replace(config.train, pipeline_schedule=schedule, pipeline_keep_residuals=option is not None)
    config = dataclasses.replace(config, mesh=MeshConfig(**COMPOSED[mesh_name]), train=train)
    validate(config)
    mesh = make_mesh(config.mesh)
    params, bias = jax.device_put((state.params, state.routing_bias), DEFAULT_RULES.tree((state.params, state.routing_bias),
                                                                                 mesh))
    fn = jax.jit(make_loss_and_grads(config, graphdef, pipeline_mesh=mesh))
    with jax.set_mesh(mesh):
        return mesh, fn, (params, bias, tokens)


# Every schedule once, each composed mesh with both an interleaved (V / bidirectional) and a plain
# schedule: the schedules share one executor (tick tables), and the meshes only change what runs
# inside a stage, so the full cross product (10 compiles of ~40 s on 2 cores) repeats itself.
@pytest.mark.parametrize("mesh_name, schedule", [
    ("data2-pipeline2-expert2", "dualpipev"), ("data2-pipeline2-expert2", "1f1b"),
    ("data2-pipeline2-expert2", "zb1p+keep_residuals"),
    ("pipeline2-tensor2-expert2", "dualpipe"), ("pipeline2-tensor2-expert2", "zb1p")])
def test_composed_pipeline_gradients_equal_the_single_device_step(composed_reference, mesh_name, schedule):
    """Loss and every gradient leaf, every element, within 1e-5 of that leaf's largest entry."""
    need_devices(8)
    _, _, _, _, want_loss, want_grads = composed_reference
    mesh, fn, args = _composed_step(composed_reference, mesh_name, *schedule.split("+"))
    with jax.set_mesh(mesh):
        (loss, _), grads = fn(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # The stack's gradients come back stage-owned, like its parameters.
    stack_grad = grads["moe_layers"]["ffn"]["w_gate_EDF"][...]
    assert stack_grad.sharding.spec[0] == "pipeline"
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_kept_residuals_hold_no_copy_of_the_stage_weights(composed_reference, monkeypatch):
    """With train.pipeline_keep_residuals the executor pools the stage forward's vjp residuals per
    stash entry; the stage's weights are read where they are stored, never pooled. Checked on an
    unrolled stage (2 layers), where slicing a layer's weights inside the vjp made every slice a
    residual: 26 of them in each entry. Traced only: the layout is abstract."""
    need_devices(8)
    layouts = []
    real_layout = executor.residual_layout
    monkeypatch.setattr(executor, "residual_layout", lambda *a: layouts.append(real_layout(*a)) or layouts[-1])
    mesh, fn, args = _composed_step(composed_reference, "data2-pipeline2-expert2", "zb1p", "keep_residuals")
    with jax.set_mesh(mesh):
        fn.lower(*args)
    stack = jax.tree.leaves(composed_reference[2].params["moe_layers"])
    weight_shapes = {a.shape[1:] for a in stack} | {(2,) + a.shape[1:] for a in stack}  # a layer's, a stage's
    (layout,) = layouts
    assert layout.stored and not [r.shape for r in layout.stored if r.shape in weight_shapes]
    assert sum(p is not None for p in layout.param_at) >= len(stack)  # the weights, read from where they are


def test_composed_pipeline_splits_microbatch_rows_and_keeps_collectives_in_the_pipeline_rank(composed_reference):
    """The compiled step: the pipeline loop's activation buffers (stored inputs, received activations
    and cotangents; no activation of all micro-batches) hold on each device 1 of a micro-batch's 4
    rows (split over data x expert); every collective-permute moves along the pipeline axis only (a
    mesh-wide one inside a stage's branch would wait forever for ranks running another branch)."""
    need_devices(8)
    mesh, fn, args = _composed_step(composed_reference, "data2-pipeline2-expert2", "dualpipe")
    with jax.set_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
    (loop,) = [line for line in hlo.splitlines() if " while(" in line and '(rank_program)/shard_map/while"' in line]
    carry = loop.split(" while(")[0]
    one_row = sorted(int(n) for n in re.findall(r"f32\[(\d+),1,16,32\]", carry))  # [entries, rows, T, D]
    ticks = tick_table(make_schedule("dualpipe", 2, 4))
    assert one_row == sorted([ticks.n_stash, ticks.n_inbox, ticks.n_cot])
    # Every attention score block [rows, heads, T, T] (the dense, MoE and MTP layers all run in stages):
    # one row per device, never the micro-batch's 4.
    assert "f32[1,2,16,16]" in hlo and "f32[4,2,16,16]" not in hlo
    pipeline_coordinate = {d.id: c[-1] for c, d in np.ndenumerate(mesh.devices)}
    others = {d.id: c[:-1] for c, d in np.ndenumerate(mesh.devices)}
    pairs = [tuple(map(int, p)) for group in re.findall(r"source_target_pairs=\{(.*?)\}\}", hlo)
             for p in re.findall(r"\{?(\d+),(\d+)", group)]
    assert pairs and all(others[a] == others[b] for a, b in pairs)
    # Inside the stages the experts stay expert-parallel: no all-gather rebuilds an expert weight
    # (w_gate / w_up [.., 8 experts, 32, 16], w_down [.., 8, 16, 32]); each device holds 4 experts.
    gathered = re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", hlo)
    assert not any(shape.endswith(("8,32,16", "8,16,32")) for shape in gathered)
    assert re.search(r"f32\[2,4,32,16\]", hlo)  # a stage's 2 layers x the device's 4 experts
    # The F&B pair runs its MoE blocks in phases (executor.lockstep_pair): both chunks move tokens by
    # all-to-all over `expert` only (groups of 2 of the 8 devices), not by gathering experts.
    a2a = [line for line in hlo.splitlines() if re.search(r" all-to-all(-start)?\(", line)]
    assert {hlo_stats.group_size(line) for line in a2a} == {2}
    assert all(any(f"{chunk}/" in line for line in a2a) for chunk in (FORWARD_CHUNK, BACKWARD_CHUNK))
    assert any(pipeline_coordinate[a] != pipeline_coordinate[b] for a, b in pairs)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_each_pipeline_rank_stores_and_updates_only_its_share(composed_reference, schedule):
    """Per-device bytes of the parameters and AdamW moments, from `addressable_shards`, on
    (data=2, pipeline=2, expert=2) against (data=2, expert=2): the MoE stack's exactly half (each
    rank its stages), the rest of the model (embedding, dense layer, head) split at rest over the
    pipeline too (0.54x: the norm vectors and the MLA up-projections have no embed dim and stay
    whole), and the whole train state <= 0.7x. One train step (the output shardings XLA chooses, no
    out_shardings given) keeps it so, and its compiled program gathers the embedding table whole
    from its two pipeline halves (an all-gather to f32[V, D] along D)."""
    need_devices(8)
    config = dataclasses.replace(composed_reference[0], train=dataclasses.replace(
        composed_reference[0].train, pipeline_schedule=schedule))
    V, D = config.model.vocab_size, config.model.d_model
    # the table whole out of an all-gather along its embed dim (dimension 1), the dim split over pipeline
    gathers_embedding = re.compile(rf"= f32\[{V},{D}\]\{{[^}}]*\}} all-gather\(.*dimensions={{1}}")

    def state_bytes(mesh_sizes, step=False):
        cfg = dataclasses.replace(config, mesh=MeshConfig(**mesh_sizes))
        mesh = make_mesh(cfg.mesh)
        graphdef, optimizer, state = create_train_state(cfg, 0, mesh)
        embedding_shard = state.params["embed"]["table_VD"].get_value().addressable_shards[0].data.shape
        if step:
            fn = jax.jit(make_train_step(cfg, graphdef, optimizer, mesh if cfg.mesh.pipeline > 1 else None))
            with jax.set_mesh(mesh):
                batch = jax.device_put(composed_reference[3], DEFAULT_RULES.batch(mesh))
                assert gathers_embedding.search(fn.lower(state, batch).compile().as_text())
                state, _ = fn(state, batch)
        leaves = jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
        per_device = lambda keep: sum(leaf.addressable_shards[0].data.nbytes for path, leaf in leaves
                                      if keep("moe_layers" in jax.tree_util.keystr(path)))
        return per_device(lambda stack: stack), per_device(lambda stack: not stack), embedding_shard

    stack_pp, rest_pp, embedding_pp = state_bytes(dict(data=2, pipeline=2, expert=2), step=True)
    stack_flat, rest_flat, embedding_flat = state_bytes(dict(data=2, expert=2))
    assert embedding_pp == (V, D // 2) and embedding_flat == (V, D)
    assert stack_pp * 2 == stack_flat
    assert rest_pp < 0.6 * rest_flat, (rest_pp, rest_flat)
    assert (stack_pp + rest_pp) <= 0.7 * (stack_flat + rest_flat), (stack_pp + rest_pp, stack_flat + rest_flat)
