"""Time fairseq's own training step on given batches. Runs in fairseq's virtual environment
(benchmarks/peers/setup_fairseq.sh), started by ``benchmarks/train_speed.py --peer fairseq``.

    python fairseq_train.py --data FAIRSEQ_DATA --batches BATCHES.npz --warmup 20 --steps 100
                            --threads 2 -- <fairseq-train arguments>

The model, criterion, optimizer, lr schedule and ``Trainer`` are fairseq's, built from the
fairseq-train arguments exactly as ``fairseq-train`` builds them; only the batch order is
given: batch i is fairseq's collation of the pairs listed in BATCHES.npz (pair indices of the
encdec split, which ``fairseq_peer.convert`` wrote in the same order), so both toolkits step
through the same sentences. Prints one JSON line: target tokens per second over the timed
steps, peak RSS, parameter count, mean target tokens and padding per batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--src-lens", required=True, help=".npy of the encdec split's source lengths")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args, fairseq_args = ap.parse_known_args()
    fairseq_args = [a for a in fairseq_args if a != "--"]
    torch.set_num_threads(args.threads)

    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.logging import metrics
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(parser, input_args=[args.data] + fairseq_args))
    utils.import_user_module(cfg.common)
    metrics.reset()
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    task.load_dataset("train", combine=False, epoch=1)
    data = task.dataset("train")
    # fairseq-preprocess appends EOS to every source sentence; encdec's sources carry none.
    # Dropping it gives both toolkits the same source tokens (LanguagePairDataset's option).
    data.remove_eos_from_source = True
    src_lens = np.load(args.src_lens)
    if len(data) != len(src_lens) or not np.array_equal(data.src_sizes - 1, src_lens):
        sys.exit(f"{args.data}: fairseq's train split does not match the encdec split "
                 f"({len(data)} vs {len(src_lens)} pairs, or different source lengths)")

    saved = np.load(args.batches)
    order = np.split(saved["indices"], np.cumsum(saved["sizes"])[:-1])
    batches = [data.collater([data[int(i)] for i in idx])
               for idx in order[: args.warmup + args.steps]]
    pad = task.target_dictionary.pad()

    trainer.begin_epoch(1)
    with metrics.aggregate("train_inner"):
        for b in batches[: args.warmup]:
            trainer.train_step([b])
        tokens, start = 0, time.perf_counter()
        for b in batches[args.warmup:]:
            trainer.train_step([b])
            tokens += b["ntokens"]
        elapsed = time.perf_counter() - start
    timed = batches[args.warmup:]
    print(json.dumps({
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tgt_tokens_per_batch": float(np.mean([b["ntokens"] for b in timed])),
        "tgt_padding": float(np.mean([b["target"].eq(pad).float().mean().item() for b in timed])),
        "src_padding": float(np.mean([b["net_input"]["src_tokens"].eq(pad).float().mean().item()
                                      for b in timed])),
        "num_updates": trainer.get_num_updates(),
    }))


if __name__ == "__main__":
    main()
