"""The peer: PyTorch eager (transformers, fp32) on the same checkpoint, behind the Runner protocol: the
reference runner itself, timed by the same harness as every other runtime."""

from __future__ import annotations

from pathlib import Path


def pytorch_eager_runner(source: str | Path, threads: int = 2):
    import torch

    from mobilize.harness.reference import ReferenceRunner

    torch.set_num_threads(threads)
    return ReferenceRunner.for_path(source)
