"""Command line: one subcommand per user task. Thin: parse, call the library, print.

A user mistake (UserError) prints one line, ``sharpscope: error: ...``, and exits with 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

from . import __version__
from .errors import UserError
from .metrics import CRITICAL, LAMBDA_MAX, LR_OVER_ETA_C, PRECONDITIONED, TRACE_PER_PARAM


def _float_list(text: str) -> list[float]:
    from .sizes import parse_size

    return [parse_size(v) for v in text.split(",") if v.strip()]


def _refuse_existing_study(out: Path, force: bool) -> None:
    from .runs import find_runs

    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a directory; choose another --out")
    if out.is_dir() and find_runs(out) and not force:
        raise UserError(f"'{out}' already holds runs; pass --force to replace them or choose another --out")


def _remove_runs(out: Path) -> None:
    """Delete the runs under ``out`` (and nothing else), so a replaced study has no leftovers."""
    from .runs import find_runs

    if out.is_dir():
        for run_dir in find_runs(out):
            shutil.rmtree(run_dir)


# --- simulate --------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .simulation import SimulationConfig, write_study
    from .simulation.study import n_trajectories, plan_study

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(SimulationConfig, args.config, overrides)
    out = Path(args.out)
    _refuse_existing_study(out, args.force)
    t0 = time.perf_counter()
    planned = plan_study(cfg)  # validates before anything is written
    if args.force:
        _remove_runs(out)
    paths = write_study(cfg, out)
    print(f"simulated {len(paths)} runs ({n_trajectories(planned)} trajectories) in "
          f"{time.perf_counter() - t0:.2f} s -> {out}")
    if args.no_analyze:
        return 0
    return _analyze(out, Path(args.report) if args.report else out / "report", figures=not args.no_figures,
                    title=f"Simulated sharpness study (seed {cfg.seed})")


# --- analyze ---------------------------------------------------------------------------

RUN_LINES = 10
"""Runs printed one line each by analyze; the rest are in tables/runs.csv."""


def _analyze(study: Path, out: Path, *, figures: bool = True, metric: str | None = None,
             pac_m: float = 1e5, pac_delta: float = 0.05, extrapolate: list[float] | None = None,
             title: str | None = None, final: str = "mean", groups: list[str] | None = None) -> int:
    from .analysis.runset import describe_run
    from .analysis.study import AnalysisOptions
    from .report.build import write_report

    # extrapolate None: a study extrapolates to the simulated study's sizes, a run report not at all
    opts = AnalysisOptions(metric=metric or CRITICAL, pac_m=pac_m, pac_delta=pac_delta,
                           extrapolate=tuple(extrapolate) if extrapolate else None, final_statistic=final)
    t0 = time.perf_counter()
    result = write_report(study, out, figures=figures, options=opts, title=title, groups=groups)
    a = result.analysis
    s = a.summary
    print(f"analysed {s['n_runs']} run{'s' if s['n_runs'] != 1 else ''} in {time.perf_counter() - t0:.2f} s -> {out}")
    for note in a.notes:  # what was fitted across sizes, or the one line saying why nothing was
        print(f"  {note}")
    if a.scaling is not None:
        f = s["scaling_law"]
        print(f"  final sharpness = {f['slope']:.4f}·log10 N + {f['intercept']:.4f}  "
              f"(R² {f['r2']:.4f}, r {f['r']:.4f}; AIC log-linear {f['aic_loglinear']:.2f} vs power {f['aic_power']:.2f})")
        if a.kind == "study":
            print(f"  three-phase: scales {s['three_phase_scales']}, ablations {s['ablations_preserved']}")
        else:
            print(f"  three-phase: {s['three_phase_scales']} of the runs fitted across sizes")
    if a.kind == "runs":
        rows = a.tables["runs"]
        for row in rows[:RUN_LINES]:
            print(f"  {row['run']} ({row['n_params']:,} params): {describe_run(row)}")
        if len(rows) > RUN_LINES:
            print(f"  ... and {len(rows) - RUN_LINES} more runs (tables/runs.csv)")
    if result.html:
        print(f"  report: {result.html}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    return _analyze(Path(args.study), Path(args.out), figures=not args.no_figures, metric=args.metric,
                    pac_m=args.pac_m, pac_delta=args.pac_delta,
                    extrapolate=_float_list(args.extrapolate) if args.extrapolate else None, final=args.final,
                    groups=[g.strip() for g in args.group.split(",") if g.strip()] if args.group else None)


# --- fit -------------------------------------------------------------------------------

def _read_columns(path: Path, x: str, y: str) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise UserError(f"table '{path}' not found; pass the path of a CSV file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for col, flag in ((x, "--x"), (y, "--y")):
                if col not in header:
                    raise UserError(f"column '{col}' ({flag}) is not in {path}; its columns are: {', '.join(header)}")
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the table as a UTF-8 CSV") from None
    return [r[x] for r in rows], [r[y] for r in rows]


def cmd_fit(args: argparse.Namespace) -> int:
    from .analysis.fits import ScalingLaw
    from .sizes import parse_size

    path = Path(args.table)
    xs, ys = _read_columns(path, args.x, args.y)
    n_params, values = [], []
    for i, (xv, yv) in enumerate(zip(xs, ys), start=2):  # line 1 is the header
        if xv is None or yv is None or not xv.strip() or not yv.strip():
            raise UserError(f"{path}:{i}: empty value in '{args.x}' or '{args.y}'; fill it in or drop the row")
        try:
            n = parse_size(xv)
        except UserError as exc:
            raise UserError(f"{path}:{i}: {exc}") from None
        try:
            v = float(yv)
        except ValueError:
            raise UserError(f"{path}:{i}: '{yv}' in column '{args.y}' is not a number") from None
        if not math.isfinite(v) or not math.isfinite(n):
            raise UserError(f"{path}:{i}: non-finite value; fits need finite numbers")
        n_params.append(n)
        values.append(v)
    law = ScalingLaw(n_params, values, what=args.y)
    fit = law.summary()
    predictions = law.predict(_float_list(args.predict)) if args.predict else []
    if args.json:
        print(json.dumps({"fit": fit.as_dict(), "predictions": predictions}, indent=2))
        return 0
    print(f"{fit.n} sizes from {path} ({args.y} against {args.x})")
    print(f"log-linear  {args.y} = {fit.slope:.4f}·log10 N + {fit.intercept:.4f}   "
          f"R² {fit.r2:.4f}   r {fit.r:.4f}   AIC {fit.aic_loglinear:.2f}")
    print(f"power law   {args.y} = {fit.power_coef:.4f}·N^{fit.power_exponent:.4f}   "
          f"R² {fit.power_r2:.4f}   AIC {fit.aic_power:.2f}")
    print(f"preferred by AIC: {fit.preferred} (ΔAIC {abs(fit.aic_power - fit.aic_loglinear):.2f})")
    print(f"leave-one-out relative error: log-linear mean {fit.loo_mean_pct:.2f}% max {fit.loo_max_pct:.2f}%; "
          f"power law mean {fit.power_loo_mean_pct:.2f}% max {fit.power_loo_max_pct:.2f}%")
    if predictions:
        print("predictions (log-linear with 95% interval of the fitted mean; power law):")
        for p in predictions:
            print(f"  N = {p['n_params']:.3g}: {p['predicted']:.4f} [{p['lower']:.4f}, {p['upper']:.4f}]   "
                  f"power law {p['predicted_power']:.4f}")
    return 0


# --- train / measure -------------------------------------------------------------------

def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional CONFIG.toml and the KEY=VALUE overrides of a command that takes both."""
    overrides = list(args.overrides)
    config_path = args.config
    if config_path and "=" in config_path and not Path(config_path).exists():
        # no config file given: argparse put the first KEY=VALUE override in its place
        overrides.insert(0, config_path)
        config_path = None
    return config_path, overrides


def _train_config(args: argparse.Namespace):
    from .config import load_config
    from .training.config import TrainConfig

    config_path, overrides = _config_and_overrides(args)
    for flag, key in (("steps", "steps"), ("seed", "seed"), ("monitor_every", "monitor.every"),
                      ("checkpoint_every", "checkpoint.every"), ("optimizer", "optim.name"), ("rho", "optim.rho"),
                      ("phi", "optim.phi"), ("inner_steps", "optim.inner_steps"), ("inner_lr", "optim.inner_lr")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.precondition:
        overrides.append("optim.precondition=true")
    return load_config(TrainConfig, config_path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.trainer import train

    config = _train_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a directory; choose another --out")
    t0 = time.perf_counter()
    train(config, out, resume=args.resume)
    print(f"[train] {config.name}: {config.steps} steps -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _measure_table_row(r: dict) -> str:
    return (f"{r['step']:>8d} {_cell(r['loss']):>9s} {_cell(r['lr']):>10s} {_cell(r[CRITICAL]):>10s} "
            f"{_cell(r[LR_OVER_ETA_C]):>9s} {_cell(r.get(LAMBDA_MAX)):>10s} "
            f"{_cell(r.get(TRACE_PER_PARAM)):>10s} {_cell(r.get(PRECONDITIONED)):>10s}  "
            f"{r['direction']}" + ("" if r["critical_status"] == "ok" else f" ({r['critical_status']})"))


def cmd_measure(args: argparse.Namespace) -> int:
    from .runs import metrics_line
    from .measure.series import MeasureOptions, find_checkpoints, measure_path

    options = MeasureOptions(batch_size=args.batch_size, n_batches=args.batches, block_size=args.block_size,
                             lanczos_iters=args.lanczos_iters, trace_samples=args.trace_samples, seed=args.seed,
                             direction=args.direction, warm_batches=args.warm_batches,
                             max_grad_norm=args.max_grad_norm, lr=args.lr, device=args.device)
    options.check()
    found = find_checkpoints(args.checkpoint)  # checked (and our checksums read) once
    series = len(found.checkpoints) > 1
    t0 = time.perf_counter()

    def public(result: dict) -> dict:
        # strict JSON (NaN as null); the timings stay out of the measurements
        return json.loads(metrics_line({k: v for k, v in result.items() if k != "seconds"}))

    shown = []

    def show(result: dict) -> None:
        if args.json:
            print(json.dumps(public(result)), flush=True)
            return
        if not shown:
            print(f"{'step':>8s} {'loss':>9s} {'lr':>10s} {'lambda_c':>10s} {'lr/eta_c':>9s} {'lambda_max':>10s} "
                  f"{'trace/P':>10s} {'precond':>10s}  direction")
        shown.append(result["step"])
        print(_measure_table_row(result), flush=True)
    measured = measure_path(found, args.data, options, out=args.out, force=args.force, name=args.name,
                            progress=not args.no_progress, on_result=show if series else None)
    if not series:
        result = measured.results[0] if measured.results else None
        if result is None:  # already in --out with the same settings
            print(f"step {measured.reused[0]} is already measured in {measured.out}; nothing to do")
        elif args.json:
            print(json.dumps(public(result), indent=2))
        else:
            for key, value in result.items():
                if key != "seconds":
                    print(f"{key:32s} {value:.6g}" if isinstance(value, float) else f"{key:32s} {value}")
    if not args.json:
        if series:
            notes: dict[str, int] = {}
            for r in measured.results:
                key = f"{r['direction']}: {r['direction_note']}"
                notes[key] = notes.get(key, 0) + 1
            for note, count in notes.items():
                print(f"direction {note} [{count} checkpoint{'s' if count > 1 else ''}]")
            kept = f", {len(measured.reused)} kept from {measured.out}" if measured.reused else ""
            print(f"[measure] {len(measured.results)} checkpoint(s) measured{kept} in "
                  f"{time.perf_counter() - t0:.1f} s")
        if measured.out is not None:
            print(f"[measure] run -> {measured.out} (sharpscope analyze {measured.out} --out REPORT)")
    return 0


# --- mix -------------------------------------------------------------------------------

def _alphas(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' must be numbers separated by commas, e.g. 0,0.25,0.5,0.75,1") from None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "inf" if value == math.inf else ("nan" if math.isnan(value) else f"{value:.4g}")
    return str(value)


def cmd_mix(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiments.mix import MixConfig, run_mix
    from .report.mix_figures import write_mix_figures

    cfg = load_config(MixConfig, None, list(args.overrides))
    if args.alphas is not None:
        cfg.alphas = _alphas(args.alphas, "--alphas")
    if args.no_validate:
        cfg.validate = False
    if args.validate_steps is not None:
        cfg.validate_steps = args.validate_steps
    t0 = time.perf_counter()
    result = run_mix(args.checkpoint, args.pretrain, args.finetune, cfg, Path(args.out),
                     log=print if args.verbose else None, draw=write_mix_figures)
    print(f"[mix] {result['checkpoint']} (step {result['step']}): pretraining {' + '.join(result['pretrain'])}, "
          f"fine-tuning {result['finetune']}; direction of {result['direction_optimizer']} ({result['moments']} state) "
          f"at lr {result['lr']:.4g}")
    print(f"{'alpha':>6s} {'rows PT/FT':>10s} {'lambda_c FT':>12s} {'status':>12s} {'rel lambda_c PT':>16s} {'status':>12s}")
    for r in result["sweep"]:
        print(f"{r['alpha']:6.3g} {str(r['n_pretrain']) + '/' + str(r['n_finetune']):>10s} "
              f"{_cell(r['lambda_finetune']):>12s} {r['status_finetune']:>12s} "
              f"{_cell(r['lambda_pretrain']):>16s} {r['status_pretrain']:>12s}")
    rec = result["recommended_alpha"]
    print(f"crossing: {'alpha = ' + format(rec, '.3f') if rec is not None else 'none'} ({result['crossing']['note']})")
    validation = result.get("validation")
    if validation:
        print(f"validation: {validation['steps']} steps at lr {validation['lr']:.3g} per alpha")
        print(f"{'alpha':>6s} {'gain':>9s} {'retention':>10s} {'score':>9s} {'rank':>5s} {'pareto':>7s}")
        for r in validation["rows"]:
            print(f"{r['alpha']:6.3f} {_cell(r['gain']):>9s} {_cell(r['retention_loss']):>10s} "
                  f"{_cell(r['score']):>9s} {_cell(r['rank']):>5s} {_cell(r['pareto']):>7s}"
                  + ("  <- recommended" if r["recommended"] else ""))
        print(f"criterion: score = gain - {validation['retention_weight']:g}*retention loss; {validation['statement']}")
    print(f"[mix] done in {time.perf_counter() - t0:.1f} s -> {Path(args.out) / 'mix.json'}")
    return 0


# --- study -----------------------------------------------------------------------------

def _shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard '{text}' must be I/N, e.g. 0/2 for the first of two machines") from None
    return i, n


def _study_figures() -> dict:
    """The drawing of the study's data-mix and Nexus figures (the experiments sit below the
    report, so the command hands it in)."""
    from .report.mix_figures import write_mix_figures
    from .report.nexus_figures import write_nexus_figures

    return {"draw_mix": write_mix_figures, "draw_nexus": write_nexus_figures}


def cmd_study(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiments.grid_study import StudyConfig, plan_study, run_study

    config_path, overrides = _config_and_overrides(args)
    cfg = load_config(StudyConfig, config_path, overrides)
    out = Path(args.out)
    if args.plan:
        runs = plan_study(cfg)
        for r in runs:
            print(f"{r.name:28s} N={r.n_params:>10,d}  steps={r.steps:>7,d}  tokens={r.tokens:>12,d}  "
                  f"groups={','.join(r.groups)}")
        print(f"{len(runs)} runs, {sum(r.tokens for r in runs):,d} tokens in all")
        return 0
    t0 = time.perf_counter()
    result = run_study(cfg, out, shard=_shard(args.shard), force=args.force, progress=not args.no_progress,
                       **_study_figures())
    print(f"[study] {cfg.name}: {len(result.ran)} run(s) trained, {len(result.resumed)} resumed, "
          f"{len(result.skipped)} already finished ({time.perf_counter() - t0:.1f} s) -> {out / 'runs'}")
    if args.no_report:
        return 0
    from .report.study import write_study_report

    from .analysis.study import AnalysisOptions

    report = write_study_report(out, out / "report", title=f"Measured sharpness study: {cfg.name}",
                                options=AnalysisOptions(final_statistic=args.final))
    print(f"[study] report: {report}")
    return 0


# --- compare ---------------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import compare_summaries, verdict_counts
    from .report.study import summary_of, write_comparison

    sim, measured = summary_of(args.simulated), summary_of(args.measured)
    rows = compare_summaries(sim, measured)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a directory; choose another --out")
    write_comparison(rows, out)
    width = max(len(r["claim"]) for r in rows)
    for r in rows:
        print(f"{r['claim']:{width}s}  {r['verdict']:13s}  {r['measured']}")
    c = verdict_counts(rows)
    print(f"{c['holds']} hold, {c['does not hold']} do not hold, {c['inconclusive']} inconclusive -> "
          f"{out / 'comparison.md'}")
    return 0


# --- demo ------------------------------------------------------------------------------

# The reduced measured study of the demo: five one- and two-block GPTs (about 9K to 120K
# parameters), one seed, the five schedules at three sizes, short runs; plus the data-mix
# advisor and the Nexus comparison on small models. About three minutes on 2 CPU cores.
DEMO_STUDY = [
    "name=demo-ladder", 'sizes=["1x16","1x24","1x32","1x48","2x64"]', "seeds=[0]",
    'schedule_sizes=["1x24","1x32","1x48"]', "monitor_points=50", "exact_points=5", "eval_points=5",
    "checkpoint_points=2", "budget.tokens_per_param=2", "budget.min_steps=150", "train.model.block_size=64",
    'train.data.sources=["code","prose","arithmetic"]', "train.data.max_bytes=500000",
    "train.monitor.lanczos_iters=12", "train.monitor.trace_samples=8", "train.eval.batches=2",
    "train.eval.arithmetic_problems=20",
    "mix.enabled=true", "mix.size=1x32", "mix.steps=300", "mix.mix.validate_steps=20",
    "mix.mix.alphas=[0,0.2,0.4,0.6,0.8,1]", "mix.mix.validate_alphas=[0,0.5,1]",
    "nexus.enabled=true", "nexus.size=1x32", "nexus.steps=300", "nexus.finetune_steps=30",
]


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .simulation import SimulationConfig, write_study
    from .experiments.grid_study import StudyConfig, plan_study, run_study

    out = Path(args.out)
    simulated, study, report = out / "simulated", out / "study", out / "report"
    for path in (out, simulated, study, report):
        if path.exists() and not path.is_dir():
            raise UserError(f"'{path}' exists and is not a directory; choose another --out")
    cfg = load_config(StudyConfig, None, DEMO_STUDY + list(args.overrides))
    plan_study(cfg)  # a bad override fails here, before anything is replaced
    for path in (simulated, study, out / "study-simulated"):
        if path.exists():
            shutil.rmtree(path)  # the demo owns its output folder and always starts it afresh
    t0 = time.perf_counter()
    paths = write_study(SimulationConfig(), simulated)
    print(f"[demo] simulated study: {len(paths)} runs -> {simulated}")
    _analyze(simulated, simulated / "report", title="Simulated sharpness study (seed 42)")
    if args.no_training:
        print(f"[demo] done in {time.perf_counter() - t0:.1f} s; open {simulated / 'report' / 'report.html'}")
        return 0
    result = run_study(cfg, study, progress=not args.no_progress, **_study_figures())
    print(f"[demo] measured study: {len(result.ran)} runs trained -> {study / 'runs'} "
          f"({time.perf_counter() - t0:.1f} s so far)")
    from .analysis.compare import verdict_counts
    from .report.study import write_study_report

    html = write_study_report(study, report, simulated=simulated / "report",
                              title="sharpscope demo: the simulated study's claims on a small measured study")
    rows = json.loads((report / "comparison.json").read_text(encoding="utf-8"))
    for row in rows:
        print(f"  {row['claim']:22s} {row['verdict']:13s} {row['measured'][:100]}")
    c = verdict_counts(rows)
    print(f"[demo] {c['holds']} claims hold, {c['does not hold']} do not, {c['inconclusive']} inconclusive")
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s; open {html}")
    return 0


# --- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .training.optimizers import OPTIMIZER_REGISTRY  # torch-free: the names only

    p = argparse.ArgumentParser(prog="sharpscope", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="simulate the study of sharpness across scales and analyse it")
    s.add_argument("--out", required=True, help="directory for the runs (the report goes to OUT/report)")
    s.add_argument("--seed", type=int, default=None, help="numpy seed (default 42)")
    s.add_argument("--config", help="TOML file with simulation settings")
    s.add_argument("--report", help="write the report here instead of OUT/report")
    s.add_argument("--no-analyze", action="store_true", help="only write the runs")
    s.add_argument("--no-figures", action="store_true", help="tables and summary only")
    s.add_argument("--force", action="store_true", help="replace runs already in OUT")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. noise_sigma=0.02")
    s.set_defaults(func=cmd_simulate)

    a = sub.add_parser("analyze", help="analyse one run or a directory of runs (simulated or measured)")
    a.add_argument("study", help="a run directory, or a directory holding runs (searched recursively)")
    a.add_argument("--group", help="group label(s) of the runs to fit across sizes, comma-separated "
                                   "(default: 'scales', else the label holding the most sizes)")
    a.add_argument("--out", required=True, help="report directory")
    a.add_argument("--metric", help="sharpness metric to study (default sharpness/critical)")
    a.add_argument("--no-figures", action="store_true", help="tables and summary only")
    a.add_argument("--pac-m", type=float, default=1e5, help="PAC-Bayes sample count m")
    a.add_argument("--pac-delta", type=float, default=0.05, help="PAC-Bayes confidence delta")
    a.add_argument("--extrapolate", help="sizes to extrapolate to when the study has none, e.g. 13B,30B,70B")
    a.add_argument("--final", choices=("mean", "median"), default="mean",
                   help="summary of the last 10%% of points: mean (the simulated study's) or median (robust)")
    a.set_defaults(func=cmd_analyze)

    f = sub.add_parser("fit", help="fit a table of model size against sharpness")
    f.add_argument("table", help="CSV file with a header row")
    f.add_argument("--x", required=True, help="column of model sizes (numbers or 10M / 1.3B labels)")
    f.add_argument("--y", required=True, help="column of sharpness values")
    f.add_argument("--predict", help="sizes to predict, comma-separated, e.g. 13e9,30e9,70e9")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=cmd_fit)

    t = sub.add_parser("train", help="train a GPT with the live sharpness monitor")
    t.add_argument("config", nargs="?", help="TOML config (see configs/); defaults apply without one")
    t.add_argument("--out", required=True, help="run directory (metrics.jsonl, config.json, checkpoints/)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--seed", type=int, help="seed of initialisation, data order and dropout")
    t.add_argument("--monitor-every", type=int, help="critical sharpness every N steps (0 = off)")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0 = at the end only)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--optimizer", choices=tuple(OPTIMIZER_REGISTRY),
                   help="optimizer (the SAM family and Nexus wrap optim.base, adamw by default)")
    t.add_argument("--rho", type=float, help="SAM family: perturbation radius")
    t.add_argument("--precondition", action="store_true", help="SAM family: perturb in Adam's geometry")
    t.add_argument("--phi", type=float, help="angle-sam: angle in radians")
    t.add_argument("--inner-steps", type=int, help="nexus: inner steps per outer step")
    t.add_argument("--inner-lr", type=float, help="nexus: inner step length")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("measure", help="measure λ_c, λ_max and the trace of saved checkpoints "
                                        "(ours, Hugging Face models, Trainer output folders)")
    m.add_argument("checkpoint", metavar="PATH",
                   help="a checkpoint (RUN/checkpoints/stepN), a Hugging Face model folder (config.json + "
                        "safetensors), or a folder of checkpoints (a Trainer output folder, a run): each is measured")
    m.add_argument("--data", required=True,
                   help="source to measure on (any source train takes): code, prose, arithmetic, a file, a folder, "
                        "hf:DATASET or a token .bin")
    m.add_argument("--out", help="write the measurements as a run here (one metrics row per checkpoint)")
    m.add_argument("--force", action="store_true", help="replace a different run already in --out")
    m.add_argument("--name", help="name of the --out run (default: the folder measured)")
    m.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    m.add_argument("--batches", type=int, default=1, help="batches (their mean loss is measured)")
    m.add_argument("--block-size", type=int, help="tokens predicted per sequence (default: the run's; "
                                                  "Hugging Face: min(256, the model's positions - 1))")
    m.add_argument("--lanczos-iters", type=int, default=30, help="Lanczos iterations for λ_max (0: skip)")
    m.add_argument("--trace-samples", type=int, default=32, help="Hutchinson probes for the trace (0: skip)")
    m.add_argument("--seed", type=int, default=0, help="seed of the measured batches")
    m.add_argument("--direction", choices=("auto", "optimizer", "gradient", "adam"), default="auto",
                   help="update direction: the checkpoint's own optimizer step (auto falls back to the gradient "
                        "when its state is missing), the gradient, or Adam warmed on --warm-batches")
    m.add_argument("--warm-batches", type=int, default=8, help="batches that warm Adam's moments (--direction adam)")
    m.add_argument("--max-grad-norm", type=float, help="clip the direction's gradient to this norm first")
    m.add_argument("--lr", type=float, help="lr to compare with η_c (default: the checkpoint's schedule)")
    m.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--json", action="store_true", help="print JSON (one object per line for a series)")
    m.set_defaults(func=cmd_measure)

    mx = sub.add_parser("mix", help="data-mix advisor: the pretraining fraction where fine-tuning and "
                                     "pretraining sharpness cross, checked by short fine-tunes")
    mx.add_argument("checkpoint", help="a checkpoints/stepNNNNNNNN folder of a run (or the run: its latest checkpoint)")
    mx.add_argument("--pretrain", required=True, action="append",
                    help="pretraining source(s): code, prose, arithmetic, a file, a folder or a .bin; "
                         "repeat or separate with commas for several (mixed in equal parts)")
    mx.add_argument("--finetune", required=True, help="fine-tuning source (one)")
    mx.add_argument("--out", required=True, help="directory for mix.json, mix.csv, mix_validation.csv, figures/")
    mx.add_argument("--alphas", help="pretraining fractions to sweep, e.g. 0,0.1,0.2,...,1 (default: steps of 0.1)")
    mx.add_argument("--no-validate", action="store_true", help="sweep only, no validation fine-tunes")
    mx.add_argument("--validate-steps", type=int, help="steps of each validation fine-tune (default 50)")
    mx.add_argument("--verbose", action="store_true", help="print each α as it is measured")
    mx.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="settings of the analysis (MixConfig), e.g. batch_size=80 validate_lr=1e-4")
    mx.set_defaults(func=cmd_mix)

    st = sub.add_parser("study", help="train the grid of the measured study (sizes × schedules × seeds) and report")
    st.add_argument("config", nargs="?", help="TOML study config (see configs/study.toml); defaults apply without one")
    st.add_argument("--out", required=True, help="study directory (runs/, study.json, report/)")
    st.add_argument("--shard", help="I/N: run only every N-th run from the I-th (several machines, one --out)")
    st.add_argument("--force", action="store_true", help="replace runs whose settings changed")
    st.add_argument("--plan", action="store_true", help="print the grid (sizes, steps, tokens) and exit")
    st.add_argument("--no-report", action="store_true", help="train only; analyse later with sharpscope analyze")
    st.add_argument("--no-progress", action="store_true", help="no progress line")
    st.add_argument("--final", choices=("mean", "median"), default="mean",
                    help="summary of each run's last 10%% of points in the report (median: robust to outliers)")
    st.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seeds=[0] train.optim.lr=1e-3")
    st.set_defaults(func=cmd_study)

    c = sub.add_parser("compare", help="the simulated study's claims against a measured study, claim by claim")
    c.add_argument("simulated", help="simulated report directory (summary.json) or directory of simulated runs")
    c.add_argument("measured", help="measured report directory (summary.json) or directory of measured runs")
    c.add_argument("--out", required=True, help="directory for comparison.md / .csv / .json")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="run the built-in demo end to end")
    d.add_argument("--out", default="demo-output", help="output directory (replaced)")
    d.add_argument("--no-training", action="store_true", help="only the simulated study")
    d.add_argument("--no-progress", action="store_true", help="no progress line")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the reduced study's settings")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may come after flags too (argparse only takes one run of them)
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"sharpscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sharpscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
