"""The real LoRA adapter (bench/adapters/gemma3-270m-skerrow, `train_lora`) through both ways to the phone, on the
bundled Gemma 3 270M in `int4`, measured on Skerrow bulletins it was not trained on (seed 1):

- merged: `export --lora` (one package for the fine-tune); its perplexity against PEFT's (transformers + peft on
  the same GGUF) and against the base package's;
- slots: `export --lora-slots 16` (rank 8 padded), the adapter converted by `mobilize adapter`: perplexity with it
  and without it on one loaded session, greedy text against the merged package's, decode with the adapter against
  the base package's (interleaved rounds, medians);
- ONNX Runtime GenAI's `Adapters` on the slots package: its greedy tokens against mobilize's runner (ONNX).

    python -m mobilize.bench.lora_real [--format onnx|tflite] [--out bench/results/gemma3-270m-lora[-tflite].json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mobilize.bench.lora_domain import EVAL_SEED, bulletins
from mobilize.bench.train_lora import DEFAULT_OUT as ADAPTER
from mobilize.targets.registry import runtime

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "Bulletin 1207 of the Skerrow Isles Coastwatch, issued at 0600 on the"


def _cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "mobilize.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"mobilize {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=("onnx", "tflite"), default="onnx")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--bulletins", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=24, help="unseen bulletins whose openings prompt both packages")
    args = ap.parse_args()
    tail = "" if args.format == "onnx" else f"-{args.format}"
    args.out = args.out or ROOT / "bench" / "results" / f"gemma3-270m-lora{tail}.json"
    work = args.workdir or ROOT / "out" / f"lora-bench{tail}"
    work.mkdir(parents=True, exist_ok=True)
    text = work / "skerrow-eval.txt"
    text.write_text(bulletins(EVAL_SEED, args.bulletins))
    common = ["-t", "android", "-q", "int4", "-f", args.format, "--overwrite"]
    t0 = time.perf_counter()
    base, merged, slots = work / "base", work / "merged", work / "slots"
    _cli("export", "gemma3-270m", "-o", base, *common)
    _cli("export", "gemma3-270m", "-o", merged, "--lora", ADAPTER, *common)
    _cli("export", "gemma3-270m", "-o", slots, "--lora-slots", 16, "--lora-targets", "q,v", *common)
    adapter_file = work / f"skerrow{runtime(args.format).adapter_file().SUFFIX}"
    _cli("adapter", ADAPTER, "--package", slots, "-o", adapter_file, "--overwrite")
    exported = time.perf_counter() - t0

    def ev(pkg, *extra):
        return json.loads(_cli("eval", pkg, "--text", text, "--json", "--chunk", 256, *extra))

    figures = {
        "base": ev(base),
        "merged_vs_peft": ev(merged, "--reference", "transformers"),  # transformers + peft on the GGUF
        "merged_vs_numpy": ev(merged),
        "slots_without_adapter": ev(slots),
        "slots_with_adapter": ev(slots, "--adapter", adapter_file),
    }
    keys = ("tokens", "perplexity", "reference_perplexity", "perplexity_increase", "top1_agreement", "mean_kl")
    figures = {k: {f: v[f] for f in keys} for k, v in figures.items()}

    from mobilize.harness.package import Package, stream_greedy

    merged_text = "".join(stream_greedy(Package.open(merged), PROMPT, 32))
    slot_pkg = Package.open(slots)
    runner = slot_pkg.runner(0, [adapter_file])
    slots_text = "".join(stream_greedy(slot_pkg, PROMPT, 32, runner=runner))
    runner.activate(None)
    base_text = "".join(stream_greedy(slot_pkg, PROMPT, 32, runner=runner))
    agreement = _agreement(Package.open(merged), slot_pkg, runner, args.prompts)
    genai_same = _genai_matches(slots, adapter_file, runner) if args.format == "onnx" else None
    decode = _decode_rounds(base, slots, adapter_file, args.rounds)
    result = {
        "command": f"python -m mobilize.bench.lora_real --format {args.format}",
        "date": time.strftime("%Y-%m-%d"),
        "adapter": str(ADAPTER.relative_to(ROOT)),
        "eval_text": {"bulletins": args.bulletins, "seed": EVAL_SEED, "tokens": figures["base"]["tokens"]},
        "export_s": round(exported, 1),
        "perplexity": figures,
        "greedy_32": {
            "prompt": PROMPT,
            "merged": merged_text,
            "slots_with_adapter": slots_text,
            "slots_without_adapter": base_text,
            "merged_equals_slots": merged_text == slots_text,
        },  # fmt: skip
        "greedy_32_many_prompts": agreement,
        "genai_adapters_match_runner": genai_same,
        "decode": decode,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _agreement(merged, slot_pkg, runner, n: int) -> dict:
    """Greedy 32 tokens of the merged package and of the slots package with the adapter, from the openings of `n`
    unseen bulletins (cut before the day, or after the first line: each next token a choice the domain's grammar
    makes at random). Where the two part: the fp32 reference's (the adapter merged) margin between their two tokens,
    teacher-forced on the common prefix."""
    from mobilize.frontend.loader import load_model, open_checkpoint
    from mobilize.frontend.lora import apply_adapters
    from mobilize.harness.runner import greedy
    from mobilize.model.numpy_runner import NumpyRunner

    tok = slot_pkg.tokenizer()
    reference = NumpyRunner(apply_adapters(load_model(open_checkpoint("gemma3-270m")), [ADAPTER])[0])
    mine = merged.runner()
    runner.activate(next(iter(runner.adapters)))
    cases = []
    for i, b in enumerate(bulletins(EVAL_SEED, n).split("\n\n")[:n]):
        opening = b[: b.index(" on the") + len(" on the")] if i % 2 == 0 else b.split("\n")[0] + "\n"
        ids = tok.encode(opening).ids
        a, m = greedy(runner, ids, 32), greedy(mine, ids, 32)
        case = {"prompt": opening, "equal": a == m}
        if a != m:
            at = next(j for j in range(32) if a[j] != m[j])
            logits = reference.prefill(ids + a[:at])[-1]
            case |= {"parts_at": at, "slots": tok.decode([a[at]]), "merged": tok.decode([m[at]]),
                     "reference_margin": round(float(abs(logits[a[at]] - logits[m[at]])), 3),
                     "reference_top1": tok.decode([int(np.argmax(logits))])}  # fmt: skip
        cases.append(case)
    equal = sum(c["equal"] for c in cases)
    margins = [c["reference_margin"] for c in cases if not c["equal"]]
    return {"prompts": len(cases), "equal_for_32_tokens": equal, "largest_reference_margin_where_they_part":
            max(margins, default=None), "cases": cases}  # fmt: skip


def _decode_rounds(base: Path, slots: Path, adapter_file: Path, rounds: int) -> dict:
    """Decode tok/s of the base package (no slots) and of the slots package with the adapter active, one bench each
    per round, interleaved; medians. (A slots package without an adapter runs its zero branches: its own base is no
    baseline for what the slots cost.)"""
    import statistics

    def tok_s(pkg: Path, *extra) -> float:
        out = json.loads(_cli("bench", pkg, "--json", "--repeats", 1, "--prompt-len", 128, "--gen-len", 64, *extra))
        return out["with_adapter"]["decode_tok_s"] if extra else out["decode_tokens_per_s"]

    runs: dict[str, list[float]] = {"base_package": [], "slots_with_adapter": []}
    for _ in range(rounds):
        runs["base_package"].append(round(tok_s(base), 1))
        runs["slots_with_adapter"].append(round(tok_s(slots, "--adapter", adapter_file), 1))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"rounds": rounds, "rank": 16, "threads": "the package's (2 on this machine)", "tok_s": runs,
            "medians": medians, "ratio": round(medians["slots_with_adapter"] / medians["base_package"], 3)}  # fmt: skip


def _genai_matches(package: Path, adapter_file: Path, runner) -> dict:
    """ONNX Runtime GenAI with the adapter active (og.Adapters): 16 greedy tokens against mobilize's runner."""
    import onnxruntime_genai as og

    model = og.Model(str(package))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "skerrow")
    from mobilize.harness.package import Package

    prompt = Package.open(package).tokenizer().encode(PROMPT).ids
    params = og.GeneratorParams(model)
    max_length = json.loads((package / "genai_config.json").read_text())["search"]["max_length"]
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_active_adapter(adapters, "skerrow")
    gen.append_tokens(prompt)
    genai = []
    while len(genai) < 16:
        gen.generate_next_token()
        genai.append(int(gen.get_next_tokens()[0]))
    runner.activate("skerrow")
    ours = [int(runner.prefill(prompt)[-1].argmax())]
    while len(ours) < 16:
        ours.append(int(runner.decode(ours[-1]).argmax()))
    return {"tokens": 16, "equal": genai == ours}


if __name__ == "__main__":
    main()
