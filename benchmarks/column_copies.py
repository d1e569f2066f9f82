"""How fast is the Linear kernel's transposing copy of a layer's input or output gradient, by width?

The kernel reads each used column of a [N, width] bf16 activation as one contiguous fp32 vector: a
transpose and a widening (`saftune.sparse.kernels._columns`). Two ways are timed side by side, the
calls interleaved so that both see the same machine load:

    one copy      torch.empty(width, N, fp32).copy_(x.t()): transpose and widening at once;
    two copies    x.t().contiguous().float(): torch's blocked same-dtype transpose, then a contiguous widening.

`_columns` takes the second when the rows lie a multiple of 2 KiB apart (`chosen` below), where the first
keeps hitting the same cache sets.

When only some columns are used (`--part gather`, a random ~40% of them), two ways of gathering them:

    columns first     x.index_select(1, cols), then the transposing copy: a strided gather;
    indexed           x[:, cols], then the transposing copy: the same gather by advanced indexing (its
                      kernel, unlike index_select's along dim 1, is vectorised for bf16);
    transpose first   x.t().contiguous().index_select(0, cols): the whole input transposed, whole rows gathered.

`_columns` gathers fp32 columns first; bf16 inputs up to 5 MiB it transposes first, wider ones it gathers
by advanced indexing (`indexed`).

A wide output gradient (`--parts blocks`: out = 2048, 8192, a 49152-token vocabulary; 1e-3 of a [out, 768
or 2048] weight selected) is copied a block of rows at a time (`saftune.sparse.kernels.selected_dots`):
its selected entries' dot products timed whole and in blocks of 2^18, 2^20 and 2^22 elements, and as the
kernel chooses (blocks of 2^20 above 2^22 elements).

Projections that read one input (`--parts shared`: q, k and v of a grouped-query layer, k and v a third
as wide as q; 1e-3 of each weight selected at random) each need that input's used columns:

    own columns       each projection copies the columns it uses (`shared_copy` keyed by those columns: one
                      copy serves all three only where each reads every column);
    every column      one copy of all of them, which all three read;
    chosen            `shared_columns` for q, k, v in turn: the first gathers its own, the second copies
                      every column, the third reads that copy.

A projection's selected entries can also be computed without any of these copies (`--parts native`):
`saftune.sparse.native_dots` reads the output gradient and input as they lie, token by token. For Llama
shapes (hidden 576..4096: q [H, H], gate [I, H], down [H, I], the tied vocabulary [49152, H]; 1e-3 of each
weight selected at random), two ways side by side:

    copies        the input's used columns and the output gradient's used rows transposed to fp32, then
                  torch's sampled product (`selected_dots`; the input copied for this projection alone,
                  where q, k and v share one in a step);
    in place      `native_dots.dots`;
    chosen        what the kernel takes (`native_dots.wanted`: in place up to MAX_ENTRIES_PER_ROW entries
                  per row of the gradient read).

Usage:
    python benchmarks/column_copies.py            # results: benchmarks/results/column_copies.json
    python benchmarks/column_copies.py --parts native --out benchmarks/results/column_copies_native.json
    python benchmarks/column_copies.py --parts shared --out benchmarks/results/column_copies_shared.json
    python benchmarks/column_copies.py --parts blocks --out benchmarks/results/column_copies_blocks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from saftune.sparse import kernels, native_dots
from saftune.sparse.kernels import _columns

RESULTS = Path(__file__).parent / "results"
WIDTHS = [192, 576, 768, 1024, 1536, 2048, 2560, 3072, 4096, 4608, 5632, 8192, 10944, 11008, 12288]


def _median_ms(fn, calls: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def _time_ways(ways: dict, rounds: int, calls: int = 10) -> dict[str, float]:
    """Each way's median ms per call over `rounds`, the ways taken in turn each round (same machine load)."""
    for fn in ways.values():
        fn()
    samples = {k: [] for k in ways}
    for _ in range(rounds):
        for key, fn in ways.items():
            samples[key].append(_median_ms(fn, calls))
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(tokens: int, width: int, rounds: int) -> dict:
    x = torch.randn(tokens, width).bfloat16()
    every = torch.arange(width)
    ways = {"one_copy": lambda: torch.empty(width, tokens).copy_(x.t()),
            "two_copies": lambda: x.t().contiguous().float(),
            "chosen": lambda: _columns(x, every, torch.float32)}
    ms = _time_ways(ways, rounds)
    return {"tokens": tokens, "width": width, **{f"{k}_ms": v for k, v in ms.items()},
            "two_over_one": ms["two_copies"] / ms["one_copy"], "chosen_over_best": ms["chosen"] / min(ms["one_copy"], ms["two_copies"]),
            "takes_two_copies": (width * x.element_size()) % 2048 == 0}


def measure_gather(tokens: int, width: int, used: int, rounds: int, dtype=torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    cols = torch.sort(torch.randperm(width, generator=g)[:used]).values

    def columns_first():
        picked = x.index_select(1, cols)
        return torch.empty(used, tokens).copy_(picked.t())

    def indexed():
        picked = x[:, cols]
        if dtype != torch.float32 and (used * picked.element_size()) % 2048 == 0:  # the slow case of --parts widen
            return picked.t().contiguous().float()
        return torch.empty(used, tokens).copy_(picked.t())

    ways = {"columns_first": columns_first, "indexed": indexed,
            "transpose_first": lambda: x.t().contiguous().index_select(0, cols).float(),
            "chosen": lambda: _columns(x, cols, torch.float32)}
    ms = _time_ways(ways, rounds)
    return {"tokens": tokens, "width": width, "used": used, "dtype": str(dtype).removeprefix("torch."),
            **{f"{k}_ms": v for k, v in ms.items()},
            "transpose_first_over_columns_first": ms["transpose_first"] / ms["columns_first"],
            "indexed_over_columns_first": ms["indexed"] / ms["columns_first"],
            "chosen_over_best": ms["chosen"] / min(ms["columns_first"], ms["indexed"], ms["transpose_first"]),
            "input_mib": tokens * width * x.element_size() / 2**20}


BLOCKS = {"2^18": 1 << 18, "2^20": 1 << 20, "2^22": 1 << 22, "whole": 1 << 62}
BLOCK_SHAPES = [(2048, 768), (8192, 2048), (49152, 768), (49152, 2048)]  # [out, in] of the weight


def measure_blocks(tokens: int, out: int, width: int, rounds: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(tokens, out, generator=g).to(dtype), torch.randn(tokens, width, generator=g)
    indices = torch.sort(torch.randperm(out * width, generator=g)[: out * width // 1000]).values
    s = kernels.LinearSelection.from_indices(indices, (out, width))
    x_columns = s.columns(x)
    default = kernels._ROW_BLOCK_ELEMENTS, kernels._BLOCKS_ABOVE_ELEMENTS

    def way(elements=None):
        def run():
            if elements is not None:  # blocks of `elements` whatever the size
                kernels._ROW_BLOCK_ELEMENTS, kernels._BLOCKS_ABOVE_ELEMENTS = elements, 0
            try:
                return kernels.selected_dots(grad, x_columns, s.unique_rows, s.row_slot, s.col_slot, s.crow)
            finally:
                kernels._ROW_BLOCK_ELEMENTS, kernels._BLOCKS_ABOVE_ELEMENTS = default
        return run

    ways = {name: way(elements) for name, elements in BLOCKS.items()} | {"chosen": way()}
    calls = max(3, 10 * 2048 // out)
    ms = _time_ways(ways, rounds, calls)
    blocked = s.unique_rows.numel() * tokens > kernels._BLOCKS_ABOVE_ELEMENTS
    return {"tokens": tokens, "out": out, "in": width, "dtype": str(dtype).removeprefix("torch."), "selected": indices.numel(),
            "rows_read": s.unique_rows.numel(), **{f"{k}_ms": v for k, v in ms.items()}, "blocked": blocked,
            "chosen_over_best": ms["chosen"] / min(v for k, v in ms.items() if k != "chosen"),
            "chosen_over_whole": ms["chosen"] / ms["whole"]}


def measure_shared(tokens: int, width: int, rounds: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    selections = []
    for out in (width, width // 3, width // 3):  # q, k, v
        indices = torch.sort(torch.randperm(out * width, generator=g)[: out * width // 1000]).values
        selections.append(kernels.LinearSelection.from_indices(indices, (out, width)))

    def own_columns():  # each projection copies its own columns; a copy of every column serves all that read every one
        kernels._last_copy.put(None)  # each round starts as a layer's backward does: nothing copied from x yet
        return [kernels.shared_copy(x, s.unique_cols if s.save_columns else None, torch.float32,
                                    lambda s=s: _columns(x, s.unique_cols, torch.float32)) for s in selections]

    def chosen():
        kernels._last_copy.put(None)
        return [kernels.shared_columns(x, s.unique_cols, s.col_slot) for s in selections]

    ways = {"own_columns": own_columns, "every_column": lambda: _columns(x, None, torch.float32), "chosen": chosen}
    ms = _time_ways(ways, rounds)
    return {"tokens": tokens, "width": width, "dtype": str(dtype).removeprefix("torch."),
            "columns_used": [s.unique_cols.numel() for s in selections], **{f"{k}_ms": v for k, v in ms.items()},
            "own_columns_over_every_column": ms["own_columns"] / ms["every_column"],
            "chosen_over_own_columns": ms["chosen"] / ms["own_columns"]}


NATIVE_HIDDEN = [576, 1024, 2048, 3072, 4096]
VOCAB = 49152


def native_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """[out, in] of a Llama layer's projections (the intermediate width as benchmarks/llm_engine.py sets it)."""
    inner = 64 * round(8 * hidden / 3 / 64)
    return {"q": (hidden, hidden), "gate": (inner, hidden), "down": (hidden, inner), "vocab": (VOCAB, hidden)}


def measure_native(tokens: int, name: str, out: int, width: int, rounds: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(tokens, out, generator=g).to(dtype), torch.randn(tokens, width, generator=g).to(dtype)
    indices = torch.sort(torch.randperm(out * width, generator=g)[: out * width // 1000]).values
    s = kernels.LinearSelection.from_indices(indices, (out, width))

    def copies():
        return kernels.selected_dots(grad, _columns(x, s.unique_cols, torch.float32), s.unique_rows, s.row_slot, s.col_slot, s.crow)

    def in_place():
        return native_dots.dots(grad, x, s.unique_rows.index_select(0, s.row_slot), s.unique_cols.index_select(0, s.col_slot))

    def chosen():
        got = kernels.dots_in_place(grad, x, dtype, *s.tensors()[:4], columns_saved=False)
        return copies() if got is None else got

    ms = _time_ways({"copies": copies, "in_place": in_place, "chosen": chosen}, rounds, calls=max(2, 20 * 2048 // out))
    return {"tokens": tokens, "projection": name, "out": out, "in": width, "dtype": str(dtype).removeprefix("torch."),
            "selected": indices.numel(), "rows_read": s.unique_rows.numel(),
            "entries_per_row_read": indices.numel() / s.unique_rows.numel(), **{f"{k}_ms": v for k, v in ms.items()},
            "in_place_over_copies": ms["in_place"] / ms["copies"],
            "chosen_over_best": ms["chosen"] / min(ms["copies"], ms["in_place"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", nargs="+", default=["widen", "gather"], choices=["widen", "gather", "blocks", "shared", "native"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--gather-dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                        help="gather: the activations' dtypes (the copies are fp32 either way)")
    parser.add_argument("--out", type=Path, default=RESULTS / "column_copies.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, gathers, blocks, shared, native = [], [], [], [], []
    for tokens, dtype, hidden in [(t, d, h) for t in args.tokens for d in args.gather_dtypes for h in NATIVE_HIDDEN
                                  if "native" in args.parts]:
        for name, (out, width) in native_shapes(hidden).items():
            native.append(measure_native(tokens, name, out, width, args.rounds, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]))
            r = native[-1]
            print(f"N={tokens:5d} {dtype} {name:5s} [{out:6d}, {width:5d}] {r['entries_per_row_read']:.2f} entries/row  copies "
                  f"{r['copies_ms']:7.3f} ms  in place {r['in_place_ms']:7.3f} ms  in place/copies {r['in_place_over_copies']:.2f}"
                  f"  chosen/best {r['chosen_over_best']:.2f}", flush=True)
    for tokens, dtype, (out, width) in [(t, d, shape) for t in args.tokens for d in args.gather_dtypes for shape in BLOCK_SHAPES
                                        if "blocks" in args.parts]:
        blocks.append(measure_blocks(tokens, out, width, args.rounds, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]))
        r = blocks[-1]
        print(f"N={tokens:5d} {dtype} out={out:6d} in={width:5d}  " + "  ".join(f"{k} {r[k + '_ms']:6.2f} ms" for k in BLOCKS)
              + f"  chosen ({'blocks' if r['blocked'] else 'whole'}) {r['chosen_ms']:6.2f} ms: /best {r['chosen_over_best']:.2f}"
              f"  /whole {r['chosen_over_whole']:.2f}", flush=True)
    for tokens, dtype, width in [(t, d, w) for t in args.tokens for d in args.gather_dtypes for w in args.widths + [49152]
                                 if "gather" in args.parts]:
        gathers.append(measure_gather(tokens, width, int(0.4 * width), args.rounds,
                                      {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]))
        r = gathers[-1]
        print(f"N={tokens:5d} {dtype} width={width:6d} used={r['used']:6d}  columns first {r['columns_first_ms']:7.3f} ms"
              f"  indexed {r['indexed_ms']:7.3f} ms  transpose first {r['transpose_first_ms']:7.3f} ms"
              f"  chosen {r['chosen_ms']:7.3f} ms  chosen/best {r['chosen_over_best']:.2f}", flush=True)
    for tokens, dtype, width in [(t, d, w) for t in args.tokens for d in args.gather_dtypes for w in args.widths
                                 if "shared" in args.parts]:
        shared.append(measure_shared(tokens, width, args.rounds, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]))
        r = shared[-1]
        print(f"N={tokens:5d} {dtype} width={width:6d} q/k/v columns used {r['columns_used']}  own columns "
              f"{r['own_columns_ms']:7.3f} ms  every column {r['every_column_ms']:7.3f} ms  chosen {r['chosen_ms']:7.3f} ms"
              f"  own/every {r['own_columns_over_every_column']:.2f}  chosen/own {r['chosen_over_own_columns']:.2f}", flush=True)
    for tokens in args.tokens if "widen" in args.parts else []:
        for width in args.widths:
            rows.append(measure(tokens, width, args.rounds))
            r = rows[-1]
            print(f"N={tokens:5d} width={width:6d}  one copy {r['one_copy_ms']:7.3f} ms  two copies {r['two_copies_ms']:7.3f} ms"
                  f"  two/one {r['two_over_one']:.2f}  chosen/best {r['chosen_over_best']:.2f}"
                  f"  ({'two copies' if r['takes_two_copies'] else 'one copy'})", flush=True)
    report = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                          "threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
              "rows": rows, "gather": gathers, "blocks": blocks, "shared": shared,
              "native": native, "native_max_entries_per_row": native_dots.MAX_ENTRIES_PER_ROW}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
