"""Plot a run's main.log like llm.c's dev/vislog notebook: loss on the left, HellaSwag on the right, and CORE
beside them when the run scored it (run.py --core-every).

    python training/plot.py OUT_DIR [--model d12] [-o OUT_DIR/main.png] [--overwrite]

Reference lines are OpenAI's GPT-2 and GPT-3 checkpoints of the same size, as llm.c draws them; they are
shown only when the run's model is one of GPT-2's four sizes (from --model, or the run's checkpoints).
The default output, the run's main.png, is redrawn each time; an existing -o file is replaced only with
--overwrite, and never a file of the run itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import cli
from common.files import atomic_write
from gpt2 import mainlog
from gpt2.rundir import CHECKPOINT_STATE, MAIN_LOG, PLOT, list_checkpoints

# (layers, channels) -> size, and OpenAI's figures for each size (FineWeb val loss; HellaSwag acc_norm)
GPT2_SIZES = {(12, 768): "124M", (24, 1024): "350M", (36, 1280): "774M", (48, 1600): "1558M"}
PRESET_SIZES = {"d12": "124M", "d24": "350M", "d36": "774M", "d48": "1558M"}
GPT2_FINEWEB_VAL_LOSS = {"124M": 3.42, "350M": 3.08, "774M": 3.00, "1558M": 2.83}
GPT2_HELLASWAG = {"124M": 0.294, "350M": 0.375, "774M": 0.432, "1558M": 0.489}
GPT3_HELLASWAG = {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
GPT2_XL_CORE = 0.2565  # OpenAI's GPT-2 1.5B on CORE, the mark nanochat's "time to GPT-2" runs aim at

def model_size(run_dir: Path, model: str | None) -> str | None:
    """GPT-2 size name of the run's model, from -e/--model or the newest checkpoint's state.json."""
    if model:
        return PRESET_SIZES.get(model)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    state = checkpoints[-1] / CHECKPOINT_STATE
    try:
        config = json.loads(state.read_text())["model_config"]
        return GPT2_SIZES.get((config["n_layer"], config["n_embd"]))
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged checkpoint must not stop a plot
        print(f"note: {state}: unreadable ({err!r}); no reference lines (-e names the model)")
        return None


def plot(series: dict[str, list[tuple[int, float]]], output: Path, title: str, size: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: runs on headless nodes
    import matplotlib.pyplot as plt

    figure, (loss_axis, eval_axis, *core_axis) = plt.subplots(1, 3 if series["core"] else 2,
                                                              figsize=(24 if series["core"] else 16, 6))
    for kind, label in (("trl", "train loss"), ("tel", "val loss")):
        if series[kind]:
            steps, values = zip(*series[kind], strict=True)
            loss_axis.plot(steps, values, label=label, marker="o" if len(steps) == 1 else None)  # a lone point
    if size:
        loss_axis.axhline(GPT2_FINEWEB_VAL_LOSS[size], color="r", linestyle="--",
                          label=f"OpenAI GPT-2 ({size}) FineWeb val loss")
    loss_axis.set(xlabel="step", ylabel="loss", title="Loss")
    if series["eval"]:
        steps, values = zip(*series["eval"], strict=True)
        eval_axis.plot(steps, values, label="HellaSwag acc_norm", marker="o" if len(steps) == 1 else None)
    if size:
        eval_axis.axhline(GPT2_HELLASWAG[size], color="r", linestyle="--", label=f"OpenAI GPT-2 ({size})")
        eval_axis.axhline(GPT3_HELLASWAG[size], color="g", linestyle="--", label=f"OpenAI GPT-3 ({size})")
    eval_axis.set(xlabel="step", ylabel="accuracy", title="HellaSwag eval")
    if not series["eval"]:
        eval_axis.text(0.5, 0.5, "no HellaSwag evals in main.log (-h 1 runs them)", ha="center",
                       transform=eval_axis.transAxes)
    if core_axis:
        steps, values = zip(*series["core"], strict=True)
        core_axis[0].plot(steps, values, label="CORE", marker="o" if len(steps) == 1 else None)
        core_axis[0].axhline(GPT2_XL_CORE, color="r", linestyle="--", label="OpenAI GPT-2 (1558M)")
        core_axis[0].set(xlabel="step", ylabel="CORE (centered accuracy, mean over tasks)", title="CORE")
    for axis in (loss_axis, eval_axis, *core_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.suptitle(title + (f" — GPT-2 {size}" if size else ""))
    with atomic_write(output) as f:
        figure.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=f"Plot OUT_DIR/{MAIN_LOG} like llm.c's vislog.")
    parser.add_argument("run_dir", type=Path, help=f"the training output dir (-o) holding {MAIN_LOG}")
    parser.add_argument("-e", "--model", help="model preset (d12/d24/d36/d48) for the reference lines")
    parser.add_argument("-o", "--output", type=Path, help=f"PNG path (default RUN_DIR/{PLOT}, redrawn each time)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    args = parser.parse_args(argv)
    log = args.run_dir / MAIN_LOG
    output = args.output or args.run_dir / PLOT
    if output.resolve() != (args.run_dir / PLOT).resolve():  # the run's own plot is redrawn; any other file is not
        if problem := cli.output_problem("-o", output, args.overwrite, reads=(log, *list_checkpoints(args.run_dir))):
            parser.error(problem)
    if not log.exists():
        print(f"plot.py: error: {log}: no such file (is {args.run_dir} a training output dir?)", file=sys.stderr)
        return 2
    try:
        series = mainlog.read(log)
    except (OSError, UnicodeDecodeError) as err:
        print(f"plot.py: error: {log}: unreadable ({err})", file=sys.stderr)
        return 2
    if not (series["trl"] or series["tel"]):
        print(f"plot.py: error: {log}: no loss lines to plot (the engine writes 's:STEP trl:LOSS ...')",
              file=sys.stderr)
        return 2
    try:
        print(f"wrote {plot(series, output, str(args.run_dir), model_size(args.run_dir, args.model))}")
    except OSError as err:  # a read-only or full target: the atomic write left nothing half-written
        print(f"plot.py: error: {output}: cannot be written ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
