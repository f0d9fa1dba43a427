"""Metric names: the slash-named keys of ``metrics.jsonl`` (see docs/run-format.md).

Every module that writes or reads a metric names it through here, so a key is spelled
in one place. Plain strings only: this module imports nothing.
"""

SHARPNESS_PREFIX = "sharpness/"
CRITICAL = "sharpness/critical"  # critical sharpness λ_c = 2/η_c
ETA_C = "sharpness/eta_c"
EVALS = "sharpness/evals"  # loss evaluations of the line search
CRITICAL_SE = "sharpness/critical_se"  # bootstrap standard error of λ_c over the probe's examples
ETA_C_SE = "sharpness/eta_c_se"  # the same for η_c
DESCENT_STEP = "sharpness/descent_step"  # gᵀd/‖d‖ on the batch the step was computed on
DESCENT_PROBE = "sharpness/descent_probe"  # gᵀd/‖d‖ on the probe (from the line search's losses)
PROBE_BATCHES = "sharpness/probe_batches"  # micro-batches a growing probe used
LR_OVER_ETA_C = "sharpness/lr_over_eta_c"
TWO_OVER_LR = "sharpness/two_over_lr"
LAMBDA_MAX = "sharpness/lambda_max"
TRACE = "sharpness/trace"
TRACE_STDERR = "sharpness/trace_stderr"
TRACE_PER_PARAM = "sharpness/trace_per_param"
PRECONDITIONED = "sharpness/preconditioned"
PRECONDITIONED_THRESHOLD = "sharpness/preconditioned_threshold"
PRECONDITIONED_RATIO = "sharpness/preconditioned_ratio"
DEFERRED_FROM = "sharpness/deferred_from"
FAILED_PREFIX = "sharpness/failed/"  # + the status of a measurement without a bracket

TRAIN_LOSS = "train/loss"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_SKIPPED = "train/skipped"

EVAL_PREFIX = "eval/"
EVAL_LOSS = "eval/loss"
ACC_PREFIX = "eval/acc/"  # + a task name
ARITHMETIC_ACCURACY = "eval/arithmetic/accuracy"

OPTIM_PREFIX = "optim/"  # + an optimizer statistic
INNER_COSINE = "optim/inner_cosine"


# The stability guard (curvature/guard.py), on measurement rows.
STABILITY_RATIO = "stability/ratio"  # lr / smoothed η_c
STABILITY_RATIO_LOWER = "stability/ratio_lower"  # lr / (smoothed η_c + z standard errors): what is judged
STABILITY_ALARM = "stability/alarm"  # 1 while the judged ratio has stayed above the threshold for patience readings
STABILITY_LR_SCALE = "stability/lr_scale"  # cap: the factor on the scheduled lr from the next step on
STABILITY_STOP = "stability/stop"  # stop: 1 on the measurement that ended the run


def eval_loss_key(data: str) -> str:
    """The loss on the named evaluation data."""
    return f"{EVAL_PREFIX}{data}/loss"

PHASE_PREFIX = "phase/"  # the live three-phase reading (signals.PhaseReader)
PHASE_CODE = "phase/code"  # 0 undecided, 1 rise, 2 decay, 3 plateau (signals.PHASES)
PHASE_SMOOTHED = "phase/smoothed"  # trailing 2/⟨η_c⟩
PHASE_PEAK = "phase/peak"
PHASE_T_PEAK = "phase/t_peak"
PHASE_PLATEAU_SINCE = "phase/plateau_since"  # t at which the current plateau began

# The automatic warmup (signals.AutoWarmup, schedule.warmup = "auto"), on its steps.
WARMUP_LR = "schedule/warmup_lr"  # the controller's lr of the step (the row's lr is this times any guard scale)
WARMUP_CAP = "schedule/warmup_cap"  # target · smoothed η_c that bounded it (none before a reading, after the max)
WARMUP_STEPS = "schedule/warmup_steps"  # on the step warmup ended: its length W (then a fixed warmup of W's schedule)
