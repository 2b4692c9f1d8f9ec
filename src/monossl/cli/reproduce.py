"""`monossl reproduce`: a table in one command: the paper's (monossl.experiments.augmentations,
monossl.experiments.finetune_table) and ours (distillation, methods_table)."""

from __future__ import annotations

import argparse

from monossl.cli import positive
from monossl.cli.compare import seed_list
from monossl.errors import UserError
from monossl.experiments import augmentations, distillation, finetune_table, methods_table, sources_table
from monossl.experiments.table import ReproduceConfig

EXPERIMENTS = {augmentations.EXPERIMENT: augmentations.augmentation_table,
               finetune_table.EXPERIMENT: finetune_table.finetune_table,
               distillation.EXPERIMENT: distillation.distillation_table,
               methods_table.EXPERIMENT: methods_table.methods_table,
               sources_table.EXPERIMENT: sources_table.sources_table}
BUDGET_NAMES = tuple(dict.fromkeys([*augmentations.BUDGETS, *finetune_table.BUDGETS, *distillation.BUDGETS,
                                    *methods_table.BUDGETS, *sources_table.BUDGETS]))


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", choices=tuple(EXPERIMENTS),
                   help="which table: cifar10-augmentations or imagenet-finetune (Table 4) of PAPER.md section 5, "
                        "distillation (a teacher distilled through one image and other sources), or methods "
                        "(RotNet, DeepCluster, BiGAN, SimCLR, MoCo and DINO on one image and on --data, linear "
                        "and k-NN per tap), or sources (one photograph beside other photographs, fractals, dead "
                        "leaves, spectral and white noise and the dataset, one method or --distill, linear and k-NN "
                        "per tap, docs/sources.md)")
    p.add_argument("--method", default=None, choices=augmentations.SSL_METHODS,
                   help="cifar10-augmentations: self-supervised method of the eight augmentation rows "
                        "(default bigan, the paper's); sources: the method of every trained row (default simclr)")
    p.add_argument("--distill", default=None, metavar="TEACHER",
                   help="sources: train every row as a distillation student of TEACHER (a run directory "
                        "with classifier.pt, e.g. a supervised run)")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="sources: several seeds, e.g. 0,1,2 (each row per seed; mean ± sd per cell)")
    p.add_argument("--budget", default="smoke", choices=BUDGET_NAMES,
                   help="smoke (minutes, a check), quick (about 1 h on 2 CPU cores; cifar10-augmentations and "
                        "distillation; sources: the main job's rows, smaller probes), main (methods, sources: the "
                        "main job's per-row budget), paper (GPU); default smoke")
    p.add_argument("--image", action="append", default=None,
                   help="source image of the self-supervised rows (default: the built-in default image)")
    p.add_argument("--data", default=None,
                   help="labelled dataset for probes and the supervised row (default cifar10); "
                        "imagenet-finetune needs folder:PATH (train/<class>/, val/<class>/)")
    p.add_argument("--eval-data", default=None, metavar="SPEC,SPEC",
                   help="methods: more labelled datasets to probe every row on, e.g. cifar100,stl10")
    p.add_argument("--arch", default=None, help="imagenet-finetune: alexnet-big (default) or alexnet-small; "
                                                "methods: cifar (default) or resnet18-cifar")
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-METHOD-BUDGET, "
                                               "runs/reproduce-imagenet-finetune-BUDGET)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated subset of the rows (cifar10-augmentations: {', '.join(augmentations.ROWS)}; "
                        f"imagenet-finetune: {', '.join(finetune_table.ROWS)}; methods: "
                        f"{', '.join(methods_table.ROWS)}; sources: {', '.join(sources_table.ROWS)}); default all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # overrides of the budget (tests, quick experiments); recorded in results.json
    p.add_argument("--steps", type=positive(), default=None,
                   help="override the budget: training steps of every trained row")
    p.add_argument("--batch-size", type=positive(), default=None,
                   help="override the budget: batch size of every trained row")
    p.add_argument("--probe-epochs", type=positive(), default=None, help="override the budget: probe epochs")
    p.add_argument("--subset", type=positive(), default=None, help="override the budget: probe training images")
    p.add_argument("--test-subset", type=positive(), default=None, help="override the budget: probe test images")
    p.add_argument("--widths", default=None, help="CIFAR trunk channels, e.g. 64,128,256,512 (default: the trunk's)")
    p.add_argument("--whiten-conv1", action=argparse.BooleanOptionalAction, default=None,
                   help="trained rows: conv1 in whitened coordinates (default: pretrain's, on for the CIFAR trunk)")
    p.add_argument("--finetune-steps", type=positive(), default=None,
                   help="imagenet-finetune: override the budget's fine-tuning steps")
    p.add_argument("--dc-patches", type=positive(), default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.experiment != sources_table.EXPERIMENT and (args.seeds is not None or args.distill is not None):
        raise UserError(f"--seeds and --distill apply to {sources_table.EXPERIMENT} only")
    if args.seeds is not None and args.seed != 0:
        raise UserError("give --seed or --seeds, not both")
    table = EXPERIMENTS[args.experiment](ReproduceConfig(
        method=args.method, budget=args.budget, images=args.image, data=args.data,
        eval_data=args.eval_data.split(",") if args.eval_data else None,
        arch=args.arch, out=args.out, rows=args.rows, seed=args.seed, device=args.device, progress=not args.quiet,
        steps=args.steps, batch_size=args.batch_size, probe_epochs=args.probe_epochs, subset=args.subset,
        test_subset=args.test_subset, widths=args.widths, whiten_conv1=args.whiten_conv1,
        finetune_steps=args.finetune_steps, dc_patches=args.dc_patches, seeds=args.seeds, distill=args.distill))
    print()
    print(table.markdown, end="")
    print(f"wrote {table.out / table.files[0]}, {', '.join(table.files[1:])}")
    if table.stopped:
        print(f"{len(table.stopped)} row(s) stopped: {', '.join(table.stopped)} (see table.md)")
        return 1
    return 0
