"""A short demo of the eager reference model: generate from a prompt and show each new token's
strongest expert. `python -m xlora_export.demo MODEL_DIR [PROMPT]`."""

from __future__ import annotations

import argparse

from xlora_runtime.commands import positive_int, run

from .errors import XLoraError

PROG = "python -m xlora_export.demo"


def build_parser() -> argparse.ArgumentParser:
    """The options of the demo."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("model_dir", help="X-LoRA checkpoint folder (e.g. models/xlora-demo)")
    parser.add_argument("prompt", nargs="?", default="spell: 305 =",
                        help="text prompt (default: a question of the trained demo)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens to generate (default 16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run(PROG, build_parser, _demo, argv)


def _demo(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .xlora_utils import load_model

    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model(args.model_dir)
    if tokenizer is None:
        raise XLoraError(f"{args.model_dir}: no tokenizer.json in the checkpoint or its base model")
    batch = tokenizer([args.prompt], return_tensors="pt")
    model.enable_scalings_logging()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    new = out[0, batch["input_ids"].shape[1]:]
    log = model.get_scalings_log()  # prefill (1, p, L, n), then one (1, 1, L, n) per decode step
    print(f"{len(model.adapter_names)} experts {model.adapter_names} over {len(model.module_names)} modules")
    print(f"prompt: {args.prompt!r}")
    for i, token in enumerate(new.tolist()):
        mean = log[i][0, -1].mean(0)  # (n,): the scalings that chose token i, averaged over modules
        top = int(mean.argmax())
        print(f"  {tokenizer.decode([token])!r:>14}  top expert {model.adapter_names[top]} ({mean[top]:.2f})")
        if token == tokenizer.eos_token_id:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
