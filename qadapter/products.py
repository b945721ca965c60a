"""The two-branch decoder's few-row matrix products on CPU, in whichever operand order runs faster here.

A decoding step multiplies a handful of rows x (M, K) by every weight W (N, K) of the model:
``F.linear(x, W) = x·Wᵀ``. The same numbers come out of ``mm(W, xᵀ)ᵀ``, the weight as the left
operand, but the BLAS takes a different path for it. With MKL on a 2-core AMD EPYC (Zen 2), x·Wᵀ at
M = 2-16 takes as long on two threads as on one (the embedded model's 210 body products at M = 2:
54.5 ms against 50.3 ms), while W·xᵀ takes 28.1 ms on two: 1.6-3.4x faster per product (the
vocabulary projection at M = 2: 21.9 ms against 6.5 ms; bench/NOTES.md), which is what lets both
branches of a batch-1 step (2 rows) cost less than the base model's 1-row step. Another CPU, BLAS or
thread count may rank them the other way, so nothing is assumed: the first time a row count is met,
both orders are timed on the model's own weights (four sweeps each, once per model, thread count and
power-of-two bucket of rows: 0.35-0.7 s a bucket for the embedded model on that CPU with 2 threads,
up to 1.1 s with 1) and the faster is kept, W·xᵀ only if it is at least 10% faster.

The two orders sum the same products in a different order, so they agree to float rounding (~1e-6
relative), not bit for bit. That is why only the two-branch fast decoder uses this (its logits already
agree with the reference engine to rounding only, docs/generation.md); the one-branch decoder stays
bit-equal to PEFT's forward. ``QADAPTER_SMALL_PRODUCTS`` overrides the choice: ``auto`` (the default),
``linear`` (always x·Wᵀ, the previous behaviour), ``weight-first`` (always W·xᵀ for 2-32 rows).
"""

from __future__ import annotations

import os
import statistics
import time
import weakref

import torch
import torch.nn.functional as F

from .backbone import ReplacedForwards
from .errors import ConfigError

ENV = "QADAPTER_SMALL_PRODUCTS"
MODES = ("auto", "linear", "weight-first")
MAX_ROWS = 32  # the server's 16 prompts x 2 branches; more rows (a prefill) gained < 5% on that CPU: F.linear
MARGIN = 0.9  # W·xᵀ is chosen only when its measured time is below this fraction of x·Wᵀ's
SWEEPS = 3  # timed sweeps per order, interleaved; the median counts


def weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``mm(weight, xᵀ)ᵀ``: x (..., K), weight (N, K) -> (..., N).

    xᵀ must be a transposed view of a row-major (M, K) tensor (a contiguous (K, M) one takes a slow
    path in MKL), and the result is made contiguous, as F.linear's is, for the layers after it."""
    K = x.shape[-1]
    rows = x.reshape(-1, K).contiguous()
    out = torch.mm(weight, rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"the environment variable {ENV}={value!r} is not one of {', '.join(MODES)} "
                          f"(unset it for auto)")
    return value


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


class SmallProducts:
    """``F.linear``'s signature, x·Wᵀ or W·xᵀ by the number of rows (see the module docstring).

    ``weights``: the (W, b) pairs to time the two orders on (the model's body, as the forward streams
    them); ``choice``: {rows bucket: True where W·xᵀ is faster}, filled by measurement unless the
    mode fixes it. ``timer`` is ``time.perf_counter`` (a test replaces it)."""

    def __init__(self, weights, mode: str = "auto", timer=time.perf_counter):
        self.weights, self.mode, self.timer = list(weights), mode, timer
        self.threads = torch.get_num_threads()  # what the measurements hold for
        self.modules: list[torch.nn.Linear] = []  # set by small_products: the modules of ``weights``
        self.choice: dict[int, bool] = {}
        self.timings: dict[int, tuple[float, float]] = {}  # bucket: (x·Wᵀ, W·xᵀ) seconds per sweep

    def __call__(self, x, weight, bias=None):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 2 <= rows <= MAX_ROWS and self.faster(rows):
            return weight_first(x, weight, bias)
        return F.linear(x, weight, bias)

    def prepare(self, *rows: int) -> None:
        """Measure now (not inside a forward) for each of ``rows`` that can use W·xᵀ."""
        for count in rows:
            if 2 <= count <= MAX_ROWS:
                self.faster(count)

    def faster(self, rows: int) -> bool:
        """Whether W·xᵀ is the order to use for ``rows`` rows (2 <= rows <= MAX_ROWS)."""
        if self.mode != "auto":
            return self.mode == "weight-first"
        bucket = _bucket(rows)
        if bucket not in self.choice:
            self.choice[bucket] = self._measure(bucket)
        return self.choice[bucket]

    def _measure(self, rows: int) -> bool:
        first = self.weights[0][0]
        generator = torch.Generator(first.device).manual_seed(0)  # the caller's random state untouched
        inputs = {K: torch.randn(rows, K, generator=generator, device=first.device).to(first.dtype)
                  for K in sorted({w.shape[1] for w, _ in self.weights})}

        def sweep(product):
            start = self.timer()
            for w, b in self.weights:
                product(inputs[w.shape[1]], w, b)
            return self.timer() - start

        times = {F.linear: [], weight_first: []}
        with torch.inference_mode():
            for product in times:  # warm-up: first calls allocate and page in
                sweep(product)
            for _ in range(SWEEPS):
                for product, seconds in times.items():
                    seconds.append(sweep(product))
        linear, transposed = statistics.median(times[F.linear]), statistics.median(times[weight_first])
        self.timings[rows] = (linear, transposed)
        return transposed < MARGIN * linear


def body_linears(model) -> list[torch.nn.Linear]:
    """The plain ``nn.Linear`` modules of the transformers model ``model`` but its output head and
    LoRA's own A/B factors (PEFT's ``base_layer`` modules included), whose forward nobody replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and m is not head and "forward" not in m.__dict__
            and ".lora_" not in f".{name}" and m.weight.device.type != "meta"]


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, SmallProducts]" = weakref.WeakKeyDictionary()


def small_products(model) -> SmallProducts | None:
    """The model's :class:`SmallProducts`, one per model and torch thread count (its measurements
    kept), or None where only F.linear applies: ``QADAPTER_SMALL_PRODUCTS=linear``, a model not on
    the CPU, a model without plain linears."""
    chosen = mode()
    if chosen == "linear":
        return None
    linears = body_linears(model)
    if not linears or linears[0].weight.device.type != "cpu":
        return None
    products = _CACHE.get(model)
    if (products is None or products.mode != chosen or products.threads != torch.get_num_threads()
            or products.weights[0][0] is not linears[0].weight):
        products = SmallProducts([(m.weight, m.bias) for m in linears], chosen)
        _CACHE[model] = products
    products.modules = linears  # the modules the decoder swaps (LinearForwards), as found now
    return products


class LinearForwards(ReplacedForwards):
    """Context manager: within the block, each of ``modules`` (plain ``nn.Linear``) computes its
    forward with ``product(x, weight, bias)``. Re-enterable, like :class:`~qadapter.backbone.SplitRows`."""

    def __init__(self, modules, product):
        super().__init__((m, self._forward(m, product)) for m in modules)

    @staticmethod
    def _forward(module, product):
        weight, bias = module.weight, module.bias

        def forward(x, *args, **kwargs):
            return product(x, weight, bias)

        return forward
