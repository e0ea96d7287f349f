"""Group Relative Policy Optimization (report §5.2.2, eq. 26-28; DeepSeekMath §4.1).

For each question q, G outputs o_1..o_G are sampled from the old policy and scored, r_1..r_G.
With no critic, every token of o_i gets the group-normalised advantage
    A_i = (r_i - mean(r)) / std(r)                                                    (eq. 28)
and the policy maximises, per token t of o_i, with rho = pi_theta / pi_old at that token,
    min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta D_KL(pi_theta || pi_ref)      (eq. 26)
    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1                             (eq. 27)
averaged over the tokens of each output, then over the outputs (DeepSeekMath's 1/G sum_i 1/|o_i|
sum_t). A group whose rewards are all equal has std 0 and no signal: it is counted and left out.

Legend: B rollouts (prompts x G), S tokens of a rollout (prompt + response, padded), T = S - 1
predicted positions, V vocab, N prompts, G group size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.config import Config
from dsv3_jax.data.tokenizer import EOS
from dsv3_jax.infer.generate import generate_with_logprobs
from dsv3_jax.model.routing import Balancing
from dsv3_jax.post.rewards import REWARDS
from dsv3_jax.post.tasks import Problem, Task
from dsv3_jax.train.loss import token_nll
from dsv3_jax.train.step import max_violation, nonfinite_weights, update_routing_bias


def group_advantages(rewards_NG: np.ndarray, norm: str = "std", min_std: float = 1e-6
                     ) -> tuple[np.ndarray, np.ndarray]:
    """eq. 28 per group (population std; norm="none": centred only): (advantages [N, G], whether
    each group has variance [N]); groups without variance get advantage 0 (and are left out of
    the loss by their mask)."""
    rewards_NG = np.asarray(rewards_NG, np.float64)
    std_N = rewards_NG.std(axis=1)
    has_variance_N = std_N > min_std
    scale_N = np.where(has_variance_N, std_N, 1.0) if norm == "std" else np.ones_like(std_N)
    advantages = (rewards_NG - rewards_NG.mean(axis=1, keepdims=True)) / scale_N[:, None]
    return np.where(has_variance_N[:, None], advantages, 0.0).astype(np.float32), has_variance_N


def token_logprobs(logits_BTV: Float[Array, "B T V"], labels_BT: Array, temperature: float) -> Float[Array, "B T"]:
    """log pi(label) under softmax(logits / T): the policy that sampled the rollouts."""
    return -token_nll(logits_BTV.astype(jnp.float32) / temperature, labels_BT)


class GRPOParts(NamedTuple):
    loss: Float[Array, ""]
    kl: Float[Array, ""]  # eq. 27, mean per token (same averaging as the loss)
    clip_fraction: Float[Array, ""]  # response tokens whose ratio is outside [1 - eps, 1 + eps]


def grpo_loss(logp_BT: Array, old_logp_BT: Array, ref_logp_BT: Array, advantages_B: Array, mask_BT: Array,
              epsilon: float, beta: float) -> GRPOParts:
    """Minus the GRPO objective (eq. 26) over the response tokens in `mask_BT`."""
    mask_BT = mask_BT.astype(jnp.float32)
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    advantages_B1 = advantages_B[:, None]
    surrogate_BT = jnp.minimum(ratio_BT * advantages_B1, jnp.clip(ratio_BT, 1 - epsilon, 1 + epsilon) * advantages_B1)
    log_ref_ratio_BT = ref_logp_BT - logp_BT
    kl_BT = jnp.exp(log_ref_ratio_BT) - log_ref_ratio_BT - 1.0

    lengths_B = mask_BT.sum(axis=1)
    counted = jnp.maximum((lengths_B > 0).sum(), 1)

    def mean_over_outputs(x_BT):  # 1/G sum_i 1/|o_i| sum_t, over the outputs that count
        return ((x_BT * mask_BT).sum(axis=1) / jnp.maximum(lengths_B, 1.0)).sum() / counted

    clipped = (jnp.abs(ratio_BT - 1.0) > epsilon) * mask_BT
    return GRPOParts(loss=-mean_over_outputs(surrogate_BT - beta * kl_BT), kl=mean_over_outputs(kl_BT),
                     clip_fraction=clipped.sum() / jnp.maximum(mask_BT.sum(), 1.0))


# Rollouts ------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """G sampled responses per problem, scored, laid out for the loss (rows grouped per problem)."""
    problems: list[Problem]
    completions: list[str]
    rewards_NG: np.ndarray  # correct + grpo.format_weight x well-formed: what the advantages see
    correct_NG: np.ndarray  # the task's reward alone
    well_formed_NG: np.ndarray  # the task's format reward (zeros for a task without one)
    tokens_BS: np.ndarray  # prompt + response, right-padded with EOS
    mask_BT: np.ndarray  # 1 where position t predicts a response token (its EOS included)
    old_logp_BT: np.ndarray  # log-probs recorded at sampling time, at the same positions
    response_lengths_B: np.ndarray


def sample_rollouts(model: nnx.Module, tokenizer, task: Task, problems: list[Problem], config: Config,
                    seed: int) -> Rollouts:
    """Sample G responses per problem with the batched latent-cache generator, recording each
    token's log-prob, and score them with the task's reward (code rewards run in parallel)."""
    gc = config.grpo
    G = gc.group_size
    eos = tokenizer.token_to_id(EOS)
    prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False).ids for p in problems]
    rows = [ids for ids in prompt_ids for _ in range(G)]
    max_new = gc.max_new_tokens or task.max_new_tokens
    responses, logprobs = generate_with_logprobs(model, rows, max_new, gc.temperature, gc.top_p, seed, eos)
    completions = [tokenizer.decode([t for t in r if t != eos]) for r in responses]
    reward_fn = REWARDS[task.reward]
    scored = [(c, problems[i // G]) for i, c in enumerate(completions)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # the code reward waits on subprocesses
        correct = np.array(list(pool.map(lambda pair: reward_fn(*pair), scored)), np.float32)
    well_formed = (np.array([REWARDS[task.format_reward](*pair) for pair in scored], np.float32)
                   if task.format_reward else np.zeros_like(correct))
    rewards = correct + np.float32(gc.format_weight) * well_formed

    # Room for the longest prompt and the longest allowed response, in steps of 16: one shape (one
    # compilation of the update) per run for a task whose prompts have similar lengths.
    S = -(-(max(len(p) for p in rows) + max_new) // 16) * 16 + 1
    B = len(rows)
    tokens_BS = np.full((B, S), eos, np.int32)
    mask_BT = np.zeros((B, S - 1), np.float32)
    old_logp_BT = np.zeros((B, S - 1), np.float32)
    for b, (p, r, lp) in enumerate(zip(rows, responses, logprobs)):
        tokens_BS[b, :len(p) + len(r)] = p + r
        mask_BT[b, len(p) - 1:len(p) - 1 + len(r)] = 1.0  # position t predicts token t + 1
        old_logp_BT[b, len(p) - 1:len(p) - 1 + len(r)] = lp
    N = len(problems)
    return Rollouts(problems, completions, rewards.reshape(N, G), correct.reshape(N, G), well_formed.reshape(N, G),
                    tokens_BS, mask_BT, old_logp_BT, np.array([len(r) for r in responses]))


def task_accuracy(model: nnx.Module, tokenizer, task: Task, problems: list[Problem], max_new_tokens: int = 0
                  ) -> float:
    """Mean correctness reward of greedy responses (the task's reward, no format part: for exact-
    answer tasks, the accuracy)."""
    eos = tokenizer.token_to_id(EOS)
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False).ids for p in problems]
    responses = generate_with_logprobs(model, prompts, max_new_tokens or task.max_new_tokens, eos_id=eos)[0]
    reward_fn = REWARDS[task.reward]
    return float(np.mean([reward_fn(tokenizer.decode([t for t in r if t != eos]), p)
                          for r, p in zip(responses, problems)]))


# The update ----------------------------------------------------------------------------------

def freeze(updates: nnx.State, top_level: str) -> nnx.State:
    """Zero updates under one top-level module (GRPO leaves the MTP modules as they are: the loss
    never runs them, and AdamW's weight decay alone would otherwise shrink them)."""
    return jax.tree.map_with_path(lambda path, u: jnp.zeros_like(u) if str(path[0].key) == top_level else u, updates)


def make_grpo_fns(config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """(reference_logprobs, update): the frozen reference's log-probs of a batch of rollouts, and one
    optimisation pass of the policy (a TrainState) on it, with the routing-bias update after it."""
    gc = config.grpo
    balancing = Balancing.from_config(config.model, config.train)

    def policy_logprobs(params, routing_bias, tokens_BS):
        out = nnx.merge(graphdef, params, routing_bias)(tokens_BS[:, :-1], with_mtp=False)
        return token_logprobs(out.logits_BTV, tokens_BS[:, 1:], gc.temperature), out.stats

    def reference_logprobs(ref_params, ref_bias, tokens_BS):
        return policy_logprobs(ref_params, ref_bias, tokens_BS)[0]

    def update(state, tokens_BS, mask_BT, old_logp_BT, ref_logp_BT, advantages_B):
        def loss_fn(params):
            logp_BT, stats = policy_logprobs(params, state.routing_bias, tokens_BS)
            parts = grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, advantages_B, mask_BT, gc.epsilon, gc.beta)
            return parts.loss + balancing.loss(stats.moe_layers), (parts, stats)

        (_, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
        params = optax.apply_updates(state.params, freeze(updates, "mtp"))
        routing_bias = update_routing_bias(state.routing_bias, stats, balancing)
        metrics = {"loss": parts.loss, "kl": parts.kl, "clip_fraction": parts.clip_fraction,
                   "grad_norm": grad_norm, "nonfinite_state": nonfinite_weights(params, routing_bias)}
        if stats.moe_layers is not None:
            metrics["max_vio"] = max_violation(stats.moe_layers.expert_load).mean()
        return state.replace(params=params, routing_bias=routing_bias, opt_state=opt_state), metrics

    return jax.jit(reference_logprobs), jax.jit(update, donate_argnums=0)
