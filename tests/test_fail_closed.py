"""A compressed checkpoint never loads as random weights: without the plugin, loading stops."""

import pytest

import hf_compress

from conftest import make_tiny, run_python


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("failclosed") / "ckpt"
    model = make_tiny("llama")
    hf_compress.compress(model, {"method": "svd", "ratio": 0.3}, progress=False)
    hf_compress.save_pretrained(model, path)
    return path


def test_without_import_loading_raises(checkpoint):
    proc = run_python(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        except Exception as e:
            assert "hf_compress" not in sys.modules
            print("ERROR:", type(e).__name__, e)
            sys.exit(3)
        print("LOADED")
    """, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "custom code" in proc.stdout and "trust_remote_code=True" in proc.stdout


def test_without_import_autoconfig_raises(checkpoint):
    proc = run_python(f"""
        from transformers import AutoConfig
        AutoConfig.from_pretrained({str(checkpoint)!r})
    """, check=False)
    assert proc.returncode != 0 and "trust_remote_code" in proc.stderr


def test_trust_remote_code_loads_without_explicit_import(checkpoint):
    ref_path = checkpoint.parent / "ref.safetensors"
    run_python(f"""
        import torch, hf_compress
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        ids = torch.arange(3, 15)[None]
        save_file({{"logits": m(input_ids=ids).logits.detach().contiguous()}}, {str(ref_path)!r})
    """)
    proc = run_python(f"""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        assert "hf_compress" not in sys.modules
        m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(m).__name__ == "LlamaForCausalLM"
        assert type(m.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"
        ids = torch.arange(3, 15)[None]
        diff = (m(input_ids=ids).logits - load_file({str(ref_path)!r})["logits"]).abs().max().item()
        print("DIFF", diff)
        assert diff <= 1e-5
    """)
    assert "DIFF" in proc.stdout


def test_trust_remote_code_without_the_package_says_install(checkpoint):
    # Simulate an environment without hf-compress installed: the import of the shim must fail with
    # transformers' "requires the following packages ... pip install hf_compress".
    proc = run_python(f"""
        import sys

        class NotInstalled:  # behaves as if the hf-compress distribution were absent
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hf_compress":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
    """, check=False)
    assert proc.returncode != 0
    assert "hf_compress" in proc.stderr and "pip install" in proc.stderr


def test_native_class_with_plugin_loads_compressed(checkpoint):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint)
    assert isinstance(model.model.layers[0].self_attn.q_proj, hf_compress.LowRankLinear)
