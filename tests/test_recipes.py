"""Every recipe on every target that can take it: the package exports, loads in its runtime and follows the fp32
reference; the recipe means the same thing on both (target-free data), and where a target cannot store a weight's
form the manifest says what was stored instead."""

from __future__ import annotations

import numpy as np
import pytest

from mobilize.driver import ExportOptions, export
from mobilize.harness.package import Package
from mobilize.model.numpy_runner import NumpyRunner
from mobilize.quant.plan import unavailable
from mobilize.quant.recipes import RECIPES
from mobilize.targets.registry import TARGETS, target

PROMPT = [3, 17, 99, 5, 64, 1, 42, 7]
CASES = [(r, f) for r in RECIPES for f in TARGETS]


@pytest.mark.parametrize(("recipe", "fmt"), CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_every_recipe_where_its_target_can_store_it(recipe, fmt, tiny_hf, tmp_path):
    why = unavailable(RECIPES[recipe], target(fmt).caps)
    source = tiny_hf("gemma3")  # a tied head: the shared-table forms too
    opts = ExportOptions(str(source), tmp_path / "p", quant=recipe, format=fmt, target="host", max_seq_len=32)
    if why is not None:
        from mobilize.errors import MobilizeError

        with pytest.raises(MobilizeError, match="has no .* form"):
            export(opts)
        assert not (tmp_path / "p").exists()
        return
    pkg = Package.open(export(opts))
    assert pkg.manifest.recipe.name == recipe and pkg.manifest.format == fmt
    got = pkg.runner().prefill(PROMPT)[-1]
    want = NumpyRunner.for_source(str(source), []).prefill(PROMPT)[-1]
    # random tiny weights in 4 bits: the logits follow the reference's shape, not its values
    assert np.corrcoef(got, want)[0, 1] > (0.999 if recipe in ("fp32", "int8") else 0.9)
    if recipe == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
