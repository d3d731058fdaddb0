"""The most that stacking K models can gain on this device, per model family: one model's training step at batch B, K times, vs one step at batch K x B.

A stacked ensemble runs K models' minibatches through the same layer sequence at once. Its frozen
parts (FiLM's backbone convolutions, a frozen encoder) are literally one layer call on K x B samples,
and its trainable per-model layers are batched matmuls / grouped convolutions, which are at best as
efficient as one layer over K x B samples. So the per-sample cost of one model at batch K x B bounds
the ensemble's per-sample cost from below, and ``time(K steps at B) / time(1 step at K x B)`` is the
ceiling of the ensemble's speedup over training the models one after another (the sequential farm
pays Lightning's per-run overhead on top, which this leaves out). A ceiling at or below 1 means
stacking cannot pay on this device whatever the implementation.

Families (random weights: only shapes matter for time): ``lstm`` (configs/text/imdb_lstm.yaml:
Embedding 3000x64 -> LSTM 64, 100 tokens, B = 64), ``film`` and ``full`` (configs/images/fmnist_film.yaml:
MobileNetV2 at 96 px, B = 20 = the few-shot subset; film: eval-mode backbone, only BatchNorm affine
and head trainable), ``mlm`` (configs/mlm/clinosim_bert_tiny.yaml: BERT 2 layers x 128, 128 tokens,
B = 32, vocabulary projection at the 15% masked positions only, as ``models.mlm`` trains).
``--lstm_layer`` also times the LSTM layer itself, forward + backward at the imdb_lstm shapes: K
``nn.LSTM`` calls (the fused oneDNN / cuDNN kernel the sequential farm runs) against one call of the
ensemble's stacked recurrence (``models.stacked_lstm``, input projection included) for K models, with
the GFLOP/s each achieves and the measured matmul peak: where the LSTM ensemble loses or wins before
any Lightning overhead.
``--bf16`` also times each family's step at batch B in bfloat16 autocast (what ``--trainer.precision
bf16-mixed`` runs) against float32: the other way to make a CPU farm faster, native on CPUs with
AVX512-BF16 or AMX and emulated elsewhere.
Run: ``python benchmarks/stacking_bound.py [--families lstm film full mlm] [--k 4 16] [--device cuda] [--lstm_layer] [--bf16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def lstm_step(device: str) -> Callable[[int], None]:
    embedding, lstm, head = nn.Embedding(3000, 64).to(device), nn.LSTM(64, 64, batch_first=True).to(device), nn.Linear(64, 2).to(device)

    def step(batch: int) -> None:
        tokens = torch.randint(0, 3000, (batch, 100), device=device)
        _, (h, _) = lstm(embedding(tokens))
        F.cross_entropy(head(h[-1]), torch.randint(0, 2, (batch,), device=device)).backward()

    return step


def image_step(device: str, finetune: str) -> Callable[[int], None]:
    import timm

    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=5).to(device)
    if finetune == "film":
        model.eval()  # frozen backbone statistics, as models.image does in film mode
        trainable = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)}
        trainable |= {id(p) for p in model.get_classifier().parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    def step(batch: int) -> None:
        x = torch.randn(batch, 3, 96, 96, device=device)
        F.cross_entropy(model(x), torch.randint(0, 5, (batch,), device=device)).backward()

    return step


def mlm_step(device: str) -> Callable[[int], None]:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    model = BertForMaskedLM(config).to(device)

    def step(batch: int) -> None:
        ids = torch.randint(1000, 30522, (batch, 128), device=device)
        masked = torch.rand(batch, 128, device=device) < 0.15
        hidden = model.bert(input_ids=ids.masked_fill(masked, 103)).last_hidden_state
        F.cross_entropy(model.cls(hidden[masked]), ids[masked]).backward()

    return step


LSTM_SHAPES = {"steps": 100, "batch": 64, "width": 64, "hidden": 64}
"""configs/text/imdb_lstm.yaml: 100 tokens, batch 64, embedding 64, hidden 64."""


def lstm_layer_flops(k: int) -> float:
    """Forward + backward FLOPs of K LSTM layers at ``LSTM_SHAPES``: 3 x 2 x the multiply-adds of the input and recurrent projections of every token."""
    t, b, e, h = LSTM_SHAPES.values()
    return 6.0 * k * t * b * (e + h) * 4 * h


def lstm_layer_steps(k: int, device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(K ``nn.LSTM`` forward + backward passes, one stacked-recurrence pass for K models) on random data."""
    from mia_lightning.models.stacked_lstm import stacked_lstm

    t, b, e, h = LSTM_SHAPES.values()
    layers = [nn.LSTM(e, h, batch_first=True).to(device) for _ in range(k)]
    inputs = [torch.randn(b, t, e, device=device, requires_grad=True) for _ in range(k)]
    w_ih = torch.randn(k, e, 4 * h, device=device, requires_grad=True)
    w_hh = torch.randn(k, h, 4 * h, device=device, requires_grad=True)
    stacked_input = torch.randn(k, t * b, e, device=device, requires_grad=True)

    def sequential() -> None:
        for layer, x in zip(layers, inputs):
            _, (final, _) = layer(x)
            final[-1].sum().backward()

    def stacked() -> None:
        states = stacked_lstm(torch.bmm(stacked_input, w_ih).view(k, t, b, 4 * h), w_hh)
        states[:, -1].sum().backward()

    return sequential, stacked


def lstm_layer_case(ks: list[int], rounds: int, device: str) -> None:
    """Print the LSTM layer's time per K models, both ways, with achieved GFLOP/s against the matmul peak."""
    size = 2048
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    peak = 2 * size**3 * 5 / seconds(lambda _: a @ b, 0, 5, device) / 1e9
    print(f"LSTM layer at imdb_lstm shapes {LSTM_SHAPES}, forward + backward; measured float32 matmul peak {peak:.1f} GFLOP/s")
    for k in ks:
        sequential, stacked = lstm_layer_steps(k, device)
        sequential(), stacked()
        one = min(seconds(lambda _: sequential(), 0, 3, device) for _ in range(rounds)) / 3
        together = min(seconds(lambda _: stacked(), 0, 3, device) for _ in range(rounds)) / 3
        flops = lstm_layer_flops(k)
        print(f"lstm layer K={k:3d}: {k} x nn.LSTM {1e3 * one:7.1f} ms ({flops / one / 1e9:6.1f} GFLOP/s, {100 * flops / one / 1e9 / peak:3.0f}% of peak); "
              f"stacked recurrence {1e3 * together:7.1f} ms ({flops / together / 1e9:6.1f} GFLOP/s); ensemble / sequential speed {one / together:5.2f}x")


FAMILIES: dict[str, tuple[Callable[[str], Callable[[int], None]], int]] = {
    "lstm": (lstm_step, 64),
    "film": (lambda device: image_step(device, "film"), 20),
    "full": (lambda device: image_step(device, "full"), 20),
    "mlm": (mlm_step, 32),
}
"""family -> (builder of a training step taking the batch size, the recipe's batch size B)."""


def seconds(step: Callable[[int], None], batch: int, repeats: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16], help="models per stacked group")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the fastest counts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--lstm_layer", action="store_true", help="also time the LSTM layer: K nn.LSTM calls vs the stacked recurrence")
    parser.add_argument("--bf16", action="store_true", help="also time each family's step in bfloat16 autocast against float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'})")
    if args.lstm_layer:
        lstm_layer_case(args.k, args.rounds, args.device)
    for name in args.families:
        build, batch = FAMILIES[name]
        step = build(args.device)
        for k in args.k:
            step(batch), step(k * batch)  # warm-up: allocator, kernels
            one = min(seconds(step, batch, k, args.device) for _ in range(args.rounds))
            stacked = min(seconds(step, k * batch, 1, args.device) for _ in range(args.rounds))
            print(f"{name:5s} K={k:3d}: {k} steps at batch {batch}: {one:7.3f} s; one step at batch {k * batch}: {stacked:7.3f} s; "
                  f"stacking ceiling {one / stacked:5.2f}x")
        if args.bf16:
            repeats = max(args.k)
            timed = {}
            try:
                for _ in range(args.rounds):  # interleaved, the fastest round counts
                    for precision in ("float32", "bfloat16"):
                        with torch.autocast(args.device, dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext():
                            step(batch)
                            timed[precision] = min(timed.get(precision, float("inf")), seconds(step, batch, repeats, args.device))
            except RuntimeError as err:  # e.g. oneDNN's LSTM on a CPU without native bfloat16
                print(f"{name:5s} bfloat16 autocast: not supported on this device ({str(err).splitlines()[0][:90]})")
                continue
            print(f"{name:5s} {repeats} steps at batch {batch}: float32 {timed['float32']:7.3f} s; bfloat16 autocast {timed['bfloat16']:7.3f} s; "
                  f"{timed['float32'] / timed['bfloat16']:5.2f}x")


if __name__ == "__main__":
    main()
