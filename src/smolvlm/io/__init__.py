"""Model files in and out.

    hf_config.py   Hugging Face config.json <-> VLMConfig, tensor names <-> ours
    checkpoint.py  load / save / resolve: checkpoint folders, hub ids, packaged models, safetensors
    gguf.py        Llama-family GGUF files (e.g. SmolLM2) read without transformers
    assemble.py    a VLM from a SigLIP encoder and a Llama / SmolLM2 decoder
"""

from smolvlm.io.assemble import assemble
from smolvlm.io.checkpoint import load, resolve, save

__all__ = ["assemble", "load", "resolve", "save"]
