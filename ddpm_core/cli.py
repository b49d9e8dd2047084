"""The command line: `python -m ddpm_core COMMAND` (or the `ddpm` script).

This module owns argument parsing, exit statuses and one-line errors; what each command does
is `ddpm_core.commands`', every computation a library call.
Commands: `demo` (samples from an untrained UNet with both samplers, and the schedule plot),
`train` (a profile on MNIST, CIFAR-10 or an image folder), `train-classifier` (the noise-aware
classifier for guidance), `sample` (draw images from a checkpoint, optionally guided towards
chosen classes), `evaluate` (FID and IS of a checkpoint's samples; with --nll, the bound in
bits/dim), `notebooks` (the papermill batch), `import-pretrained` (the authors' weights).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal

from ddpm_core.classifier_runs import EVAL_IMAGES
from ddpm_core.commands import (
    run_demo, run_evaluate, run_import_pretrained, run_notebooks_command, run_sample, run_train, run_train_classifier,
)
from ddpm_core.config import DDIM_STEPS
from ddpm_core.files import to_json
from ddpm_core.notebooks import NotebookFailed
from ddpm_core.runtime import configure_threads
from ddpm_core.training import TrainingInterrupted

log = logging.getLogger("ddpm_core")
# torch-fidelity's InceptionV3 weights, as `evaluation.INCEPTION_FILE` names them (a test checks
# the two agree); written out so that `--help` needs no torchmetrics import.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(minimum: int):
    """An argparse type: a whole number >= `minimum`, refused with the valid range otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (valid: >= {minimum})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def sample_count(text: str) -> int:
    """--num-samples: 0 (no FID or IS: `evaluate --nll N` alone) or >= 2 (FID needs two images)."""
    value = integer(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be >= 2 (FID needs two images), or 0 for --nll alone, got 1")
    return value


def number(minimum: float = -math.inf, below: float = math.inf, positive: bool = False):
    """An argparse type: a finite float in [minimum, below) (> 0 with `positive`); NaN, inf and
    anything out of range are refused with the valid range."""
    valid = "> 0" if positive else f"in [{minimum:g}, {below:g})" if below < math.inf else f">= {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (valid: {valid})") from None
        if not math.isfinite(value) or value < minimum or value >= below or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {valid}, got {text}")
        return value

    return parse


def runtime_options(seed: int | None = 0, with_seed: bool = True) -> argparse.ArgumentParser:
    """The parent parser of every command that computes: the device, the seed, threads and progress."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    if with_seed:
        parent.add_argument("--seed", type=integer(0), default=seed,
                            help="seeds every random draw" + (" (default: the profile's)" if seed is None else ""))
    parent.add_argument("--threads", type=integer(1), default=None,
                        help="CPU threads (default: $DDPM_THREADS, else the cores other programs leave free)")
    parent.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parent


def sampling_options() -> argparse.ArgumentParser:
    """The parent parser of `sample` and `evaluate`: the checkpoint, the sampler (a
    `SamplerConfig`), how it runs, and the runtime options."""
    parent = argparse.ArgumentParser(add_help=False, parents=[runtime_options()])
    parent.add_argument("--checkpoint", required=True, help="a ddpm_core checkpoint (.pt)")
    parent.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    parent.add_argument("--variance", default="fixedlarge", choices=["fixedlarge", "fixedsmall"],
                        help="DDPM only: sigma^2 = beta_t (the paper's CIFAR-10 choice) or beta_tilde_t")
    parent.add_argument("--steps", type=integer(1), default=None,
                        help=f"DDIM steps S (default {DDIM_STEPS}); DDPM always takes T")
    parent.add_argument("--eta", type=number(0), default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parent.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"], help="DDIM only")
    parent.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    parent.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast (GPU)")
    parent.add_argument("--batch-size", type=integer(1), default=None,
                        help="images per sampler call (default: 256 on a GPU, 64 on a CPU, faster there)")
    return parent


def add_demo(commands) -> None:
    demo = commands.add_parser("demo", parents=[runtime_options()],
                               help="sample an untrained UNet with both samplers; plot the schedules")
    demo.add_argument("--out", default="figures", help="folder for the PNGs (default: figures)")
    demo.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    demo.add_argument("--timesteps", type=integer(2), default=1000, help="T, the number of diffusion steps")
    demo.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--num", type=integer(1), default=16, help="number of samples per sampler")
    demo.add_argument("--ddim-steps", type=integer(1), default=DDIM_STEPS)
    demo.set_defaults(handler=run_demo)


def add_train(commands) -> None:
    train = commands.add_parser("train", parents=[runtime_options(seed=None)],
                                help="train a profile (smoke, laptop, mnist-gpu, cifar10-paper); "
                                "several GPUs: torchrun --nproc_per_node N -m ddpm_core train ...")
    train.add_argument("--profile", default=None,
                       help="smoke, laptop, mnist-gpu or cifar10-paper (default: mnist-gpu on CUDA, else laptop)")
    train.add_argument("--out", required=True, help="run folder: last.pt, log.jsonl")
    train.add_argument("--dataset", default=None, help="mnist, cifar10 or folder (default: the profile's)")
    train.add_argument("--data-root", default=None, help="default: $DDPM_DATA_ROOT, else ./data")
    train.add_argument("--schedule", default=None, help="linear or cosine (default: the profile's)")
    train.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last.pt, with its own settings (--steps may grow)")
    train.add_argument("--steps", type=integer(1), default=None)
    train.add_argument("--batch-size", type=integer(1), default=None)
    train.add_argument("--lr", type=number(positive=True), default=None)
    train.add_argument("--lr-decay", default=None, help="constant or cosine, after warmup (default: the profile's)")
    train.add_argument("--base-channels", type=integer(16), default=None,
                       help="a multiple of the profile's GroupNorm groups (32 in the paper, 8 for MNIST)")
    train.add_argument("--holdout-images", type=integer(1), default=128, help="test images that judge best.pt")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast (CUDA)")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(CUDA)")
    train.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                       help="AdamW's fused kernel (CUDA; on by default)")
    train.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None,
                       help="page-locked batches, copied to the GPU without blocking (CUDA; on by default)")
    train.add_argument("--num-workers", type=integer(0), default=None, help="data-loader processes (default: the profile's)")
    train.add_argument("--class-conditional", action="store_true",
                       help="train eps(x_t, t, y) with label dropout, for classifier-free guidance")
    train.add_argument("--label-dropout", type=number(0, below=1), default=0.1,
                       help="with --class-conditional (default 0.1)")
    train.set_defaults(handler=run_train)


def add_train_classifier(commands) -> None:
    classify = commands.add_parser("train-classifier", parents=[runtime_options(seed=None)],
                                    help="train the noise-aware classifier for classifier guidance")
    classify.add_argument("--checkpoint-dir", required=True,
                          help="the diffusion run's folder: its last.pt sets schedule and shape; the classifier goes here")
    classify.add_argument("--profile", default=None, help="whose classifier budget (default: as for train)")
    classify.add_argument("--out", default=None,
                          help="default: CHECKPOINT_DIR/noisy_classifier-KEY.pt, KEY a hash of the settings")
    classify.add_argument("--dataset", default=None, help="mnist or cifar10 (default: the profile's)")
    classify.add_argument("--data-root", default=None, help="default: $DDPM_DATA_ROOT, else ./data")
    classify.add_argument("--steps", type=integer(1), default=None)
    classify.add_argument("--batch-size", type=integer(1), default=None)
    classify.add_argument("--lr", type=number(positive=True), default=None)
    classify.add_argument("--eval-images", type=integer(0), default=EVAL_IMAGES,
                          help="test images for the accuracy-by-t report (0: none)")
    classify.set_defaults(handler=run_train_classifier)


def add_sample(commands) -> None:
    draw = commands.add_parser("sample", parents=[sampling_options()],
                               help="draw images from a checkpoint (its configs travel inside it)")
    draw.add_argument("--class", dest="class_labels", type=integer(0), nargs="+", default=None, metavar="N",
                      help="guide towards these classes, cycled over the images")
    draw.add_argument("--classifier", default=None, help="noise-aware classifier for an unconditional checkpoint")
    draw.add_argument("--guidance-scale", type=number(0), default=1.0, help="classifier guidance scale s")
    draw.add_argument("--guidance-weight", type=number(0), default=1.0,
                      help="classifier-free guidance weight w (class-conditional checkpoints)")
    draw.add_argument("--num", type=integer(1), default=64, help="number of images")
    draw.add_argument("--out", default="samples.png", help="PNG grid of the first --grid-size images")
    draw.add_argument("--grid-size", type=integer(1), default=64)
    draw.add_argument("--save-tensor", default=None, help="also save every image as a uint8 (N, C, H, W) tensor")
    draw.add_argument("--save-images", default=None, help="also write every image as a PNG into this folder")
    draw.set_defaults(handler=run_sample)


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", parents=[sampling_options()],
                                   help="FID and Inception Score of a checkpoint's samples; with --nll, bits/dim")
    evaluate.add_argument("--num-samples", type=sample_count, default=50_000,
                          help="images to generate (the paper: 50,000; fewer biases FID upward; FID needs 2; "
                               "0: no FID or IS, with --nll)")
    evaluate.add_argument("--nll", type=integer(1), default=None, metavar="N",
                          help="also the variational bound in bits/dim of N test images (Ho et al. 2020, Table 1), "
                               "term by term, with --variance's reverse process; --batch-size images at a time")
    evaluate.add_argument("--metric", default="auto", choices=["auto", "inception", "mnist"],
                          help="inception (the paper's; default for CIFAR-10) or mnist (the judge's features)")
    evaluate.add_argument("--dataset", default=None, choices=["mnist", "cifar10"],
                          help="the reference training set (default: the checkpoint's)")
    evaluate.add_argument("--data-root", default=None, help="where the datasets are (default ./data)")
    evaluate.add_argument("--stats-dir", default=None, help="reference statistics cache (default runs/fid_stats)")
    evaluate.add_argument("--judge", default=None, help="the MNIST judge (default runs/mnist_judge.pt, trained if missing)")
    evaluate.add_argument("--inception-weights", default=None,
                          help=f"torch-fidelity's {INCEPTION_FILE} (default: torch's hub cache)")
    evaluate.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                          help="also score real held-out images at the same number (the best FID reachable)")
    evaluate.add_argument("--guidance-weight", type=number(0), default=None,
                          help="class-conditional checkpoints: classifier-free guidance weight w")
    evaluate.add_argument("--out", default="metrics.json", help="where to write the JSON report")
    evaluate.set_defaults(handler=run_evaluate)


def add_notebooks(commands) -> None:
    notebooks = commands.add_parser("notebooks", parents=[runtime_options(with_seed=False)],
                                      help="run the numbered notebooks in order with papermill (make run)")
    notebooks.add_argument("--profile", default="auto", help="auto (laptop on a CPU, mnist-gpu on CUDA) or a name")
    notebooks.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                           help="any other notebook parameter, e.g. -p seed 1 -p schedule cosine")
    notebooks.add_argument("--notebooks", default="notebooks", help="folder of the numbered notebooks")
    notebooks.add_argument("--out", default="build/notebooks", help="folder for the executed copies")
    notebooks.add_argument("--prepare-only", action="store_true", help="inject the parameters, run nothing (nbval)")
    notebooks.set_defaults(handler=run_notebooks_command)


def add_import_pretrained(commands) -> None:
    pretrained = commands.add_parser(
        "import-pretrained", help="convert diffusers' DDPM UNet (e.g. google/ddpm-cifar10-32) into a checkpoint"
    )
    pretrained.add_argument("source", help="a Hugging Face repository id, or a local folder with config.json and weights")
    pretrained.add_argument("--out", required=True, help="where to write the ddpm_core checkpoint")
    pretrained.add_argument("--force", action="store_true", help="replace --out if it exists")
    pretrained.add_argument("--cache-dir", default=None, help="Hugging Face download cache")
    pretrained.set_defaults(handler=run_import_pretrained)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models, step by step.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo, add_train, add_train_classifier, add_sample, add_evaluate, add_notebooks,
                add_import_pretrained):
        add(commands)
    return parser


def one_line(error: BaseException) -> str:
    """An error's message on one line. A DataLoader worker's error arrives wrapped in its
    traceback ("Caught X in DataLoader worker ... Original Traceback ..."): its last line is the
    error itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Original Traceback" in str(error) else " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = f"ddpm {args.command}"
    try:
        if getattr(args, "threads", None) is not None:
            os.environ["DDPM_THREADS"] = str(args.threads)  # notebook kernels read it too
        configure_threads()
        report = args.handler(args)
    except TrainingInterrupted as stop:  # the step finished and last.pt holds it
        parser.exit(128 + stop.signum, f"{name}: stopped by {signal.Signals(stop.signum).name} after step {stop.step}; "
                                       f"{stop.checkpoint} holds it: continue with "
                                       f"`python -m ddpm_core train --out {stop.checkpoint.parent} --resume`\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{name}: interrupted; files written before now are intact\n")
    except (ValueError, OSError, FloatingPointError, NotebookFailed) as error:  # bad input: one line, no traceback
        parser.exit(2, f"{name}: error: {one_line(error)}\n")
    if report is not None:  # None: a torchrun rank other than 0, which reports nothing
        print(to_json(report))
    return 0
