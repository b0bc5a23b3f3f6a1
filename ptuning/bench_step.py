"""Our side of `ptuning bench --mode train`: a method's experiment built from a bench spec, and its
train step compiled once.

`CompiledStep(spec)` builds the experiment (`build_experiment` with a random backbone from a
preset, the method's prompt, Adafactor, dropout 0), makes `warmup + steps` random batches
(`bench.random_batches`) and compiles the jitted train step once for them; calling it runs one
step on a batch and blocks until it is done. `ptuning.bench` times one such step (against PEFT),
`ptuning.bench_methods` two of them (two methods) side by side.

Like `ptuning.bench`, nothing here imports JAX at module import.
"""

from __future__ import annotations

import tempfile
import time

METHODS = ("prompt_tuning", "dept", "ept", "deep_prompt", "prompt_bank", "mpt", "promot_stage2",
           "full_finetuning")
LOWRANK_POSITIONS = 256  # DePT / EPT: s, the positions the low-rank update covers (papers' default)
BANK_TASKS = 8  # prompt_bank / mpt rows: 8 tasks, each batch mixes them (random task ids)
# ProMoT stage 2 fine-tunes the backbone with the stage-1 prompt attached and frozen.
TRAINABLE_OVERRIDES = {"promot_stage2": r"^backbone/"}


def make_method(name: str, prompt: int, inputs: int):
  """The method a bench row runs (None: full fine-tuning) and its encoder prefix length.

  DePT / EPT use their papers' T5-base budget (m=60 / 40, r=30, s=256 or the input length if
  longer: 76,800 trainable parameters at d=768, equal to a 100-token prompt; shorter inputs leave
  rows of the low-rank update unused, as in the papers); deep prompts use `prompt` rows per layer.
  """
  from ptuning.prompts.deep import DeepPrompt
  from ptuning.prompts.dept import DePT
  from ptuning.prompts.ept import EPT
  from ptuning.prompts.multitask import MPT, PromptBank
  from ptuning.prompts.vanilla import PromptTuning
  table = {"prompt_tuning": lambda: PromptTuning(length=prompt),
           "dept": lambda: DePT(max_length=max(inputs, LOWRANK_POSITIONS)),
           "ept": lambda: EPT(max_length=max(inputs, LOWRANK_POSITIONS)),
           "deep_prompt": lambda: DeepPrompt(length=prompt),
           "prompt_bank": lambda: PromptBank(num_tasks=BANK_TASKS, length=prompt),
           "mpt": lambda: MPT(num_tasks=BANK_TASKS, length=prompt),
           "promot_stage2": lambda: PromptTuning(length=prompt), "full_finetuning": lambda: None}
  if name not in table:
    raise SystemExit(f"unknown --method {name!r}; choose from {METHODS}")
  method = table[name]()
  return method, (method.length if method is not None else 0)


def step_flops(cfg, spec: dict) -> dict:
  """Analytic FLOPs of the method's step: frozen backbone (input gradients only), or, for full
  fine-tuning, weight gradients too (backward = 2x forward)."""
  from ptuning.bench import prompt_tuning_step_flops
  _, prefix = make_method(spec["method"], spec["prompt"], spec["inputs"])
  flops = prompt_tuning_step_flops(cfg, spec["batch"], spec["inputs"], spec["targets"], prefix)
  if spec["method"] in ("full_finetuning", "promot_stage2"):
    flops = dict(forward=flops["forward"], backward=2 * flops["forward"],
                 total=3 * flops["forward"])
  return flops


def train_config(spec: dict, model_dir: str, model=None):
  """The `TrainConfig` of a bench spec: `model` (default: `spec['model']`'s preset with its
  attention and parameter dtype), a random backbone, the method's prompt, Adafactor, dropout 0."""
  from ptuning import sharding
  from ptuning.model.config import get_preset
  from ptuning.train.experiment import TrainConfig
  if model is None:
    preset = get_preset(spec["model"])
    model = preset.replace(attention_impl=spec.get("attention", "recompute"),
                           param_dtype=spec.get("param_dtype", "float32"),
                           norm_barrier=spec.get("norm_barrier", preset.norm_barrier))
  return TrainConfig(
      model_dir=model_dir, initial_checkpoint_path=None, model=model,
      method=make_method(spec["method"], spec["prompt"], spec["inputs"])[0],
      trainable_pattern=TRAINABLE_OVERRIDES.get(spec["method"]), batch_size=spec["batch"],
      task_feature_lengths={"inputs": spec["inputs"], "targets": spec["targets"]},
      dtype=spec["dtype"], dropout_rate=0.0, optimizer="adafactor",
      remat_policy=spec.get("remat", "none"), scan_layers=spec.get("scan_layers", False),
      mesh=sharding.parse_mesh_spec(spec.get("mesh")))


class CompiledStep:
  """`spec['method']`'s train step on `spec['model']`, compiled once; `step(batch)` runs it on one
  of `self.batches` (`[B, L]` encoder / `[B, T]` decoder int32, on the mesh), donating and
  replacing the train state, and blocks until the step is done."""

  def __init__(self, spec: dict):
    import jax
    from ptuning.bench import random_batches
    from ptuning.sharding import to_global_batch
    from ptuning.train.experiment import build_experiment

    with tempfile.TemporaryDirectory() as tmp:
      self.exp = build_experiment(train_config(spec, tmp))
    self.batches = [to_global_batch(b, self.exp.mesh) for b in random_batches(
        spec["warmup"] + spec["steps"], spec["batch"], spec["inputs"], spec["targets"],
        self.exp.model.vocab_size,
        num_tasks=BANK_TASKS if spec["method"] in ("prompt_bank", "mpt") else 0)]
    self.state, self.rng, self.metrics = self.exp.init_state(), jax.random.key(1), None
    start = time.perf_counter()
    self.compiled = self.exp.train_step_fn(self.batches[0]).lower(
        self.state, self.exp.frozen, self.batches[0], self.rng).compile()
    self.compile_s = time.perf_counter() - start

  def __call__(self, batch) -> None:
    import jax
    self.state, self.metrics = self.compiled(self.state, self.exp.frozen, batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))

  def stats(self) -> dict:
    """Mesh, compile seconds, compiled memory (bytes: argument, output, alias, temp), the last
    step's mean loss and the trainable parameter count."""
    from ptuning import param_tree
    analysis = self.compiled.memory_analysis()
    memory = {k: int(getattr(analysis, f"{k}_size_in_bytes", 0) or 0)
              for k in ("argument", "output", "alias", "temp")} if analysis else {}
    loss = (float(self.metrics["loss"]) / float(self.metrics["weight_sum"])
            if self.metrics is not None else None)
    return {"mesh": dict(self.exp.mesh.shape), "compile_s": self.compile_s,
            "compiled_memory": memory, "loss": loss,
            "trainable_parameters": param_tree.count(self.exp.trainable_init)}
