"""Recovery fine-tuning: heal a compressed model with LoRA on its compressed layers, then merge exactly.

The SVD-LLM and ASVD papers recover much of the perplexity lost to compression this way. Training goes through
`transformers.Trainer`; the adapters are merged without densifying (`hf_compress.integrations.peft`), so the
result is again an hf-compress checkpoint (low-rank layers gain the adapter's rank).
"""

from __future__ import annotations

import logging
import math

from torch import nn

from .calibration import calibration_windows
from .errors import ConfigError

logger = logging.getLogger(__name__)


def recover(model: nn.Module, tokenizer, text, *, steps: int = 200, rank: int = 16, alpha: float | None = None,
            lr: float = 2e-4, seqlen: int = 512, batch_size: int = 4, seed: int = 0, output_dir: str | None = None,
            gradient_checkpointing: bool = True, merge: bool = True, progress: bool = True,
            target_modules: list[str] | None = None):
    """LoRA-fine-tune ``model``'s compressed layers on ``text`` (file path, list of strings, ``datasets.Dataset`` or
    token ids) for ``steps`` optimizer steps of ``batch_size`` random ``seqlen``-token windows (seeded), then merge.

    ``target_modules`` (LoRA's patterns) defaults to every compressed layer; pass it to adapt other layers too, or
    to fine-tune a dense model the same way (the reference that ``benchmarks/finetune.py`` measures against).

    Returns ``(model, losses)``: the merged model (or the PEFT model with ``merge=False``) and the logged
    training losses."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from .integrations.peft import prepare_for_training, target_module_names
    from .modules import QuantLowRankLinear, compressed_modules

    if steps < 1 or rank < 1 or batch_size < 1:
        raise ConfigError(f"steps, rank and batch_size must be positive (got {steps}, {rank}, {batch_size})")
    layers = compressed_modules(model)
    if not layers and not target_modules:
        raise ConfigError("The model has no hf-compress layers to fine-tune; compress it first (or name "
                          "target_modules).")
    if merge and any(isinstance(m, QuantLowRankLinear) for m in layers.values()):
        raise ConfigError("Low-rank layers with quantized factors cannot absorb an adapter exactly; fine-tune with "
                          "merge=False (CLI: --adapter-only) and load the adapter with PEFT.")
    windows = calibration_windows(text, tokenizer, steps * batch_size, seqlen, seed)
    data = [{"input_ids": w, "labels": w} for w in windows]  # any sized sequence of examples works for Trainer
    was_training = model.training
    prepare_for_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=target_modules or target_module_names(model), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
            logging_steps=max(1, steps // 20), report_to=[], save_strategy="no", seed=seed,
            disable_tqdm=not progress, dataloader_pin_memory=False)
        trainer = Trainer(model=peft_model, args=args, train_dataset=data)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not all(math.isfinite(x) for x in losses):
        raise ConfigError(f"Training diverged (losses {losses}); lower the learning rate.")
    model.train(was_training)
    if not merge:
        return peft_model, losses
    merged = peft_model.merge_and_unload()
    if hasattr(merged, "activation_checkpointing_disable"):
        merged.activation_checkpointing_disable()
    merged.eval()
    return merged, losses
