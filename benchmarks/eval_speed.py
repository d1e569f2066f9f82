"""Evaluation speed: what one demo run evaluates, on the real all-MiniLM-L6-v2, old path vs new path.

One demo run evaluates the validation split (400 VADER movie snippets), the ID test set (500) and three
OOD sets (500 tweets, Amazon and NYT snippets each), batch size 32 (`recipes/demo.yaml`). Both paths run
in this one process on the same pretrained model, timed alternately (old, new, old, new, ...) so that
both see the same machine load:

* old: the evaluator before issue 14 — sorted by characters, `collate` (tokenize + pad) per batch,
  `torch.no_grad`, eval mode set per split, which re-embeds the class prompts for every split;
* new: `saftune.eval.evaluate` — the model prepares a split once (`Classifier.prepare`: tokenized once,
  sorted by token count), `torch.inference_mode`, class prompts embedded once per call.

Besides wall and CPU seconds it counts the tokens the encoder processes, padding included (a measure of
the work that no machine load can blur), and compares the logits and accuracies of the two paths.

Usage:
    python benchmarks/eval_speed.py                 # results: benchmarks/results/eval_speed.json
    python benchmarks/eval_speed.py --repeats 1 --out /tmp/e.json
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

from saftune.eval import evaluate, predict
from saftune.eval.metrics import project_logits, top1
from saftune.models import create
from saftune.grid import GridConfig
from saftune.run import RunConfig, build_benchmark

RESULTS = Path(__file__).parent / "results"
DEMO_DATA = GridConfig.load("demo").dataset_options  # the demo's data, from its recipe


@torch.no_grad()
def old_predict(model, split, batch_size: int) -> torch.Tensor:
    """The evaluator's `predict` before issue 14 (single process), kept here as the reference path."""
    model.eval()
    order = list(range(len(split)))
    if len(split) and isinstance(split.inputs[0], str):
        order.sort(key=lambda i: len(split.inputs[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = model.collate([split.inputs[i] for i in order[start : start + batch_size]])
        chunks.append(project_logits(model(batch).float(), split.class_subset))
    logits = torch.empty(len(split), chunks[0].shape[1])
    logits[torch.as_tensor(order)] = torch.cat(chunks)
    return logits


def old_evaluate(model, bench, batch_size: int) -> dict[str, float]:
    """Accuracies of every split with the old path (the benchmark's classes throughout, as in the demo)."""
    splits = {"val": bench.val, **bench.eval_splits()}
    return {name: top1(old_predict(model, s, batch_size), torch.as_tensor(s.labels)) for name, s in splits.items()}


def padded_tokens(model, split, batch_size: int, old: bool) -> tuple[int, int]:
    """(tokens the encoder runs on, padding included; real tokens) for one split and one batching."""
    lengths = [len(r) for r in model.tokenizer(list(split.inputs), truncation=True, max_length=model.max_length)["input_ids"]]
    order = sorted(range(len(split)), key=(lambda i: len(split.inputs[i])) if old else lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches), sum(lengths)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations per path (alternating)")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (the demo's: 32)")
    parser.add_argument("--out", default=str(RESULTS / "eval_speed.json"))
    args = parser.parse_args(argv)

    bench = build_benchmark(RunConfig(model="minilm", dataset="sentiment-domains", dataset_options=DEMO_DATA, seed=1))
    model = create("minilm")
    model.set_classes(bench.classnames, bench.templates)
    splits = {"val": bench.val, **bench.eval_splits()}
    load_before = os.getloadavg()

    # Logits of both paths, split by split: the numbers behind the accuracies.
    comparison = {}
    for name, split in splits.items():
        old = old_predict(model, split, args.batch_size)
        new = predict(model, split, batch_size=args.batch_size)
        labels = torch.as_tensor(split.labels)
        old_tokens, real = padded_tokens(model, split, args.batch_size, old=True)
        new_tokens, _ = padded_tokens(model, split, args.batch_size, old=False)
        comparison[name] = {
            "examples": len(split),
            "max_abs_logit_diff": float((old - new).abs().max()),
            "predictions_flipped": int((old.argmax(-1) != new.argmax(-1)).sum()),
            "acc_old": top1(old, labels),
            "acc_new": top1(new, labels),
            "tokens_real": real,
            "tokens_padded_old": old_tokens,
            "tokens_padded_new": new_tokens,
        }

    # Whole evaluations, timed alternately; wall clock and this process's CPU time.
    evaluate(model, bench, batch_size=args.batch_size)  # warm-up
    samples = {"old": [], "new": []}
    metrics = {}
    for _ in range(args.repeats):
        for path in ("old", "new"):
            wall, cpu = time.perf_counter(), time.process_time()
            if path == "old":
                metrics[path] = old_evaluate(model, bench, args.batch_size)
            else:
                metrics[path] = evaluate(model, bench, batch_size=args.batch_size, include_val=True)
            samples[path].append((time.perf_counter() - wall, time.process_time() - cpu))
    wall = {p: statistics.median(s[0] for s in v) for p, v in samples.items()}
    cpu = {p: statistics.median(s[1] for s in v) for p, v in samples.items()}
    new_metrics = {k.removeprefix("ood/"): v for k, v in metrics["new"].items() if k != "ood_avg"}

    tokens_old = sum(c["tokens_padded_old"] for c in comparison.values())
    tokens_new = sum(c["tokens_padded_new"] for c in comparison.values())
    result = {
        "what": "one demo run's evaluation (val 400 + ID 500 + 3 x 500 OOD) of pretrained all-MiniLM-L6-v2",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_old": round(wall["old"], 3),
        "seconds_new": round(wall["new"], 3),
        "speedup": round(wall["old"] / wall["new"], 3),
        "cpu_seconds_old": round(cpu["old"], 3),
        "cpu_seconds_new": round(cpu["new"], 3),
        "cpu_speedup": round(cpu["old"] / cpu["new"], 3),
        "samples_wall_cpu": {p: [[round(a, 3), round(b, 3)] for a, b in v] for p, v in samples.items()},
        "tokens_padded_old": tokens_old,
        "tokens_padded_new": tokens_new,
        "tokens_real": sum(c["tokens_real"] for c in comparison.values()),
        "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in comparison.values()),
        "predictions_flipped": sum(c["predictions_flipped"] for c in comparison.values()),
        "accuracies_identical": metrics["old"] == new_metrics,
        "accuracies_old": metrics["old"],
        "accuracies_new": new_metrics,
        "splits": comparison,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(f"evaluation of one demo run: old {wall['old']:.2f} s, new {wall['new']:.2f} s, "
          f"speed-up {result['speedup']:.2f}x (CPU time {result['cpu_speedup']:.2f}x)")
    print(f"tokens through the encoder: old {tokens_old}, new {tokens_new} (real {result['tokens_real']})")
    print(f"max |logit difference| {result['max_abs_logit_diff']:.2e}, predictions flipped "
          f"{result['predictions_flipped']}, accuracies identical: {result['accuracies_identical']}")
    print(f"cpu capability {result['cpu_capability']}, {result['threads']} threads, load {result['load_average_before_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
