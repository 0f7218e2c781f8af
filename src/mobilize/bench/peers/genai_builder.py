"""The peer: ONNX Runtime GenAI's own model builder (`onnxruntime_genai.models.builder`), run on the same
checkpoint as mobilize, in a child process whose wall time and peak RSS are measured.

The builder reads a Hugging Face directory, so the GGUF is first written out as one by transformers
(dequantized to fp32, which is what the builder would read from the hub's bf16 weights, widened).
With transformers 5 the builder (0.18) stops on Gemma 3's nested `rope_parameters` (KeyError
'rope_type'): transformers re-nests whatever config.json says, so the builder runs under a small
wrapper that hands it the config in the flat form it reads (`rope_parameters` = {rope_type default,
rope_theta}, `rope_local_base_freq`): the same rotary bases, stated the old way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FLAT_ROPE_NOTE = (
    "genai builder: config.json given flat rope_theta / rope_local_base_freq (transformers 5's nested "
    "rope_parameters stops builder 0.18 with KeyError 'rope_type')"
)


_FLAT_ROPE_WRAPPER = """
import runpy, sys
import transformers
_load = transformers.AutoConfig.from_pretrained

def flat(*args, **kwargs):
    cfg = _load(*args, **kwargs)
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:
        cfg.rope_local_base_freq = params["sliding_attention"]["rope_theta"]
        cfg.rope_theta = params["full_attention"]["rope_theta"]
        cfg.rope_parameters = dict(params["full_attention"])
    return cfg

transformers.AutoConfig.from_pretrained = flat
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def hf_dir_from_gguf(gguf: Path, out: Path) -> Path:
    """transformers' own GGUF loader -> save_pretrained (fp32 safetensors + tokenizer), done once."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the loader marks GGUF models as quantized (not saveable)
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def build(hf_dir: Path, out: Path, cache: Path, precision: str = "int4", threads: int | None = None) -> dict:
    """Run the builder (cpu, `precision`) into `out`; return its wall time and peak RSS."""
    cmd = [
        sys.executable, "-c", _FLAT_ROPE_WRAPPER,
        "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache),
    ]  # fmt: skip
    return timed_child(cmd)


def timed_child(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (bytes) of a child process, measured by a wrapper around only it."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': r.returncode, 'wall_s': wall, 'peak_rss_bytes': rss, 'stderr': r.stderr[-2000:]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed: {result['stderr']}")
    return result
