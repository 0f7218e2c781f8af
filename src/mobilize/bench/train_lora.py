"""Train the real LoRA adapter mobilize tests and benchmarks with: peft on the bundled Gemma 3 270M (transformers
reading the GGUF, fp32 on CPU), rank 8 on q_proj and v_proj, on the Skerrow Isles bulletins of
`lora_domain` (seed 0). A few minutes on two cores; the adapter is committed in bench/adapters/, and this script
rebuilds it (deterministic for a given torch build and thread count).

    python -m mobilize.bench.train_lora [--out bench/adapters/gemma3-270m-skerrow] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mobilize.bench.lora_domain import TRAIN_SEED, bulletins

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = ROOT / "bench" / "adapters" / "gemma3-270m-skerrow"
RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from mobilize.frontend.loader import open_checkpoint
    from mobilize.frontend.sources import aliases
    from mobilize.frontend.tokenizer import ensure_tokenizer_json

    torch.manual_seed(0)
    torch.set_num_threads(2)
    gguf = aliases.bundled_gguf()
    tok = Tokenizer.from_file(str(ensure_tokenizer_json(open_checkpoint(aliases.BUNDLED))))
    ids = tok.encode(bulletins(TRAIN_SEED, 80), add_special_tokens=False).ids
    bos = tok.token_to_id("<bos>")
    chunks = [[bos] + ids[i : i + args.seq - 1] for i in range(0, len(ids) - args.seq, args.seq - 1)]
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(model, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    log, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = torch.tensor([chunks[step % len(chunks)]])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        log.append(round(float(loss), 4))
        print(f"step {step + 1}/{args.steps} loss {log[-1]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.save_pretrained(str(args.out))
    config_path = args.out / "adapter_config.json"
    conf = json.loads(config_path.read_text())
    conf["base_model_name_or_path"] = "gemma3-270m"  # the alias, not this machine's cache path
    config_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (args.out / "README.md").write_text(
        f"# gemma3-270m-skerrow\n\nA LoRA adapter (rank {RANK}, alpha {ALPHA}, {', '.join(TARGETS)}) for the bundled "
        "Gemma 3 270M, trained by `python -m mobilize.bench.train_lora` on the Skerrow Isles coastal bulletins "
        f"(`mobilize.bench.lora_domain`, seed {TRAIN_SEED}): {len(chunks)} chunks of {args.seq} tokens, "
        f"{args.steps} steps of AdamW at lr {args.lr}. Loss {log[0]:.2f} -> {log[-1]:.2f}.\n"
    )
    for f in args.out.iterdir():
        f.chmod(0o644)  # (safetensors writes its file private)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s; chunks {len(chunks)}, tokens {len(ids)}")


if __name__ == "__main__":
    main()
