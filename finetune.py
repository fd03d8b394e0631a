"""Plain fine-tuning: the baseline every method is compared against, and what each method falls back to when its
components are switched off. A task-specific embedder and head around a pretrained body; everything is trained.

    python finetune.py                                  # MiniLM on UCR GunPoint, CPU, about a minute
    python finetune.py --task digits                    # 2D: sklearn digits through the same text body
    python finetune.py --task synthetic --body tiny     # seconds, for tests

This file is also the template of the method scripts: setup, data, model, (method stages), fine-tune, test, save.

Under torchrun (README, "More than one GPU"): every rank builds the model and runs its share of each batch through
DDP (common.fit, distributed.py); validation and test are sharded and gathered; rank 0 alone writes and prints.
"""
import argparse

import common
import data


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    return common.parse_args(parser, argv)


if __name__ == "__main__":
    args = get_args()
    run, device = common.setup("finetune", args)
    task = data.get_task(args.task, args.data_dir, args.data_path)
    model = common.model_for(task, args).to(device)
    trainable, total = common.count_params(model)
    print(f"task {task.name}: {task.kind}, in {task.in_shape}, out {task.out_shape}, "
          f"train/val/test {len(task.train)}/{len(task.val)}/{len(task.test)} | params {trainable:,}/{total:,}")
    common.fit(model, task, args, run, device)
    run.finish(common.test_best(model, task, args, run, device))
