"""Bridges to the rest of the ecosystem (PEFT, Hub), installed as ``hf_compress.integrations``."""
