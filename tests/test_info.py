import json
import subprocess
import sys


from dsv3_jax.config import get_preset
from dsv3_jax.info import model_info


def test_deepseek_v3_numbers_match_the_report():
    info = model_info(get_preset("deepseek-v3-671b").model)
    assert round(info["total_params"] / 1e9, 1) == 671.0
    assert 36.6e9 <= info["activated_params_no_embedding"] <= info["activated_params"] <= 37.6e9
    assert info["kv_cache_bytes_per_token"] == 70_272 == 61 * (512 + 64) * 2


def test_deepseek_v3_mtp_size_by_hand():
    """The MTP module's own weights, counted from the published tensor shapes (d = 7168).

    DeepSeek's README_WEIGHTS quotes "11.5B unique parameters" for the MTP module: that is its
    transformer block alone (11.507B). The module also owns eh_proj (2d x d = 0.103B) and three
    norms, 11.610B in all, which is what `mtp_params` counts. With the stored copies of the
    embedding and head (0.927B each) the checkpoint holds 671.03 + 13.46 = 684.49B ("685B")."""
    d, q_rank, kv_rank, heads, nope, rope, v, experts, ffn = 7168, 1536, 512, 128, 128, 64, 128, 256, 2048
    attention = (d * q_rank + q_rank + q_rank * heads * (nope + rope) + d * (kv_rank + rope) + kv_rank
                 + kv_rank * heads * (nope + v) + heads * v * d)
    moe = (experts + 1) * 3 * d * ffn + experts * d + experts  # routed + 1 shared expert, router + bias
    block = attention + moe + 2 * d  # + the two pre-norms
    assert round(block / 1e9, 1) == 11.5  # the published figure
    own = block + 2 * d * d + 3 * d  # + eh_proj, enorm, hnorm, shared_head.norm
    info = model_info(get_preset("deepseek-v3-671b").model)
    assert info["mtp_params"] == own - experts == 11_610_067_968  # the routing bias is state, not a parameter
    vocab_copies = 2 * 129_280 * d
    # The checkpoint: 684.49B weights (+ ~0.04B FP8 block scales), the model card's "685B".
    assert 684.4e9 < info["total_params"] + own + vocab_copies < 685e9


def test_deepseek_v2_lite_numbers():
    info = model_info(get_preset("deepseek-v2-lite").model)
    assert round(info["total_params"] / 1e9, 1) == 15.7
    # DeepSeek quotes "2.4B activated" (2.45B here without the input embedding, 2.66B with it).
    assert 2.35e9 <= info["activated_params_no_embedding"] <= 2.5e9
    assert info["mtp_params"] == 0
    assert info["kv_cache_bytes_per_token"] == 27 * (512 + 64) * 2


def test_cli_info_json_and_bad_preset():
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "info", "--preset", "deepseek-v3-671b", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert {"total_params", "activated_params", "mtp_params", "kv_cache_bytes_per_token",
            "flops_per_token"} <= set(data)
    bad = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "info", "--preset", "huge"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown preset 'huge'" in bad.stderr
