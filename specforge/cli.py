"""The `specforge` command: thin wrappers that parse a config and call one function."""

from __future__ import annotations

import argparse
import os
import sys


def _common(p: argparse.ArgumentParser):
    p.add_argument("--target", default=None, help="preset name (configs/targets) or a checkpoint folder")
    p.add_argument("--config", default=None, help="a YAML recipe merged over the preset")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for a tokenizer that has none (data.chat_template)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 data.max_length=1024")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="specforge", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train an EAGLE-3 draft head")
    _common(p)
    p.add_argument("--mode", choices=["online", "offline"], default=None)
    p.add_argument("--hidden", default=None, help="offline: the dump-hidden folder (train.hidden)")
    p.add_argument("--data", default=None,
                   help="training data: JSONL, parquet/arrow files, a folder, a glob or a dataset name "
                        "(data.train_path)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoints/step_* folder, or the newest one (train.resume)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic, batch-invariant GPU kernels: bitwise-repeatable losses (train.deterministic)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (one per GPU): reruns itself under torchrun")
    p = sub.add_parser("dump-hidden", help="run the target once and store its features for offline training")
    _common(p)
    p.add_argument("--data", default=None,
                   help="training data: JSONL, parquet/arrow files, a folder, a glob or a dataset name "
                        "(data.train_path)")
    p.add_argument("--out", default=None, help="dump folder (dump.out)")
    p = sub.add_parser("prepare-data", help="answer the training prompts with the target itself")
    _common(p)
    p = sub.add_parser("build-vocab", help="build the draft vocabulary (d2t/t2d) from the training data")
    _common(p)
    p = sub.add_parser("bench", help="speculative decoding: acceptance length and speedup on a prompt set")
    _common(p)
    p.add_argument("--spec-steps", type=int, default=None, help="draft steps per round (bench.spec_steps)")
    p.add_argument("--topk", type=int, default=None, help="tree drafting: children per node (bench.topk)")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="tree nodes verified per round")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--draft", default=None, help="draft checkpoint folder (default: the latest trained)")
    p.add_argument("--prompts", default=None, help="JSONL of prompts (default: the bundled bench set)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="batch-invariant GPU kernels: speculative greedy output equals plain greedy output, "
                        "and the same figures on every run (bench.deterministic)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="split the target over N processes of this machine (tensor parallel; one per GPU)")
    p.add_argument("--sweep", action="store_true", default=None,
                   help="decode chain lengths and tree shapes, report each and the fastest with its serving flags "
                        "(bench.sweep)")
    p = sub.add_parser("export", help="rewrite a draft (ours or published) in the layout an engine serves")
    p.add_argument("--format", required=True, choices=["sglang", "speculators"],
                   help="sglang: for SGLang (LlamaForCausalLMEagle3); speculators: for vLLM (Eagle3Speculator)")
    p.add_argument("--target", default=None,
                   help="check the draft against this target (preset or folder) and name it as the verifier")
    p.add_argument("draft", help="the draft folder, in either layout")
    p.add_argument("out", help="the folder to write")
    # key=value overrides may come before or after the flags.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    if args.cmd == "export":
        if extra:
            parser.error(f"export takes no overrides: {' '.join(extra)}")
        from .eagle3.checkpoint import export_draft

        target = None
        if args.target:
            from .config import load_config

            target = load_config(args.target).target
        out = export_draft(args.draft, args.out, args.format, target)
        print(f"export: {args.draft} written to {out} in the {args.format} layout")
        return
    if getattr(args, "nproc", None) is not None:
        _launch(parser, args.nproc, sys.argv[1:] if argv is None else list(argv))
        if args.nproc > 1:
            return
    from .config import load_config

    overrides = list(args.overrides) + extra
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.isdir(resume):  # `--resume key=value`: a bare --resume
        overrides.insert(0, resume)
        args.resume = "latest"
    if getattr(args, "mode", None):
        overrides.append(f"train.mode={args.mode}")
    flags = {"spec_steps": "bench.spec_steps", "topk": "bench.topk", "num_draft_tokens": "bench.num_draft_tokens",
             "temperature": "bench.temperature", "draft": "bench.draft", "prompts": "bench.prompts",
             "hidden": "train.hidden", "data": "data.train_path", "out": "dump.out", "sweep": "bench.sweep",
             "chat_template": "data.chat_template", "resume": "train.resume",
             "deterministic": f"{'bench' if args.cmd == 'bench' else 'train'}.deterministic"}
    for flag, key in flags.items():
        if getattr(args, flag, None) is not None:
            overrides.insert(0, f"{key}={getattr(args, flag)}")
    cfg = load_config(args.target, args.config, overrides)
    from .data.conversations import DataError

    try:
        if args.cmd == "train":
            from .eagle3.train import train

            train(cfg)
        elif args.cmd == "prepare-data":
            from .prepare import prepare_data

            prepare_data(cfg)
        elif args.cmd == "build-vocab":
            from .prepare import build_vocab_cmd

            build_vocab_cmd(cfg)
        elif args.cmd == "dump-hidden":
            from .dump import dump_hidden

            dump_hidden(cfg)
        elif args.cmd == "bench":
            from .bench import run_bench

            run_bench(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:  # a run that stops on an error still leaves its process group cleanly
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def _launch(parser, nproc: int, argv: list[str]) -> None:
    """`--nproc N` (N > 1): the same command on N processes through torch.distributed.run (standalone
    rendezvous on this machine), which is also what `torchrun --nproc-per-node N -m specforge ...` does."""
    import subprocess

    from .parallel.mesh import launched

    if nproc < 1:
        parser.error(f"--nproc {nproc}: need at least 1")
    if launched():
        parser.error("--nproc starts the processes itself; under torchrun leave it out")
    if nproc == 1:
        return
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "specforge", *rest]
    rc = subprocess.run(cmd).returncode
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
