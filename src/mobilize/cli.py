"""The `mobilize` command line. It only parses arguments and calls the driver; every error a user
can cause becomes one line on stderr and exit code 1."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from mobilize.errors import MobilizeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile open LLM checkpoints into packages for phones.",
)
console = Console(stderr=True)

MAX_THREADS = 256
DEVICE_HELP = "Run it on another machine: ssh:HOST, adb:SERIAL or local (pushed, run there, the result pulled)."
THREADS_HELP = "Intra-op threads (0: the package's own: its device's big cores)."
SOURCE_HELP = "An alias (gemma3-270m, llama-7b, ...), a Hugging Face model directory, or a .gguf file."


@app.command()
def inspect(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    random_weights: bool = typer.Option(False, "--random-weights", help="Synthetic weights of the real shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Family, sizes, parameter count, tensor types and bytes on disk of a checkpoint."""
    from mobilize.frontend.inspect_source import inspect_source

    with console.status("reading checkpoint"):
        info = inspect_source(source, random_weights)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    rows = [
        ("source", f"{info['source']} ({info['format']})"),
        ("family", info["family"]),
        (
            "layers",
            f"{info['layers']}"
            + (
                f" ({info['sliding_window_layers']} sliding-window, window {info['sliding_window']})"
                if info["sliding_window_layers"]
                else ""
            ),
        ),
        ("hidden / intermediate", f"{info['hidden_size']} / {info['intermediate_size']}"),
        ("heads / kv heads / head dim", f"{info['heads']} / {info['kv_heads']} / {info['head_dim']}"),
        ("vocab", f"{info['vocab_size']}" + (" (tied head)" if info["tied_embeddings"] else "")),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"),
        ("tensors", f"{info['tensors']}: " + ", ".join(f"{k} x{v}" for k, v in info["tensor_dtypes"].items())),
        ("bytes on disk", f"{info['bytes_on_disk']:,}"),
    ]
    for key, value in rows:
        print(f"{key:<28} {value}")


@app.command()
def export(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(
        None, "--out", "-o", help="Package directory (default: out/<name>-<target>-<format>-<quant>)."
    ),
    random_weights: bool = typer.Option(False, "--random-weights", help="Synthetic weights of the real shapes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing package."),
    target: str = typer.Option("android", "--target", "-t", help="Preset: android, ios, host."),
    fmt: str = typer.Option(None, "--format", "-f", help="Package format: onnx or tflite (default: the target's)."),
    quant: str = typer.Option(
        None, "--quant", "-q", help="Recipe (default: the target's): fp32, int8, int4, int4-fast, int4-all, ..."
    ),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="KV cache length (default: the target's)."),
    opset: str = typer.Option("ort", "--opset", help="ort: ONNX Runtime fused ops; std: standard opset-23 ops."),
    bundle: str = typer.Option(None, "--bundle", help="tflite: also write a LiteRT-LM bundle (litertlm)."),
    logits: str = typer.Option(
        "last", "--logits", help="onnx: logits of the last position only (generation), or of all (scoring)."
    ),
    prefill_len: list[int] = typer.Option(
        [32, 128], "--prefill-len", help="tflite: a prefill_<L> signature for each (repeat the flag)."
    ),
    kv_dtype: str = typer.Option(
        None, "--kv-dtype", help="KV cache: float32 or float16 (default: the preset's plan for its device)."
    ),
    ignore_fit: bool = typer.Option(
        False, "--ignore-fit", help="Write the package even if it would not fit the preset's device."
    ),
    ignore_tokenizer_parity: bool = typer.Option(
        False, "--ignore-tokenizer-parity",
        help="Write the package even if the runtime's own tokenizer (GenAI's) encodes text otherwise.",
    ),
    sign: Path = typer.Option(
        None, "--sign", help="Sign the manifest with this Ed25519 private key (OpenSSH format: ssh-keygen -t ed25519)."
    ),
    lora: list[str] = typer.Option(
        [],
        "--lora",
        help="A PEFT LoRA adapter directory (or llama.cpp GGUF LoRA file), merged into the weights before "
        "quantization (repeatable).",
    ),
    lora_slots: int = typer.Option(
        None, "--lora-slots", help="LoRA slots of this rank, their weights given at run time (mobilize adapter)."
    ),
    lora_targets: str = typer.Option(
        "q,v", "--lora-targets", help="The projections that get LoRA slots: q,k,v,o,gate,up,down."
    ),
) -> None:
    """Export SOURCE as a package for a target: model files, tokenizer, genai_config.json, manifest."""
    import time

    from mobilize.driver import ExportOptions
    from mobilize.driver import export as run_export

    opts = ExportOptions(
        source, out, random_weights=random_weights, overwrite=overwrite, quant=quant, target=target,
        format=fmt, max_seq_len=max_seq_len, opset=opset, prefill_lens=tuple(prefill_len), bundle=bundle,
        logits=logits, kv_dtype=kv_dtype, ignore_fit=ignore_fit, sign=sign, lora=tuple(lora),
        lora_slots=lora_slots, lora_targets=lora_targets, tokenizer_parity=not ignore_tokenizer_parity,
    ).resolved()  # fmt: skip
    name = Path(source).stem if Path(source).exists() else source
    opts = dataclasses.replace(opts, out=out or Path("out") / f"{name}-{opts.target}-{opts.format}-{opts.quant}")
    start = time.perf_counter()
    with console.status("exporting") as status, _Progress(start) as progress:

        def phase(p: str) -> None:  # one line per phase, with the time it started
            if console.is_terminal:
                console.print(f"[dim]{time.perf_counter() - start:6.1f} s[/] {p}", highlight=False)
            progress.phase(p)
            status.update(f"exporting: {p}")

        path = run_export(opts, phase=phase)
    from mobilize.manifest import Manifest
    from mobilize.package.fit import describe

    manifest = Manifest.read(path)
    kv, kv_dtype, plan = manifest.target.max_seq_len, manifest.kv_cache.dtype, manifest.target.plan
    if plan and plan["passed_over"]:
        same = [p for p in plan["passed_over"] if p["kv_dtype"] == kv_dtype]
        longer = (same or plan["passed_over"])[0]
        print(f"planned for {plan['device']}: KV cache {kv_dtype}, {kv} positions ({longer['max_seq_len']} in "
              f"{longer['kv_dtype']} would need {longer['predicted_total_bytes'] / 1e9:.2f} GB of "
              f"{plan['budget_bytes'] / 1e9:.2f})")  # fmt: skip
    if manifest.fit is not None:
        fits = manifest.fit["memory"]["fits"]
        (print if fits else lambda t: console.print(f"[bold yellow]warning:[/] {t}"))(describe(manifest.fit))
    took = time.perf_counter() - start
    print(f"wrote {path} ({opts.target}, {opts.format}, {opts.quant}, max_seq_len {kv}, KV {kv_dtype}) in {took:.1f} s")


def _chat(
    package: Path, first: str | None, max_new_tokens: int, threads: int, key: Path | None, adapters: list[Path] = ()
) -> None:
    """Turns from stdin (one line each; `first` is the first), replies streamed; the whole conversation is
    rendered with the template for each turn, and a reply ends at EOS or the template's end-of-turn token."""
    from mobilize.harness.chat import chat_ids, end_of_turn_ids
    from mobilize.harness.package import Package, stream_greedy

    pkg = Package.open(package, key=key)
    if len(adapters) > 1:
        raise MobilizeError("--chat takes one --adapter (a conversation has one voice)")
    stop, runner, history = end_of_turn_ids(pkg), pkg.runner(threads, adapters), []
    while True:
        if first is not None:
            user, first = first, None
        else:
            if sys.stdin.isatty():
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return
            user = line.rstrip("\n")
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        reply = []
        for piece in stream_greedy(pkg, "", max_new_tokens, threads, ids=chat_ids(pkg, history), runner=runner,
                                   stop=stop):  # fmt: skip
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})


class _Progress:
    """Progress for a log (stderr not a terminal): quiet for the first PROGRESS_AFTER_S seconds (a refusal, which
    comes early, stays one line), then each phase as it starts and, every PROGRESS_EVERY_S, the one still
    running, so an eight-minute 7B export shows it is alive."""

    def __init__(self, start: float) -> None:
        import threading

        self.start, self.current, self.shown = start, None, None
        self.on = not console.is_terminal
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True) if self.on else None

    def __enter__(self) -> _Progress:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def _say(self, text: str) -> None:
        import time

        elapsed = time.perf_counter() - self.start
        if elapsed >= PROGRESS_AFTER_S:
            print(f"mobilize: {elapsed:7.1f} s {text}", file=sys.stderr, flush=True)
            self.shown = self.current

    def phase(self, name: str) -> None:
        self.current = name
        if self.on:
            self._say(name)

    def _beat(self) -> None:
        while not self.done.wait(PROGRESS_EVERY_S):
            if self.current is not None:
                self._say(self.current if self.shown != self.current else f"{self.current} (still)")


PROGRESS_AFTER_S, PROGRESS_EVERY_S = 30.0, 60.0


@app.command()
def run(
    package: Path = typer.Argument(..., help="A package directory written by `mobilize export`."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to continue (with --chat: the first turn)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, max=1 << 20),
    threads: int = typer.Option(0, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP),
    key: Path = typer.Option(None, "--key", help="Run it only if its manifest is signed by this public key."),
    chat: bool = typer.Option(
        False, "--chat", help="A conversation: turns read from stdin, rendered with the package's chat template."
    ),
    adapter: list[Path] = typer.Option(
        [], "--adapter", help="A LoRA adapter file (mobilize adapter); repeat to run each in turn on one loaded base."
    ),
    runtime: str = typer.Option(None, "--runtime", help="A runtime of the package's format (default: its own)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    remote_python: str = typer.Option("python3", "--remote-python", help="--device: the Python to run there."),
    remote_dir: str = typer.Option(None, "--remote-dir", help="--device: working directory there."),
) -> None:
    """Greedy generation from a package, streamed to stdout (with --device: computed there, printed here)."""
    from mobilize.harness.package import Package, stream_greedy

    if device is not None and (chat or adapter):
        raise MobilizeError("--device runs a prompt greedily (no --chat, no --adapter)")
    if chat:
        return _chat(package, prompt, max_new_tokens, threads, key, adapter)
    if prompt is None:
        raise MobilizeError("Missing option '--prompt' / '-p' (or pass --chat)")
    if not prompt.strip():
        raise MobilizeError("--prompt is empty; give some text to continue")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise MobilizeError("--prompt is not valid UTF-8") from None
    pkg = Package.open(package, key=key)
    if device is not None:
        return _run_on_device(pkg, prompt, max_new_tokens, threads, runtime, device, remote_python, remote_dir)
    runner = pkg.runner(threads, adapter, runtime) if adapter or runtime else None
    for name in runner.adapters if adapter else [None]:
        if name is not None:
            runner.activate(name)  # the next adapter on the same loaded base
            if len(adapter) > 1:
                sys.stdout.write(f"[{name}] ")
        pieces = stream_greedy(pkg, prompt, max_new_tokens, threads, runner=runner)
        first = next(pieces, "")  # (the package is loaded and the prompt checked before anything is printed)
        sys.stdout.write(prompt + first)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _run_on_device(pkg, prompt: str, max_new_tokens: int, threads: int, runtime: str | None, device: str,
                   python: str, workdir: str | None) -> None:  # fmt: skip
    from mobilize.harness.device import greedy_on_device

    tok = pkg.tokenizer()
    ids = tok.encode(prompt).ids
    room = pkg.manifest.target.max_seq_len
    if not ids:
        raise MobilizeError("the prompt gives no tokens")
    if len(ids) >= room:
        raise MobilizeError(f"the prompt has {len(ids)} tokens; this package's KV cache holds {room} positions")
    with console.status(f"running {pkg.path.name} on {device}"):
        (tokens,), info = greedy_on_device(pkg.path, device, python, [ids], min(max_new_tokens, room - len(ids)),
                                           pkg.eos_ids(tok), threads, runtime, workdir)  # fmt: skip
    _say_device(device, info)
    shown = tok.decode(ids)
    text = tok.decode(ids + [t for t in tokens if t not in pkg.eos_ids(tok)])
    sys.stdout.write(prompt + (text[len(shown) :] if text.startswith(shown) else text) + "\n")


def _say_device(spec: str, info: dict) -> None:
    """What ran it, on stderr; an emulated device says that its speed is not the device's."""
    console.print(f"[dim]on {spec}: {info.get('system')}, {info.get('cpus')} CPUs, Python {info.get('python')}[/]",
                  highlight=False, soft_wrap=True)  # fmt: skip
    if info.get("emulated"):
        console.print(f"[bold yellow]emulated[/] ({info['emulated']}): its tokens and logits are its kernels', its "
                      "speed is not the device's (never compare it with host figures or put it in a baseline)",
                      highlight=False, soft_wrap=True)  # fmt: skip


@app.command(name="adapter")
def adapter_(
    adapter: Path = typer.Argument(
        ..., help="A PEFT LoRA adapter directory (adapter_config.json + safetensors), or a llama.cpp GGUF LoRA file."
    ),
    package: Path = typer.Option(..., "--package", help="A package exported with --lora-slots."),
    out: Path = typer.Option(
        None, "--out", "-o", help="The adapter file (default: beside the package, named after the adapter)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing adapter file."),
) -> None:
    """Convert a PEFT (or GGUF) LoRA adapter for one package's LoRA slots: every tensor checked against them first."""
    from mobilize.package.adapter import convert
    from mobilize.package.verify import verify_package

    verify_package(package)
    path, peft, slots = convert(adapter, package, out, overwrite)
    ranks = sorted({p.rank for p in peft.pairs})
    print(f"wrote {path}: {len(peft.pairs)} of the package's {slots} slots, rank {'/'.join(map(str, ranks))}, for "
          f"{package}")  # fmt: skip


@app.command(name="eval")
def eval_(
    package: Path = typer.Argument(..., help="A package directory written by `mobilize export`."),
    text: Path = typer.Option(None, "--text", help="A plain text file (default: the bundled river.txt)."),
    texts: str = typer.Option(
        None, "--texts", help="A text set instead: broad (prose, dialogue, legal, technical, code; dev and held-out)."
    ),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=2, max=1 << 20, help="With --texts: tokens of each text."),
    chunk: int = typer.Option(256, "--chunk", min=2, max=1 << 16, help="Tokens per perplexity chunk."),
    max_ppl_increase: str = typer.Option(None, "--max-ppl-increase", help="A gate, e.g. 5%: exit 1 when exceeded."),
    threads: int = typer.Option(0, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP),
    reference: str = typer.Option(
        "numpy", "--reference", help="numpy: mobilize's decoder in fp32 (no torch); transformers: PyTorch's."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    adapter: Path = typer.Option(
        None, "--adapter", help="A LoRA adapter file: active in the package, merged into the reference (not recorded)."
    ),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP + " Not recorded in the manifest."),
    remote_python: str = typer.Option("python3", "--remote-python", help="--device: the Python to run there."),
    remote_dir: str = typer.Option(None, "--remote-dir", help="--device: working directory there."),
) -> None:
    """Perplexity, top-1 agreement and KL against the reference model; written into the manifest and README."""
    from mobilize.harness.evaluate import DEFAULT_TEXT, evaluate, record
    from mobilize.harness.package import Package

    budget = _percent(max_ppl_increase) if max_ppl_increase is not None else None
    if texts is not None and text is not None:
        raise MobilizeError("--text and --texts: give one")
    if device is not None and (texts is not None or adapter is not None):
        raise MobilizeError("--device evaluates one text (--text) with the package as it is (no --texts, --adapter)")
    pkg = Package.open(package)
    if texts is not None:
        from mobilize.harness.evaluate import evaluate_set
        from mobilize.harness.texts import text_set

        chosen = text_set(texts)
        with console.status(f"evaluating {package.name} on the {texts} texts against the reference"):
            result = evaluate_set(pkg, chosen, max_tokens, chunk, threads, reference, adapter)
        result["text_set"] = texts
        if adapter is None:  # (an adapter's figures are not the package's)
            record(package, result)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{'text':18} {'kind':10} {'split':9} {'tokens':>6} {'ppl':>8} {'ref':>8} {'increase':>8} "
                  f"{'top-1':>6} {'KL':>7}")  # fmt: skip
            rows = [(n, r["kind"], r["split"], r) for n, r in result["texts"].items()]
            rows += [(f"[{k}]", "", "", r) for k, r in result["splits"].items()] + [("[all]", "", "", result)]
            for name, kind, split, r in rows:
                print(f"{name:18} {kind:10} {split:9} {r['tokens']:>6} {r['perplexity']:>8.3f} "
                      f"{r['reference_perplexity']:>8.3f} {r['perplexity_increase']:>+8.2%} "
                      f"{r['top1_agreement']:>6.1%} {r['mean_kl']:>7.4f}")  # fmt: skip
        if budget is not None and result["perplexity_increase"] > budget:
            increase = result["perplexity_increase"]
            raise MobilizeError(f"perplexity {increase:+.2%} over the reference exceeds the budget of {budget:+.2%}")
        return
    from mobilize.safe_io import read_bytes

    try:
        body = read_bytes(text or DEFAULT_TEXT, 64 << 20, follow=True).decode("utf-8")
    except UnicodeDecodeError:
        raise MobilizeError(f"the text {text} is not UTF-8") from None
    if device is not None:
        from mobilize.harness.evaluate import evaluate_on_device

        with console.status(f"evaluating {package.name} on {device} against the reference here"):
            result = evaluate_on_device(pkg, body, device, remote_python, remote_dir, chunk, threads=threads,
                                        reference=reference)  # fmt: skip
        _say_device(device, result["device"])
    else:
        with console.status(f"evaluating {package.name} against the reference"):
            result = evaluate(pkg, body, chunk=chunk, threads=threads, reference=reference, adapter=adapter)
    if adapter is None and device is None:
        record(package, result)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"perplexity       {result['perplexity']:.3f} (reference {result['reference_perplexity']:.3f}, "
            f"{result['perplexity_increase']:+.2%}; {result['tokens']} tokens)"
        )
        print(f"top-1 agreement  {result['top1_agreement']:.1%}")
        print(f"mean KL          {result['mean_kl']:.5f}" + (f" ({result['kl_note']})" if "kl_note" in result else ""))
        print(f"greedy match     {result['greedy_match']['matched']} of {result['greedy_match']['new_tokens']} tokens")
    if budget is not None and result["perplexity_increase"] > budget:
        raise MobilizeError(
            f"perplexity {result['perplexity_increase']:+.2%} over the reference exceeds the budget of {budget:+.2%}"
        )


def _percent(value: str, flag: str = "--max-ppl-increase") -> float:
    try:
        return float(value.strip().removesuffix("%")) / 100.0
    except ValueError:
        raise MobilizeError(f"{flag} {value!r} is not a percentage such as 5%") from None


@app.command(name="fit")
def fit_(
    package: Path = typer.Argument(..., help="A package directory written by `mobilize export`."),
    device: str = typer.Option("pixel6", "--device", help="Device profile: pixel6, pixel8, iphone15."),
    prompt_len: int = typer.Option(
        128, "--prompt-len", min=1, max=1 << 20, help="Prompt whose logits are the largest activation."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Memory needed against the device's budget, and the bandwidth bound on decode tokens/s."""
    from mobilize.harness.package import Package
    from mobilize.package.fit import fit
    from mobilize.targets.registry import target

    pkg = Package.open(package)
    r = fit(pkg.path, pkg.manifest, device, prompt_len)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    m, d = r["memory"], r["decode_roofline"]
    mb = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    print(f"device          {r['device']} ({r['soc']}), {d['bandwidth_gb_s']} GB/s peak")
    print(f"weights         {mb(m['weights_bytes'])}")
    print(f"KV cache        {mb(m['kv_cache_bytes'])} ({pkg.manifest.kv_cache.dtype}, full length)")
    what = target(pkg.manifest.format).activations_are.format(prompt_len=prompt_len)
    print(f"activations     {mb(m['activation_bytes'])} ({what})")
    print(f"runtime         {mb(m['runtime_bytes'])} (allowance)")
    verdict = "fits" if m["fits"] else "DOES NOT FIT"
    print(f"resident        {mb(m['total_bytes'])} anonymous: {mb(m['weights_repacked_bytes'])} weights repacked by "
          f"the runtime + KV, activations, runtime; {mb(m['weights_file_backed_bytes'])} of lookup tables stay "
          "file-backed (read from the mapped file)")  # fmt: skip
    print(f"budget          {mb(m['budget_bytes'])} an app can keep resident on a {r['device']}: {verdict}")
    lo, hi = d["tokens_per_s"]
    flo, fhi = d["bandwidth_fraction"]
    print(
        f"decode          {lo:.1f}-{hi:.1f} tok/s at full context = {flo:.2f}-{fhi:.2f} x {d['bandwidth_gb_s']} GB/s / "
        f"({mb(d['weight_bytes_per_token'])} weights + {mb(d['kv_bytes_per_token_at_full_context'])} KV per token); "
        f"{d['tokens_per_s_at_most']:.1f} at the peak"
    )


@app.command()
def verify(
    package: Path = typer.Argument(..., help="A package directory written by `mobilize export`."),
    key: Path = typer.Option(None, "--key", help="An OpenSSH public key (key.pub): the manifest must be signed by it."),
) -> None:
    """Check a package against its manifest: schema, every file's size and sha256, the model's I/O, what the
    runtimes read; with --key, the manifest's signature."""
    from mobilize.package.verify import check_signature, manifest_digest, signer, verify_package

    with console.status(f"verifying {package}"):
        manifest = verify_package(package, key=key)
    total = sum(f.bytes for f in manifest.files.values())
    print(f"ok: {package} ({len(manifest.files)} files, {total:,} bytes, sha256 and I/O as the manifest says)")
    print(f"manifest sha256 {manifest_digest(package)}")
    if key is not None:
        print(f"signed by {check_signature(package, key)} (checked against {key})")
    elif (who := signer(package)) is not None:
        print(f"signature names key {who}; not checked (pass --key KEY.pub)")
    else:
        print("not signed: anyone who can write the files can rewrite the manifest (mobilize export --sign KEY)")


class _BenchGroup(typer.core.TyperGroup):
    """`mobilize bench PACKAGE ...` measures a package; `bench run|compare|plot` work on suites. A first
    argument that is not a subcommand is the package."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["package", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_BenchGroup,
    no_args_is_help=True,
    help="Measure a package: `mobilize bench PACKAGE [OPTIONS]` (its options: `mobilize bench PACKAGE --help`); "
    "or run, compare and plot benchmark suites.",
)
app.add_typer(bench_app, name="bench")


@bench_app.command(name="package", hidden=True)
def bench(
    package: Path = typer.Argument(..., help="A package directory written by `mobilize export`."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, max=1 << 20),
    gen_len: int = typer.Option(64, "--gen-len", min=1, max=1 << 20),
    threads: int = typer.Option(2, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP),
    repeats: int = typer.Option(3, "--repeats", min=1, max=1000, help="Timed runs after a warm-up; medians."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    runtime: str = typer.Option(
        "default",
        "--runtime",
        help="default: onnxruntime or LiteRT, by the package's format; genai: ONNX Runtime GenAI (onnx); "
        "litert-lm: LiteRT-LM's engine on the package's model.litertlm (tflite --bundle litertlm).",
    ),  # fmt: skip
    device: str = typer.Option(
        None, "--device", help="Measure on another machine: ssh:HOST, adb:SERIAL or local (pushed, run, pulled)."
    ),
    remote_python: str = typer.Option("python3", "--remote-python", help="--device: the Python to run there."),
    remote_dir: str = typer.Option(None, "--remote-dir", help="--device: working directory there."),
    adapter: Path = typer.Option(
        None, "--adapter", help="A LoRA adapter file: its decode cost against the base, interleaved on one session."
    ),
    native: Path = typer.Option(
        None, "--native", help="--device: a runtime's own benchmark binary for the device (benchmark_model, "
        "litert_lm_main), run there on the package's model file: no Python needed on the device.",
    ),  # fmt: skip
) -> None:
    """Time to first token, prefill and decode tokens/s, and peak RSS of a package on this machine (or a device)."""
    from mobilize.harness.package import Package
    from mobilize.harness.perf import measure

    if adapter is not None:
        if runtime != "default" or device is not None:
            raise MobilizeError("--adapter measures on this machine with the package's own runtime")
        return _bench_adapter(package, adapter, threads, prompt_len, gen_len, repeats, as_json)

    from mobilize.targets.registry import all_runtimes, runtimes

    if native is not None:
        return _bench_native(package, native, device, threads, prompt_len, gen_len, repeats, remote_dir, as_json,
                             runtime)  # fmt: skip
    known = all_runtimes()
    if runtime != "default" and runtime not in known:
        raise MobilizeError(f"unknown --runtime {runtime!r} (default, {', '.join(known)})")
    pkg = Package.open(package)
    available = runtimes(pkg.manifest.format)
    name = next(iter(available)) if runtime == "default" else runtime
    if name not in available:
        raise MobilizeError(f"--runtime {runtime} runs {known[runtime]} packages; this one is {pkg.manifest.format}")
    chosen = available[name]
    with console.status(f"benchmarking {package.name}" + (f" on {device}" if device else "")):
        if device is not None:
            from mobilize.harness.device import bench_on_device

            result = bench_on_device(package, device, remote_python, threads, prompt_len, gen_len, repeats, remote_dir,
                                     None if runtime == "default" else runtime)  # fmt: skip
        elif chosen.measure is not None:
            from mobilize.harness.perf import measure_engine

            run = lambda: chosen.measure(package, threads, prompt_len, gen_len)  # noqa: E731
            result = measure_engine(run, prompt_len, gen_len, repeats)
        else:
            runner = pkg.runner(threads, runtime=name)
            result = measure(runner, pkg.manifest.architecture.vocab_size, prompt_len, gen_len, repeats)
    result |= {"package": str(package), "recipe": pkg.manifest.recipe.name, "threads": threads}
    result["runtime"] = runtime
    if device is not None:
        _say_device(device, result["device"])
    _print_bench(result, prompt_len, as_json)


def _print_bench(result: dict, prompt_len: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'time to first token':<22} {result['time_to_first_token_s'] * 1000:.1f} ms ({prompt_len}-token prompt)")
    for r in result["records"]:
        print(f"{r['test']:<22} {r['avg_ts']:.1f} tok/s (+/- {r['stddev_ts']:.1f}, {len(r['samples_ts'])} runs)")
    peak = result["peak_rss_bytes"]
    print(f"{'peak RSS':<22} " + (f"{peak / 2**20:.0f} MiB" if peak else "not reported"))
    if "native" in result:
        print(f"(by {result['native']['how']})")


def _bench_native(package: Path, native: Path, device: str | None, threads: int, prompt_len: int, gen_len: int,
                  repeats: int, remote_dir: str | None, as_json: bool, runtime: str) -> None:  # fmt: skip
    from mobilize.harness.device import native_on_device
    from mobilize.harness.package import Package

    if device is None or runtime != "default":
        raise MobilizeError("--native runs a benchmark binary on a --device (it is its own runtime: no --runtime)")
    pkg = Package.open(package)
    with console.status(f"benchmarking {package.name} on {device} with {native.name}"):
        result = native_on_device(pkg.path, device, native, threads, prompt_len, gen_len, repeats, remote_dir)
    result |= {"package": str(package), "recipe": pkg.manifest.recipe.name, "threads": threads, "runtime": "native"}
    _say_device(device, result["device"])
    _print_bench(result, prompt_len, as_json)


def _bench_adapter(package: Path, adapter: Path, threads, prompt_len, gen_len, repeats, as_json) -> None:
    """The base and the base with an adapter on one loaded session, rounds interleaved (A B, B A, ...)."""
    from mobilize.harness.package import Package
    from mobilize.harness.perf import interleaved, measure, paired_ratio

    pkg = Package.open(package)
    runner = pkg.runner(threads, [adapter])
    name = next(iter(runner.adapters))
    vocab = pkg.manifest.architecture.vocab_size

    def with_(active):
        def run():
            runner.activate(active)
            return measure(runner, vocab, prompt_len, gen_len, 1)

        return run

    with console.status(f"benchmarking {package.name}: base and {name}, interleaved"):
        res = interleaved({"base": with_(None), "adapter": with_(name)}, repeats)
    tg = paired_ratio(res["adapter"]["samples"]["tg"], res["base"]["samples"]["tg"])
    pp = paired_ratio(res["adapter"]["samples"]["pp"], res["base"]["samples"]["pp"])
    result = {"package": str(package), "adapter": str(adapter), "rank": pkg.manifest.lora_slots.rank,
              "threads": threads, "prompt_len": prompt_len, "gen_len": gen_len, "rounds": repeats,
              "base": res["base"], "with_adapter": res["adapter"], "decode_ratio": tg, "prefill_ratio": pp,
              "decode_cost": 1 - tg}  # fmt: skip
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for label, r in (("base", res["base"]), (f"with {name}", res["adapter"])):
        pp_s, tg_s = r["prefill_tok_s"], r["decode_tok_s"]
        print(f"{label:<22} pp{prompt_len} {pp_s:8.1f} tok/s   tg{gen_len} {tg_s:7.1f} tok/s")
    print(f"{'adapter cost':<22} decode {1 - tg:+.1%}, prefill {1 - pp:+.1%} (medians of {repeats} paired rounds)")


@bench_app.command(name="run")
def bench_run(
    suite: str = typer.Argument(..., help="A suite: a bundled one (ci, recipes, export-scale) or a .toml file."),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSON to write."),
    workdir: Path = typer.Option(Path("out/bench-suite"), "--workdir", help="Where the packages are exported."),
) -> None:
    """Export and measure every case of a suite (models x formats x recipes) into one results JSON."""
    from mobilize.bench.suite import load_suite, run_suite

    spec = load_suite(suite)
    results = run_suite(spec, workdir.resolve(), log=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    out.write_text(json.dumps(results, indent=2) + "\n")
    for r in results["results"]:
        m = r["metrics"]
        speed = (f"pp {m['prefill_tok_s']:8.1f}  tg {m['decode_tok_s']:7.1f} tok/s  ppl {m['ppl']:7.3f}  "
                 if "ppl" in m else "")  # fmt: skip
        print(f"{r['id']:<36} {speed}{m['package_bytes'] / 1e6:8.1f} MB  export {m['export_s']:6.1f} s  "
              f"peak RSS {m['export_peak_rss_bytes'] / 2**30:5.2f} GB")  # fmt: skip
    print(f"wrote {out}")


@bench_app.command(name="compare")
def bench_compare(
    base: Path = typer.Argument(..., help="Baseline results (mobilize bench run)."),
    new: Path = typer.Argument(..., help="New results."),
    max_regression: str = typer.Option("5%", "--max-regression", help="Allowed worsening of any metric."),
    tolerance: list[str] = typer.Option(
        [], "--tolerance", help="METRIC=PERCENT for one metric (repeat); the baseline's own tolerances apply first."
    ),
    metrics: str = typer.Option(
        None,
        "--metrics",
        help="Compare only these (comma-separated; 'portable': ppl,package_bytes, for a baseline "
        "recorded on another machine).",
    ),
) -> None:
    """A table of deltas; exit 1 when a metric regressed past its tolerance."""
    from mobilize.bench.suite import MACHINE_INDEPENDENT, compare, read_results

    chosen = None
    if metrics is not None:
        chosen = MACHINE_INDEPENDENT if metrics == "portable" else tuple(m.strip() for m in metrics.split(",") if m)

    limits = {}
    for item in tolerance:
        metric, _, value = item.partition("=")
        limits[metric] = _percent(value, "--tolerance")
    rows, passed = compare(
        read_results(base), read_results(new), _percent(max_regression, "--max-regression"), limits, chosen
    )
    print(f"{'case':<36} {'metric':<22} {'base':>12} {'new':>12} {'change':>8} {'limit':>7}")
    for r in rows:
        if "base" not in r:
            print(f"{r['id']:<36} {r['metric']}")
            continue
        flag = "" if r["ok"] else "  REGRESSION"
        print(f"{r['id']:<36} {r['metric']:<22} {r['base']:12.4g} {r['new']:12.4g} {r['change']:+8.1%} "
              f"{r['limit']:7.0%}{flag}")  # fmt: skip
    if not passed:
        raise MobilizeError(f"{sum(not r['ok'] for r in rows)} regression(s) against {base}")


@bench_app.command(name="plot")
def bench_plot(
    results: Path = typer.Argument(..., help="Results JSON (mobilize bench run)."),
    out: Path = typer.Option(Path("out/plots"), "--out", "-o", help="Directory for the PNGs."),
) -> None:
    """PNG plots: tokens/s per case, perplexity against package size."""
    from mobilize.bench.suite import plot, read_results

    for path in plot(read_results(results), out):
        print(f"wrote {path}")


# Typer 0.29 bundles its own copy of click: its usage errors are not `click.ClickException`s. The base class
# is found from the one typer re-exports, whichever click that is.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


MAX_ERROR_CHARS = 1000  # a name of megabytes is cut short: an error is a line to read


def _say(message: str) -> None:
    """One line on stderr, whatever the message holds: control characters (a newline in a file name would
    forge a second line) escaped, and cut short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[: MAX_ERROR_CHARS - 30]}... ({len(text):,} characters)"
    print(text, file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every cleanup on the way out runs, as for Ctrl-C."""


_terminated: list[int] = []  # typer turns any KeyboardInterrupt into Exit(130): this says it was SIGTERM


def _on_sigterm(signum, _frame) -> None:
    _terminated.append(signum)
    raise _Terminated


def main() -> None:
    # A dependency's deprecation notice is for its callers' developers, not for the person at the prompt: on
    # stderr it would break the one-line error contract.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)  # the terminal closed: the same clean exit
    # Libraries' own chatter on stderr (transformers' tokenizer converter, TensorFlow Lite) would add lines
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mobilize.partials import catch_bus_errors

    catch_bus_errors()
    interrupted = "mobilize: interrupted; nothing was left half-written"
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C into Exit(130), returned here
        if code == 130 and _terminated:
            _say("mobilize: terminated; nothing was left half-written")
            sys.exit(143)
        if code == 130:
            _say(interrupted)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:  # a usage error: one line, and where the usage is
        command = getattr(getattr(e, "ctx", None), "command_path", None)
        hint = f" (see '{command} --help')" if command else ""
        message = " ".join(e.format_message().split())
        _say(f"mobilize: error: {message}{hint}")
        sys.exit(1)
    except typer.Abort:
        _say("mobilize: terminated; nothing was left half-written" if _terminated else "mobilize: aborted")
        sys.exit(143 if _terminated else 130)
    except _Terminated:
        _say("mobilize: terminated; nothing was left half-written")
        sys.exit(143)
    except KeyboardInterrupt:
        _say(interrupted)
        sys.exit(130)
    except MobilizeError as e:
        _say(f"mobilize: error: {e}")
        sys.exit(1)
    except OSError as e:
        full = e.errno == errno.ENOSPC or "free space" in str(e)  # numpy's tofile raises without an errno
        what = f"the disk is full ({e.strerror or e})" if full else (e.strerror or str(e))
        _say(f"mobilize: error: {what}" + (f": {e.filename!r}" if e.filename else ""))
        sys.exit(1)
    except MemoryError:
        _say("mobilize: error: out of memory")
        sys.exit(1)
    except BrokenPipeError:  # `mobilize run ... | head`: the reader left; nothing to say to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except RecursionError:
        _say("mobilize: error: the input is nested too deeply to read")
        sys.exit(1)
    except Exception as e:  # a case no check foresaw: still one line (MOBILIZE_DEBUG=1 shows the traceback)
        if os.environ.get("MOBILIZE_DEBUG"):
            raise
        _say(f"mobilize: error: unexpected {type(e).__name__}: {e} (a bug in mobilize: please report it with "
             "the command; MOBILIZE_DEBUG=1 shows where)")  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
