"""Resumable compression: a run killed after some blocks continues with --resume and gives the uninterrupted
run's checkpoint bit for bit; nothing half-written ever sits under the output's name."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_compress
from conftest import _decoder_kwargs, resident_pages
from hf_compress import resume
from hf_compress.errors import ConfigError
from hf_compress.kernels.cpu import paging

TEXT = str(resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt"))


@pytest.fixture(scope="module")
def dense4(tmp_path_factory, tiny_tokenizer):
    """A 4-block tiny Llama with its tokenizer, saved."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resume") / "dense4"
    LlamaForCausalLM(LlamaConfig(**{**_decoder_kwargs(), "num_hidden_layers": 4})).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *map(str, argv)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})


def _done(partial) -> int:
    try:
        return json.loads((partial / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


# A CLI run that stalls in block 2 once blocks 0 and 1 are committed: the test kills it there (SIGKILL, as an
# OOM kill or power loss would), in the middle of block 2's work.
STALLING = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import hf_compress.loading as loading
    from hf_compress.cli import main
    partial = Path(sys.argv[1])
    real = loading.load_model
    def load_model(*a, **k):
        model, tok = real(*a, **k)
        def stall(module, args):
            state = partial / "state.json"
            if state.is_file() and json.loads(state.read_text())["done"] >= 2:
                time.sleep(600)
        model.model.layers[2].register_forward_pre_hook(stall)
        return model, tok
    loading.load_model = load_model
    sys.exit(main(sys.argv[2:]))
""")


def kill_stalled_run(partial, dense4, out, common) -> None:
    """Start ``hf-compress compress`` stalled inside block 2 (`STALLING`), wait until its checkpoint folder
    ``partial`` holds 2 finished blocks, assert it is still running, and SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", STALLING, partial, "compress", dense4, "-o", out, *common],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while _done(partial) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert child.poll() is None  # still running: stalled inside block 2
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def resumed_equals_full_run(dense4, tmp_path, common) -> tuple[str, dict, dict]:
    """Compress ``dense4`` with the CLI options ``common`` once in full, and once killed inside block 2
    (`kill_stalled_run`) then resumed; assert both succeed and write the same tensors bit for bit. Returns (the full
    run's stdout, the killed run's state.json, the tensors)."""
    full = _cli("compress", dense4, "-o", tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    kill_stalled_run(partial, dense4, out, common)
    assert _done(partial) == 2
    state = json.loads((partial / "state.json").read_text())
    resumed = _cli("compress", dense4, "-o", out, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return full.stdout, state, a

def test_killed_run_resumes_bit_identical(dense4, tmp_path):
    """svd_llm: both calibration streams (dense and compressed), the rank plan and the per-layer β come back."""
    common = ["--method", "svd_llm", "--ratio", "0.3", "--calib", TEXT, "--nsamples", "8", "--seqlen", "32", "--checkpoint-every", "0"]
    full = _cli("compress", dense4, "-o", tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    kill_stalled_run(partial, dense4, out, common)
    assert not out.exists()  # no half-written output under the final name
    assert _done(partial) == 2 and (partial / "unit-00001.safetensors").is_file()

    again = _cli("compress", dense4, "-o", out, *common)  # without --resume: refuses, names the way out
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = _cli("-v", "compress", dense4, "-o", out, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log = resumed.stderr
    assert "2/4 blocks already compressed" in log and "block 3/4 done" in log and "ETA" in log
    assert not partial.exists()  # removed once the checkpoint is saved
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((d / "config.json").read_text())["base_config"] for d in (tmp_path / "full", out)]
    assert configs[0]["quantization_config"]["modules"] == configs[1]["quantization_config"]["modules"]


def test_data_free_resume_and_settings_mismatch(dense4, tmp_path):
    """In-process API: a data-free run resumed from its checkpoint folder equals a fresh run; a folder left by
    other settings is refused with the differing setting named."""
    from transformers import AutoModelForCausalLM

    cfg = {"method": "rtn", "bits": 4, "group_size": 16}
    ref = hf_compress.compress(AutoModelForCausalLM.from_pretrained(dense4), dict(cfg), progress=False)
    ckpt = tmp_path / "ckpt"
    hf_compress.compress(AutoModelForCausalLM.from_pretrained(dense4), dict(cfg), progress=False,
                         checkpoint_dir=ckpt, checkpoint_every=0)
    state = json.loads((ckpt / "state.json").read_text())
    state["done"] = 2  # as if killed after block 1: blocks 2, 3 are redone
    (ckpt / "state.json").write_text(json.dumps(state))
    resumed = hf_compress.compress(AutoModelForCausalLM.from_pretrained(dense4), dict(cfg), progress=False,
                                   checkpoint_dir=ckpt)
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="config.bits"):
        hf_compress.compress(AutoModelForCausalLM.from_pretrained(dense4), {**cfg, "bits": 3}, progress=False,
                             checkpoint_dir=ckpt)


def test_cli_disk_offload_gives_the_in_memory_checkpoint(dense4, tmp_path):
    """--device-map/--max-memory/--offload-folder: every block on disk, read block by block, same checkpoint."""
    common = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--calib", TEXT, "--nsamples", "4",
              "--seqlen", "32"]
    mem = _cli("compress", dense4, "-o", tmp_path / "mem", *common)
    assert mem.returncode == 0, mem.stderr
    # every block on disk; embeddings, norm and head on the CPU (accelerate < 1.15 refuses a model wholly on disk)
    blocks_on_disk = json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                                 "model.norm": "cpu", "lm_head": "cpu"})
    off = _cli("compress", dense4, "-o", tmp_path / "off", *common, "--device-map", blocks_on_disk,
               "--offload-folder", tmp_path / "offload")
    assert off.returncode == 0, off.stderr
    assert re.search(r"placement \(modules per device\): .*disk: 1", off.stdout)  # the blocks really stayed on disk
    assert "peak RSS" in off.stdout  # the summary line
    assert re.search(r"RSS now \d+ MiB, peak while loading \d+ MiB", off.stdout)  # then the peak restarts
    assert re.search(r"saved .*; peak RSS \d+ MiB, now \d+ MiB of which \d+ MiB file pages", off.stdout)
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = _cli("compress", dense4, "-o", tmp_path / "bad", *common, "--offload-folder", tmp_path / "x")
    assert bad.returncode == 2 and "need --device-map" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="reads Linux's /proc/self/maps and pagemap")
@pytest.mark.parametrize("cfg,folder", [({"method": "svd", "ratio": 0.4}, "given"),
                                        ({"method": "asvd", "ratio": 0.4, "calibration": {"nsamples": 8, "seqlen": 32}},
                                         "given"),
                                        ({"method": "svd", "ratio": 0.4}, "none")],
                         ids=["data-free", "calibrated", "no-checkpoint-dir"])
def test_offloaded_blocks_leave_ram_once_checkpointed(tmp_path, cfg, folder):
    """With every block on disk (accelerate offload), a finished block's compressed layers are read from their
    unit file in the checkpoint folder, memory-mapped and not resident, instead of staying in RAM until the save;
    the model is the one an in-memory run gives, bit for bit, and saves and reloads the same after the folder is
    deleted (as the CLI deletes it). Without a checkpoint folder the same happens through a scratch folder made
    in accelerate's offload folder (found through its hook: `resume.offload_folder`) and deleted at the end."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kw = {**_decoder_kwargs(3), "hidden_size": 256, "intermediate_size": 512}  # factors of many pages
    LlamaForCausalLM(LlamaConfig(**kw)).save_pretrained(tmp_path / "dense")
    ids = torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    calib = ids if "calibration" in cfg else None
    ref = hf_compress.compress(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), dict(cfg),
                               calibration=calib, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                  "model.norm": "cpu", "lm_head": "cpu"}
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                               offload_folder=str(tmp_path / "offload"))
    ckpt = tmp_path / "ckpt"
    if folder == "given":
        hf_compress.compress(off, dict(cfg), calibration=calib, progress=False, checkpoint_dir=ckpt)
    else:
        assert resume.offload_folder(off) == str(tmp_path / "offload")
        hf_compress.compress(off, dict(cfg), calibration=calib, progress=False)
        assert os.listdir(tmp_path / "offload") == []  # the scratch folder is gone
    layers = {n: m for n, m in off.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert {n.split(".")[2] for n in layers} == {"0", "1", "2"}  # compressed layers in every block
    for name, m in layers.items():
        unit = f"unit-{int(name.split('.')[2]):05d}.safetensors"
        for t in (m.U, m.V):  # not in the heap
            path = paging.mapped_file(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), deleted=True)
            if folder == "given":
                assert path == str(ckpt / unit), name
            else:
                assert re.fullmatch(re.escape(str(tmp_path / "offload")) + r"/\.hf-compress-blocks-\w+/"
                                    + re.escape(unit) + r" \(deleted\)", path or ""), (name, path)
        assert resident_pages(m.U)[0] + resident_pages(m.V)[0] == 0, f"{name}: its pages are resident"
    for name, m in layers.items():  # (the rest of an offloaded block, its norms, is on `meta` in the state dict)
        a, b = ref.get_submodule(name).state_dict(), m.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    x = ids[:2, :10]
    want = ref(input_ids=x).logits
    assert torch.equal(off(input_ids=x).logits, want)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    hf_compress.save_pretrained(off, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(again(input_ids=x).logits, want)
