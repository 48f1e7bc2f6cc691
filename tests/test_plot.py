import json
import subprocess
import sys

from PIL import Image

from gpt2 import mainlog
from tests.helpers import REPO, run_cli
from training.plot import model_size


def write_run(run_dir, n_layer=12, n_embd=768):
    run_dir.mkdir()
    lines = [f"s:{s} trl:{4.0 - s / 100:.6f} lr:6.000000e-04 norm:1.0000" for s in range(0, 50)]
    lines += ["s:0 tel:4.100000", "s:25 tel:3.800000", "s:49 tel:3.600000", "s:25 eval:0.260000",
              "s:49 eval:0.280000", "s:25 eval:0.265000"]  # a late duplicate result replaces the earlier one
    (run_dir / "main.log").write_text("\n".join(lines) + "\n")
    (run_dir / "ckpt_00000049").mkdir()
    (run_dir / "ckpt_00000049" / "state.json").write_text(
        json.dumps({"model_config": {"n_layer": n_layer, "n_embd": n_embd}}))


def test_main_log_parsing_and_model_size(tmp_path):
    write_run(tmp_path / "run")
    series = mainlog.read(tmp_path / "run" / "main.log")
    assert len(series["trl"]) == 50 and series["trl"][10] == (10, 3.9)
    assert series["tel"] == [(0, 4.1), (25, 3.8), (49, 3.6)]
    assert series["eval"] == [(25, 0.265), (49, 0.28)]
    assert model_size(tmp_path / "run", None) == "124M"
    assert model_size(tmp_path / "run", "d48") == "1558M"
    write_run(tmp_path / "tiny", n_layer=2, n_embd=64)
    assert model_size(tmp_path / "tiny", None) is None


# Colours as matplotlib draws them: the first and second curve of an axis, and the reference lines.
FIRST_CURVE, SECOND_CURVE, GPT2_LINE, GPT3_LINE = (31, 119, 180), (255, 127, 14), (255, 0, 0), (0, 128, 0)


def colours_per_panel(png) -> tuple[set, set]:
    """The colours drawn in the left (loss) and right (HellaSwag) half of the figure."""
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        halves = (rgb.crop((0, 0, width // 2, height)), rgb.crop((width // 2, 0, width, height)))
        return tuple({colour for _, colour in half.getcolors(width * height)} for half in halves)


def test_cli_draws_both_panels_with_the_reference_lines_of_the_runs_size(tmp_path):
    write_run(tmp_path / "run")
    result = run_cli("training/plot.py", [str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    loss, hellaswag = colours_per_panel(tmp_path / "run" / "main.png")
    assert {FIRST_CURVE, SECOND_CURVE, GPT2_LINE} <= loss and GPT3_LINE not in loss  # train, val, GPT-2 124M
    assert {FIRST_CURVE, GPT2_LINE, GPT3_LINE} <= hellaswag and SECOND_CURVE not in hellaswag
    write_run(tmp_path / "tiny", n_layer=2, n_embd=64)  # not one of GPT-2's sizes: no reference lines
    assert run_cli("training/plot.py", [str(tmp_path / "tiny")]).returncode == 0
    loss, hellaswag = colours_per_panel(tmp_path / "tiny" / "main.png")
    assert FIRST_CURVE in loss and FIRST_CURVE in hellaswag and not {GPT2_LINE, GPT3_LINE} & (loss | hellaswag)
    missing = subprocess.run([sys.executable, "training/plot.py", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "main.log" in missing.stderr


def plot_cli(run_dir):
    return subprocess.run([sys.executable, "training/plot.py", str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_run_without_evals_and_a_damaged_checkpoint_still_plots_without_warnings(tmp_path):
    write_run(tmp_path / "run")
    log = tmp_path / "run" / "main.log"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if " eval:" not in line))
    (tmp_path / "run" / "ckpt_00000049" / "state.json").write_text('{"model_config": {"n_lay')  # cut short
    result = plot_cli(tmp_path / "run")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "state.json: unreadable" in result.stdout and "no reference lines" in result.stdout
    assert (tmp_path / "run" / "main.png").stat().st_size > 0


def test_a_main_log_without_loss_lines_is_one_line_exit_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "main.log").write_text("s 0 trl 4.0\nnot a line of the engine's\n")
    result = plot_cli(tmp_path / "run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"plot.py: error: {tmp_path / 'run' / 'main.log'}: no loss lines to plot")
    assert not (tmp_path / "run" / "main.png").exists()


def test_core_lines_get_their_own_panel(tmp_path):
    write_run(tmp_path / "run")
    with open(tmp_path / "run" / "main.log", "a") as f:
        f.write("s:25 core:0.010000\ns:49 core:0.031000\n")
    assert mainlog.read(tmp_path / "run" / "main.log")["core"] == [(25, 0.01), (49, 0.031)]
    result = plot_cli(tmp_path / "run")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    with Image.open(tmp_path / "run" / "main.png") as image:
        wide = image.size[0]
    write_run(tmp_path / "without")
    assert plot_cli(tmp_path / "without").returncode == 0
    with Image.open(tmp_path / "without" / "main.png") as image:
        assert wide > 1.3 * image.size[0]  # a third panel
