"""Several EMA averages of one training run, each scored like a tuning-table row.

The EMA is the only setting that leaves the training itself alone, so one run can carry many:
this script trains a profile (with overrides, as `train_profile.py` takes them) with extra
averages beside the trainer's own, saves them, and scores each, and the raw weights, with
DDIM-50 (eta 1) on 1,000 samples for each sampling seed given: MNIST FID, the judge's
confident share and the smallest digit's share. The rows share the weights they average and
the samplers' noise, so their differences are not the seed-to-seed spread of separate runs.

An average is "ramp R" (decay_k = min(cap, (1 + k) / (R + k)), `TrainConfig.ema_ramp`, with
the profile's ema_decay as the cap) or "fixed D" (decay D from the second update on, no
ramp). The trainer's own average is kept too, and the tracker with its settings must
reproduce it bit for bit (checked).

Run: `.venv/bin/python benchmarks/ema_sweep.py --ramps 3 5 10 20 40 --fixed 0.999 0.9995
      [--seeds 0 1] [--ddpm "ramp 5"] [--set train.seed=1] [--data-root PATH]`
The run is trained once into RUNS_ROOT/ema_sweep/PROFILE-mnist-KEY with its averages in
ema_tracks.pt there; a second call with the same averages only scores them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from common import RESULTS, write_results
from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.denoisers import build_model
from ddpm_core.files import atomic_path
from ddpm_core.runs import run_dir, runs_root, trained_checkpoint
from ddpm_core.runtime import configure_threads, resolve_device
from ddpm_core.training import EMA
from train_profile import SAMPLERS, add_common_arguments, judge_and_evaluator, score, spec_for

TRACKS_FILE = "ema_tracks.pt"


class EMATracks:
    """A training hook that keeps EMA averages of the weights beside the trainer's own. They
    start, as the trainer's does, from the initial weights (rebuilt here from the seed, with the
    global RNG left as it was), which a ramp's first update keeps a share of."""

    def __init__(self, specs: dict[str, tuple[float, bool, float]], out: Path, spec):
        with torch.random.fork_rng():
            torch.manual_seed(spec.train.seed)  # as Trainer draws the initial weights
            initial = build_model(spec.model)
        self.tracks = {name: EMA(initial, *track) for name, track in specs.items()}
        self.out, self.placed = out, False

    def after_step(self, trainer, loss, stopping) -> None:
        update = trainer.step - 1  # the update the trainer's own EMA has just taken
        if not self.placed:
            if update != 0:
                raise SystemExit(f"the averages must see every update; {trainer.out} resumed at {update}: "
                                 f"remove that folder and run again")
            for ema in self.tracks.values():
                ema.model.to(trainer.device)
            self.placed = True
        for ema in self.tracks.values():
            ema.update(trainer.model, update)
        if trainer.step == trainer.config.steps:
            with atomic_path(self.out / TRACKS_FILE) as temporary:
                torch.save({name: ema.model.state_dict() for name, ema in self.tracks.items()}, temporary)


def track_specs(ramps: list[float], fixed: list[float], cap: float) -> dict[str, tuple[float, bool, float]]:
    """name -> EMA(decay, warmup, ramp) arguments."""
    specs = {f"ramp {ramp:g}": (cap, True, ramp) for ramp in ramps}
    specs.update({f"fixed {decay:g}": (decay, False, 10.0) for decay in fixed})
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--ramps", type=float, nargs="*", default=[3, 5, 10, 20, 40])
    parser.add_argument("--fixed", type=float, nargs="*", default=[0.999, 0.9995])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds, one FID each")
    parser.add_argument("--ddpm", action="append", default=[], metavar="NAME",
                        help="also DDPM-1000 for this average (sampling seed 0; about 15 min on 2 cores)")
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    spec = spec_for(args.profile, args.set, 1.0)
    specs = track_specs(args.ramps, args.fixed, spec.train.ema_decay)
    root = runs_root(args.runs_root) / "ema_sweep"
    out = run_dir(spec, root)
    tracks_path = out / TRACKS_FILE
    saved = torch.load(tracks_path, weights_only=True) if tracks_path.is_file() else {}
    if not set(specs) <= set(saved):
        if saved:
            raise SystemExit(f"{out} was trained with the averages {sorted(saved)}, not {sorted(specs)}: "
                             f"ask for those, or remove the folder to train again")
        if (out / "last.pt").exists():  # the averages are saved at the end: this training was cut short
            raise SystemExit(f"{out} holds a training without its averages (one stopped before its end saves "
                             f"none, and they cannot be resumed): remove the folder to train again")
        print(f"training {spec.profile} ({spec.train.steps} steps of {spec.train.batch_size}, {threads} threads) "
              f"with {len(specs)} extra averages into {out}")
        trained_checkpoint(spec, args.data_root, device, root=root, progress=True,
                           extra_hooks=[EMATracks(specs, out, spec)])
        saved = torch.load(tracks_path, weights_only=True)
    checkpoint = load_checkpoint(out / "last.pt")
    own = (spec.train.ema_decay, spec.train.ema_warmup, spec.train.ema_ramp)
    for name, track_spec in specs.items():
        if track_spec == own and not all(torch.equal(saved[name][k], v) for k, v in checkpoint.ema_state.items()):
            raise SystemExit(f"the tracker {name!r} has the trainer's settings but not its weights: a bug")

    judge_model, evaluator = judge_and_evaluator(args, device)
    results = {"profile": spec.profile, "settings": args.set, "run": str(out), "threads": threads,
               "samples": args.samples, "seeds": args.seeds,
               "floor": round(evaluator.floor(args.samples)["fid"], 2), "rows": {}}
    variants = {name: (dataclasses.replace(checkpoint, ema_state=saved[name]), True) for name in specs}
    variants["raw weights"] = (checkpoint, False)
    grids = RESULTS / "ema_sweep" / out.name  # a folder a run: another profile or seed never overwrites these
    print(f"| average | DDIM-50 FID (seeds {', '.join(map(str, args.seeds))}) | mean | confident | smallest digit |")
    for name, (source, use_ema) in variants.items():
        stem = grids / name.replace(" ", "_")
        rows = [score(source, SAMPLERS["ddim50"], args.samples, evaluator, judge_model, device, use_ema,
                      Path(f"{stem}_seed{seed}.png") if seed == args.seeds[0] else None, seed=seed)
                for seed in args.seeds]
        row = {"ddim50": rows, "ddim50_mean_fid": round(statistics.fmean(r["fid"] for r in rows), 2)}
        if name in args.ddpm:
            row["ddpm1000"] = score(source, SAMPLERS["ddpm1000"], args.samples, evaluator, judge_model, device,
                                    use_ema, Path(f"{stem}_ddpm1000.png"))
        results["rows"][name] = row
        print(f"| {name} | {' / '.join(str(r['fid']) for r in rows)} | {row['ddim50_mean_fid']} | "
              f"{' / '.join(format(r['confident_fraction'], '.1%') for r in rows)} | "
              f"{' / '.join(str(r['smallest_class_share']) for r in rows)} |"
              + (f" DDPM-1000: {row['ddpm1000']['fid']}, {row['ddpm1000']['confident_fraction']:.1%}"
                 if "ddpm1000" in row else ""), flush=True)
    label = "_".join(s.replace("=", "_").replace(".", "_") for s in args.set) or "profile"
    seeds = "_".join(map(str, args.seeds))
    print(write_results(f"{label}_seeds_{seeds}", results, grids))


if __name__ == "__main__":
    main()
