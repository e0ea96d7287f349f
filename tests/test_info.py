import json
import subprocess
import sys


from dsv3_jax.config import get_preset
from dsv3_jax.info import model_info


def test_deepseek_v3_numbers_match_the_report():
    info = model_info(get_preset("deepseek-v3-671b").model)
    assert round(info["total_params"] / 1e9, 1) == 671.0
    assert 36.6e9 <= info["activated_params_no_embedding"] <= info["activated_params"] <= 37.6e9
    assert round(info["mtp_params"] / 1e9, 1) == 11.6
    assert info["kv_cache_bytes_per_token"] == 70_272 == 61 * (512 + 64) * 2


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
