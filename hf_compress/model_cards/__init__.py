"""Model-card templates (installed as ``hf_compress.model_cards``), rendered by `hf_compress.hub`."""
