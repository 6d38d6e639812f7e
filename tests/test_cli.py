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
