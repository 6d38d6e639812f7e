"""The hf-compress command line on a tiny model directory (offline, subprocesses like a user would run)."""

import json
import subprocess
import sys
from importlib import resources

import pytest

from conftest import make_tiny

TEXT = str(resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt"))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("cli") / "dense"
    make_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_compress_info_eval(dense_dir, tmp_path):
    out = tmp_path / "compressed"
    proc = cli("compress", dense_dir, "-o", out, "--method", "svd", "--ratio", "0.3", "--skip", "model.layers.1.*")
    assert proc.returncode == 0, proc.stderr
    assert "compressed 7 layers" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    modules = cfg["base_config"]["quantization_config"]["modules"]
    assert len(modules) == 7 and all(k.startswith("model.layers.0.") for k in modules)
    assert (out / "tokenizer.json").is_file()

    info = cli("info", out)
    assert info.returncode == 0, info.stderr
    assert "model.layers.0.self_attn.q_proj" in info.stdout and "lowrank" in info.stdout
    rank = modules["model.layers.0.self_attn.q_proj"]["rank"]
    assert f"rank {rank}" in info.stdout
    assert "14 linear layers" not in info.stdout and "(7 compressed)" in info.stdout

    res = tmp_path / "ppl.json"
    ev = cli("eval", out, "--text", TEXT, "--seqlen", "64", "--max-tokens", "640", "--json", res)
    assert ev.returncode == 0, ev.stderr
    data = json.loads(res.read_text())
    assert data["windows"] == 10 and data["tokens"] == 630 and data["perplexity"] > 1
    assert f"perplexity {data['perplexity']:.4g}" in ev.stdout


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "ratio must lie strictly between 0 and 1"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--targets", "nothing_here"], "match no module"),
])
def test_bad_arguments_exit_2_with_message(dense_dir, tmp_path, args, message):
    proc = cli("compress", dense_dir, "-o", tmp_path / "x", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x").exists()


def test_missing_model_path(tmp_path):
    proc = cli("eval", tmp_path / "nope", "--text", TEXT)
    assert proc.returncode == 2 and "neither a checkpoint directory" in proc.stderr


def test_compress_calibrated_method(dense_dir, tmp_path):
    out = tmp_path / "svdllm"
    proc = cli("compress", dense_dir, "-o", out, "--method", "svd_llm", "--ratio", "0.4", "--calib", TEXT,
               "--nsamples", "8", "--seqlen", "64", "--alloc", "energy")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())["base_config"]["quantization_config"]
    assert cfg["method"] == "svd_llm" and cfg["alloc"] == "energy"
    assert cfg["calibration"] == {"nsamples": 8, "seqlen": 64, "seed": 0, "batch_size": 8, "source": "tinyshakespeare-excerpt.txt"}
    info = cli("info", out)
    for name, rec in cfg["modules"].items():
        assert name in info.stdout and f"rank {rec['rank']}" in info.stdout


def test_compress_calibrated_without_calib_file(dense_dir, tmp_path):
    proc = cli("compress", dense_dir, "-o", tmp_path / "y", "--method", "asvd", "--ratio", "0.3")
    assert proc.returncode == 2 and "needs calibration data" in proc.stderr and "--calib" in proc.stderr


def test_cli_quantize_gptq_eora_and_info(dense_dir, tmp_path):
    out = tmp_path / "q"
    proc = cli("compress", dense_dir, "-o", out, "--method", "gptq", "--bits", "3", "--group-size", "32",
               "--eora-rank", "4", "--calib", TEXT, "--nsamples", "4", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    modules = json.loads((out / "config.json").read_text())["base_config"]["quantization_config"]["modules"]
    assert len(modules) == 14 and all(r["type"] == "quant" and r["bits"] == 3 and r["rank"] == 4 for r in modules.values())
    info = cli("info", out)
    assert info.returncode == 0, info.stderr
    assert "3-bit g32" in info.stdout and "3b g32 +r4" in info.stdout
    # q_proj 48x48, per row: 3-bit codes (144 bits in 5 words) + 2 groups x (fp16 scale + zero) + its share of the
    # rank-4 fp32 factors (4 x (48 + 48) x 32 bits / 48 rows)
    expected = (5 * 32 + 2 * 32 + 4 * 96 * 32 / 48) / 48
    line = next(ln for ln in info.stdout.splitlines() if ln.startswith("model.layers.0.self_attn.q_proj"))
    assert f"{expected:.3f}" in line


def test_cli_eora_factor_bits(dense_dir, tmp_path):
    out = tmp_path / "qf"
    proc = cli("compress", dense_dir, "-o", out, "--method", "rtn", "--bits", "4", "--group-size", "16",
               "--eora-rank", "4", "--eora-factor-bits", "4", "--eora-factor-group-size", "16")
    assert proc.returncode == 0, proc.stderr
    modules = json.loads((out / "config.json").read_text())["base_config"]["quantization_config"]["modules"]
    assert all(r["factor_bits"] == 4 and r["factor_group_size"] == 16 and r["rank"] == 4 for r in modules.values())
    info = cli("info", out)
    assert "4b g16 +r4@4b" in info.stdout
    # q_proj 48x48, per row: 4-bit codes (6 words) + 3 groups x (scale + zero); per rank component: a Uᵀ row and a
    # V row, each 48 4-bit codes (6 words) + 3 groups x (scale + zero)
    expected = (6 * 32 + 3 * 32) / 48 + 4 * 2 * (6 * 32 + 3 * 32) / (48 * 48)
    line = next(ln for ln in info.stdout.splitlines() if ln.startswith("model.layers.0.self_attn.q_proj"))
    assert f"{expected:.3f}" in line
    bad = cli("compress", dense_dir, "-o", tmp_path / "bad", "--method", "rtn", "--bits", "4", "--eora-factor-bits", "4")
    assert bad.returncode == 2 and "eora_factor_bits" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_rotate_and_activation_aware_grid(dense_dir, tmp_path):
    out = tmp_path / "rot"
    proc = cli("compress", dense_dir, "-o", out, "--method", "gptq", "--bits", "3", "--group-size", "16", "--rotate",
               "hadamard", "--rotate-seed", "3", "--rotate-heads", "--method-kwargs", '{"grid": "mse-act"}', "--calib", TEXT,
               "--nsamples", "8", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())["base_config"]["quantization_config"]
    assert cfg["rotate"] == "hadamard" and cfg["rotate_seed"] == 3 and cfg["rotate_heads"] is True
    assert cfg["method_kwargs"] == {"grid": "mse-act"}
    bad = cli("compress", dense_dir, "-o", tmp_path / "bad", "--method", "rtn", "--bits", "4", "--rotate", "spin")
    assert bad.returncode == 2 and "--rotate" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_lowrank_with_bits(dense_dir, tmp_path):
    out = tmp_path / "lq"
    proc = cli("compress", dense_dir, "-o", out, "--method", "svd", "--ratio", "0.3", "--bits", "4", "--group-size", "16")
    assert proc.returncode == 0, proc.stderr
    info = cli("info", out)
    assert "lowrank_quant" in info.stdout and "4b g16" in info.stdout
    bad = cli("compress", dense_dir, "-o", tmp_path / "bad", "--method", "rtn", "--bits", "5")
    assert bad.returncode == 2 and "bits must be one of" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_finetune_merges_lora_into_low_rank(dense_dir, tmp_path):
    comp = tmp_path / "c"
    assert cli("compress", dense_dir, "-o", comp, "--method", "svd", "--ratio", "0.3").returncode == 0
    ranks = {k: r["rank"] for k, r in
             json.loads((comp / "config.json").read_text())["base_config"]["quantization_config"]["modules"].items()}
    out = tmp_path / "ft"
    proc = cli("finetune", comp, "-o", out, "--text", TEXT, "--steps", "4", "--batch-size", "2", "--seqlen", "32",
               "--lora-rank", "3", "--lr", "1e-3", "--eval-text", TEXT, "--max-tokens", "320")
    assert proc.returncode == 0, proc.stderr
    assert "fine-tuned 4 steps" in proc.stdout and "perplexity" in proc.stdout
    after = json.loads((out / "config.json").read_text())["base_config"]["quantization_config"]["modules"]
    assert {k: r["rank"] for k, r in after.items()} == {k: v + 3 for k, v in ranks.items()}
    assert cli("eval", out, "--text", TEXT, "--seqlen", "32", "--max-tokens", "320").returncode == 0
