"""Command line: `ptuning score | info | train | pretrain | eval | infer | promot | bench | plan`
(also `python -m ptuning`)."""

from __future__ import annotations

import argparse
import os
import sys

from ptuning import distributed  # stdlib-only at import
from ptuning import xla_flags  # stdlib-only too

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
xla_flags.add_defaults()  # before any command imports JAX


def _add_score(sub):
  p = sub.add_parser("score", help="log-likelihood of each target given its input (jsonl in/out)")
  p.add_argument("--checkpoint", required=True,
                 help="backbone: HF save_pretrained dir or T5X checkpoint (msgpack/zarr, Orbax)")
  p.add_argument("--inputs", required=True, help='jsonl lines {"inputs": ..., "targets": ...}')
  p.add_argument("--output", required=True, help="jsonl written with a 'score' per line")
  p.add_argument("--vocab", default=None,
                 help="SentencePiece model for text fields (default: spiece.model in the checkpoint dir)")
  p.add_argument("--model", default=None, help="preset name, when the checkpoint cannot say")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--mesh", default=None, help="e.g. data=2,model=4 (default: all devices on data)")
  p.set_defaults(run=run_score)


def _add_info(sub):
  p = sub.add_parser("info", help="parameter count and bytes per device of a preset on a mesh")
  p.add_argument("--model", required=True, help="preset name, e.g. t5_1_1_xxl")
  p.add_argument("--mesh", default="data=1,model=1", help="e.g. data=2,model=4 (no devices needed)")
  p.add_argument("--rules", default="default", help="partitioning rules: default | 2d")
  p.add_argument("--param_dtype", default=None, help="e.g. bfloat16 (default: the preset's)")
  p.set_defaults(run=run_info)


def _add_bench(sub):
  from ptuning import bench  # stdlib-only at import; JAX / torch load when it runs
  p = sub.add_parser("bench", help="time a train step (vs HF PEFT), greedy decoding or "
                     "rank scoring (vs transformers)")
  bench.add_arguments(p)
  p.set_defaults(run=bench.run)


def _add_plan(sub):
  from ptuning import plan  # stdlib-only at import; JAX loads in the re-executed child
  p = sub.add_parser("plan", help="ahead-of-time memory / FLOPs of the train step on a topology",
                     description="Compiles the configured run's train step (gin, as for train) "
                     "for --topology or --mesh on fake CPU devices, without running it.")
  plan.add_arguments(p)
  p.set_defaults(run=plan.run)


def _add_gin_commands(sub):
  for name, help_text in (("train", "train (or resume) a prompt / method on a task"),
                          ("pretrain", "train a backbone itself (runs/pretrain.gin: UL2 "
                           "denoisers, all parameters) and export it as an HF checkpoint"),
                          ("eval", "evaluate the latest checkpoint in MODEL_DIR"),
                          ("infer", "write predictions of the latest checkpoint as jsonl"),
                          ("promot", "ProMoT: prompt tuning, then fine-tuning with that prompt "
                           "frozen (methods/promot.gin)")):
    p = sub.add_parser(name, help=help_text,
                       description="Configured by --gin_file=FILE (repeatable, searched in "
                       "gin_configs/) and --gin.NAME=value bindings (T5X macro names).")
    if name == "infer":
      p.add_argument("--output", required=True, help="predictions jsonl")
    distributed.add_arguments(p)
    p.set_defaults(run=run_gin_command)


def run_gin_command(args) -> int:
  # Multi-process runs start JAX's distributed runtime before anything touches a device.
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  from ptuning import gin_setup
  from ptuning.train import loop
  if args.command == "promot":
    from ptuning.train import promot
    promot.run(*promot.load_config(args.gin_files, args.gin_bindings))
    return 0
  config = gin_setup.load_config(args.gin_files, args.gin_bindings)
  if args.command == "pretrain":
    from ptuning.train import pretrain
    pretrain.run(config)
  elif args.command == "train":
    loop.train(config)
  elif args.command == "eval":
    loop.run_eval(config)
  else:
    loop.run_infer(config, args.output)
  return 0


def _default_vocab(checkpoint: str) -> str | None:
  for directory in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
    candidate = os.path.join(directory, "spiece.model")
    if os.path.isfile(candidate):
      return candidate
  return None


def run_score(args) -> int:
  from ptuning import scoring, sharding
  from ptuning.checkpoints.load import load_backbone
  from ptuning.vocab import get_vocabulary

  vocab_path = args.vocab or _default_vocab(args.checkpoint)
  vocab = get_vocabulary(vocab_path) if vocab_path else None
  mesh_config = sharding.parse_mesh_spec(args.mesh)
  mesh = sharding.make_mesh(mesh_config)
  cfg, params = load_backbone(args.checkpoint, mesh, args.model, sharding.rules_for(mesh_config))
  scores = scoring.score_file(cfg, params, args.inputs, args.output, vocab, args.batch_size)
  print(f"scored {len(scores)} examples from {args.inputs} -> {args.output} "
        f"(mean score {scores.mean():.4f})")
  return 0


def run_info(args) -> int:
  import flax.linen as nn
  from ptuning import param_tree, sharding
  from ptuning.model import build
  from ptuning.model.config import get_preset

  cfg = get_preset(args.model)
  if args.param_dtype:
    cfg = cfg.replace(param_dtype=args.param_dtype)
  mesh_config = sharding.parse_mesh_spec(args.mesh)
  mesh_config = sharding.MeshConfig(mesh_config.data, mesh_config.model, args.rules)
  mesh_shape = {"data": mesh_config.data, "model": mesh_config.model}
  if -1 in mesh_shape.values():
    raise SystemExit("info needs explicit mesh sizes, e.g. --mesh data=8,model=8")
  abstract = nn.meta.unbox(build.abstract_params(cfg))
  count = param_tree.count(abstract)
  total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in
                    param_tree.flatten(abstract).values())
  per_device = sharding.bytes_per_device(abstract, build.logical_specs(cfg), mesh_shape,
                                         sharding.rules_for(mesh_config))
  print(f"model: {args.model}  ({cfg.feed_forward}, d_model={cfg.d_model}, d_ff={cfg.d_ff}, "
        f"heads={cfg.num_heads}x{cfg.d_kv}, layers={cfg.num_encoder_layers}+{cfg.num_decoder_layers}, "
        f"vocab={cfg.vocab_size}, param_dtype={cfg.param_dtype})")
  print(f"parameters: {count:,}  ({total_bytes / 2**30:.2f} GiB)")
  print(f"mesh: data={mesh_shape['data']}, model={mesh_shape['model']}, rules={mesh_config.rules}")
  print(f"parameter bytes per device: {per_device:,}  ({per_device / 2**30:.3f} GiB)")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="ptuning", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  _add_score(sub)
  _add_info(sub)
  _add_bench(sub)
  _add_gin_commands(sub)
  _add_plan(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  from ptuning.gin_setup import parse
  gin_files, gin_bindings, rest = parse(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  if (gin_files or gin_bindings) and args.command not in ("train", "pretrain", "eval", "infer", "promot",
                                                       "plan"):
    raise SystemExit(f"--gin_file / --gin.* apply to train, eval and infer, not {args.command}")
  args.gin_files, args.gin_bindings = gin_files, gin_bindings
  args.argv = list(sys.argv[1:] if argv is None else argv)  # `plan` re-executes itself
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
